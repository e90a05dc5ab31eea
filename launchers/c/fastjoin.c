/* Joining the running N1 container of a job step on this node (launchers/c/record.md): the
 * steps both C callers share, the C front uctr-exec (uctr_exec.c) and the SPANK plugin's
 * task_init (spank/uctr_join.c). Everything here runs as the user and checks every file it
 * opens (owner, mode, O_NOFOLLOW); nothing here changes namespaces: the callers setns. */
#define _GNU_SOURCE
#include "fastjoin.h"

#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <poll.h>
#include <sched.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define LOCK_WAIT_NS (2L * 1000 * 1000 * 1000) /* then Python waits, with its messages */

/* -- files we trust -------------------------------------------------------------------- */

/* A directory of ours that nobody else can write to (nodelock.open_private_dir). */
int fj_open_private_dir(int at, const char *path)
{
    struct stat st;
    int fd = openat(at, path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (fstat(fd, &st) < 0 || st.st_uid != getuid() || (st.st_mode & 022)) {
        close(fd);
        return -1;
    }
    return fd;
}

/* The record: a regular file of ours, not writable by others, of bounded size. */
char *fj_read_record(int dir, const char *name, size_t *len, struct stat *st)
{
    int fd = openat(dir, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return NULL;
    char *buf = NULL;
    if (fstat(fd, st) == 0 && S_ISREG(st->st_mode) && st->st_uid == getuid() &&
        !(st->st_mode & 022) && st->st_size > 0 && st->st_size <= FR_MAX_BYTES) {
        buf = malloc((size_t)st->st_size);
        ssize_t got = buf ? read(fd, buf, (size_t)st->st_size) : -1;
        if (got != st->st_size) {
            free(buf);
            buf = NULL;
        }
        *len = (size_t)st->st_size;
    }
    close(fd);
    return buf;
}

/* Field 22 of /proc/PID/stat (start time in clock ticks), as sharedns.start_time. */
int fj_start_time(const char *pid, char *out, size_t size)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%s/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    p++;
    for (int field = 0; field < 19; field++) { /* skip state .. field 21 */
        p += strspn(p, " ");
        p += strcspn(p, " ");
    }
    p += strspn(p, " ");
    size_t len = strcspn(p, " \n");
    if (len == 0 || len >= size)
        return -1;
    memcpy(out, p, len);
    out[len] = '\0';
    return 0;
}

static int digits(const char *s)
{
    if (!*s || strlen(s) > 10)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

/* include/uapi/linux/pidfd.h (Linux 6.11), missing from older headers */
#define PIDFS_IOCTL_MAGIC_ 0xFF
static const unsigned long pidfd_ns_ioctl[2] = {
    _IO(PIDFS_IOCTL_MAGIC_, 9), /* PIDFD_GET_USER_NAMESPACE */
    _IO(PIDFS_IOCTL_MAGIC_, 3), /* PIDFD_GET_MNT_NAMESPACE */
};

/* Open /proc/PID/ns/{user,mnt} of a live member with the recorded inodes
 * (sharedns._open_member): the open files keep the namespaces alive. */
static int open_member(const char *pid, const char *started, unsigned long long user_ino,
                       unsigned long long mnt_ino, int fds[2])
{
    char now[32], path[64];
    struct stat st;
    const char *ns[2] = { "user", "mnt" };
    unsigned long long ino[2] = { user_ino, mnt_ino };
    /* One start-time check, after the opens, is enough: a pid that was reused before
     * them shows a new start time, one that exits after them leaves us its namespaces. */
    if (!digits(pid))
        return -1;
    fds[0] = fds[1] = -1;
#ifdef FJ_PROC_NS_ONLY  /* the tests' build of the path kernels before 6.11 take */
    int pidfd = -1;
#else
    long number = strtol(pid, NULL, 10);
    int pidfd = number > 0 && number <= INT_MAX ? (int)syscall(SYS_pidfd_open, number, 0) : -1;
#endif
    for (int i = 0; i < 2; i++) {
        /* Linux >= 6.11 hands the namespaces out through the pidfd, without a path to look
         * up; older kernels refuse the ioctl and we open /proc/PID/ns/ (same checks) */
        fds[i] = pidfd >= 0 ? ioctl(pidfd, pidfd_ns_ioctl[i], 0) : -1;
        if (fds[i] < 0) {
            snprintf(path, sizeof(path), "/proc/%s/ns/%s", pid, ns[i]);
            fds[i] = open(path, O_RDONLY | O_CLOEXEC);
        }
        if (fds[i] < 0 || fstat(fds[i], &st) < 0 || (unsigned long long)st.st_ino != ino[i])
            goto bad;
    }
    if (pidfd >= 0)
        close(pidfd);
    pidfd = -1;
    if (fj_start_time(pid, now, sizeof(now)) < 0 || strcmp(now, started) != 0)
        goto bad; /* the pid was reused while we opened */
    return 0;
bad:
    if (pidfd >= 0)
        close(pidfd);
    for (int i = 0; i < 2; i++) {
        if (fds[i] >= 0)
            close(fds[i]);
        fds[i] = -1;
    }
    return -1;
}

/* The members file (sharedns._read_members), newest first: a live one. */
static int member_from_file(int launch, const char *name, unsigned long long u,
                            unsigned long long m, int fds[2])
{
    int fd = openat(launch, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return -1;
    /* the newest members are at the end: read the last 64 KiB (a line cut at its start
     * is skipped: its pid does not parse or its start time does not match) */
    static char buf[1 << 16];
    struct stat st;
    off_t from = fstat(fd, &st) == 0 && st.st_size > (off_t)sizeof(buf) - 1
                 ? st.st_size - (off_t)sizeof(buf) + 1 : 0;
    ssize_t n = pread(fd, buf, sizeof(buf) - 1, from);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    for (ssize_t end = n; end > 0;) {
        ssize_t start = end - 1;
        while (start > 0 && buf[start - 1] != '\n')
            start--;
        char line[128];
        size_t len = (size_t)(end - start);
        if (len < sizeof(line)) {
            memcpy(line, buf + start, len);
            line[len] = '\0';
            char *nl = strchr(line, '\n'), *sp;
            if (nl)
                *nl = '\0';
            sp = strchr(line, ' ');
            if (sp) {
                *sp = '\0';
                if (open_member(line, sp + 1, u, m, fds) == 0)
                    return 0;
            }
        }
        end = start;
    }
    return -1;
}

/* -- the rendezvous lock (nodelock.NodeLock) ------------------------------------------- */

/* Shared: a join changes nothing that another join reads (the members file is appended
 * to with O_APPEND, one short write), so the ranks of a step join side by side. What a join
 * must not meet takes the lock exclusively: the Python launcher's creator while it sets a
 * generation up and its joins, the garbage collection that unlinks lock files. Exclusive,
 * the 31 other tasks of a 32-task node took turns, each polled every millisecond. */
static int lock_step(int launch, const char *name)
{
    struct timespec pause = { 0, 1000 * 1000 };
    for (long waited = 0; waited < LOCK_WAIT_NS; waited += pause.tv_nsec) {
        int fd = openat(launch, name, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0)
            return -1;
        if (flock(fd, LOCK_SH | LOCK_NB) == 0) {
            /* Still named? A cleaner unlinks a lock file only while holding it; then our
             * inode has no name left (nodelock.NodeLock._still_named, in one call). */
            struct stat own;
            if (fstat(fd, &own) == 0 && own.st_nlink > 0) {
                char pid[16];
                snprintf(pid, sizeof(pid), "%10d\n", (int)getpid());
                if (pwrite(fd, pid, 11, 0) != 11) {
                    /* only a diagnostic for waiters */
                }
                return fd;
            }
        }
        close(fd);
        nanosleep(&pause, NULL);
    }
    return -1;
}

/* staged.mark_in_use: pid-PID in the bundle's inuse directory (the directory exists: the
 * creator made its own mark there). */
void fj_mark_in_use(const char *dir)
{
    char path[4096], text[512];
    struct utsname u;
    struct timespec now;
    if (snprintf(path, sizeof(path), "%s/pid-%d", dir, (int)getpid()) >= (int)sizeof(path))
        return;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    uname(&u);
    for (char *p = u.nodename; *p; p++)
        if (*p == '"')
            memmove(p, p + 1, strlen(p));
    clock_gettime(CLOCK_REALTIME, &now);
    int n = snprintf(text, sizeof(text), "{\"pid\": %d, \"job\": null, \"host\": \"%s\", "
                     "\"created\": %lld.%03ld}", (int)getpid(), u.nodename,
                     (long long)now.tv_sec, now.tv_nsec / 1000000);
    if (n > 0 && write(fd, text, (size_t)n) < 0) {
        /* an empty mark still counts: its name is the reference */
    }
    close(fd);
}

/* The directory of the step's fast-join record: fastrec.fast_dir, "<UCTR_LOCAL_DIR, else
 * /tmp/uctr-UID>/launch" spelled as Python's os.path.join spells it, so that it compares
 * string-equal to the record's launch_dir in the usual case. */
const char *fj_record_dir(char **envp, char *out, size_t size)
{
    char base[4096];
    const char *local = fr_getenv(envp, "UCTR_LOCAL_DIR");
    if (local && *local) {
        if (local[0] != '/')
            return "UCTR_LOCAL_DIR is relative";
        if (snprintf(base, sizeof(base), "%s", local) >= (int)sizeof(base))
            return "UCTR_LOCAL_DIR is too long";
    } else {
        snprintf(base, sizeof(base), "/tmp/uctr-%d", (int)getuid());
    }
    const char *sep = base[strlen(base) - 1] == '/' ? "" : "/";
    if (snprintf(out, size, "%s%slaunch", base, sep) >= (int)size)
        return "UCTR_LOCAL_DIR is too long";
    return NULL;
}

/* Did an N1 step run here lately? The launch directory exists on any node where uctr-exec
 * ran, in any mode; a record of some step written within a day (records are removed a day
 * after their step) says that N1 steps run here. Only then do the SPANK plugin's tasks wait
 * for their creator's record ("no record for this step"). The writer touches fast-seen
 * after every record (fastrec.SEEN): one fstatat, however many records the directory
 * holds. A directory of an older version without it is listed for a record instead.
 * Read on the path without a record only. */
#define RECORD_SEEN "fast-seen"
#define RECORD_SEEN_AGE (24L * 3600)  /* sharedns.GC_AGE */

void fj_touch_seen(int dir)
{
    int fd = openat(dir, RECORD_SEEN, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd >= 0) {
        futimens(fd, NULL);
        close(fd);
    }
}

static int holds_records(int dir)
{
    struct stat st;
    if (fstatat(dir, RECORD_SEEN, &st, AT_SYMLINK_NOFOLLOW) == 0) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        return S_ISREG(st.st_mode) && st.st_uid == getuid()
               && now.tv_sec - st.st_mtim.tv_sec < RECORD_SEEN_AGE;
    }
    int fd = dup(dir);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    struct dirent *e;
    int found = 0;
    if (!d) {
        if (fd >= 0)
            close(fd);
        return 0;
    }
    while (!found && (e = readdir(d)))
        found = strncmp(e->d_name, "fast-step-", 10) == 0;
    closedir(d);
    return found;
}

int fj_watch_records(char **envp, char *name, size_t size)
{
    char dirpath[4096];
    struct fr_rank me;
    if (fj_record_dir(envp, dirpath, sizeof(dirpath)) || fr_detect(envp, (long)getppid(), &me) < 0
        || fr_record_name(me.step_key, name, size) < 0)
        return -1;
    int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    /* records are renamed into place, outcome records linked (IN_CREATE) */
    if (fd >= 0 && inotify_add_watch(fd, dirpath, IN_MOVED_TO | IN_CREATE | IN_DONT_FOLLOW
                                                  | IN_ONLYDIR) < 0) {
        close(fd);
        fd = -1;
    }
    return fd;
}

int fj_wait_records(int watch, const char *name, long ms)
{
    if (watch < 0) {
        struct timespec pause = { 0, 5 * 1000 * 1000 };
        nanosleep(&pause, NULL);
        return 1;
    }
    struct pollfd p = { .fd = watch, .events = POLLIN };
    if (poll(&p, 1, (int)(ms < 100 ? ms : 100)) <= 0)
        return -1;
    /* struct inotify_event is followed by its name; the buffer is aligned for it */
    char events[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    int ours = 0;
    ssize_t n;
    while ((n = read(watch, events, sizeof(events))) > 0) {
        for (char *at = events; at < events + n;) {
            const struct inotify_event *e = (const struct inotify_event *)at;
            /* a full queue drops events, ours perhaps: look again then too */
            ours |= (e->mask & IN_Q_OVERFLOW) || (e->len > 0 && strcmp(e->name, name) == 0);
            at += sizeof(*e) + e->len;
        }
    }
    return ours;
}

const char fj_failed[] = "the step's first rank failed";

/* What an outcome record that matches our request means for us: fj_failed when we fail as
 * the first rank did, else why we go to Python (static strings: the record is freed). */
static const char *outcome(const struct fj_join *j)
{
    /* Written in this run of the step? A requeued job's steps have the same keys, but
     * another launcher process (slurmstepd, orted, hydra's proxy) is our parent. */
    const struct fr_line *parent = fr_get(&j->rec, "parent");
    char ppid[24], started[32];
    snprintf(ppid, sizeof(ppid), "%ld", (long)getppid());
    if (!parent || strcmp(parent->argv[0], ppid) != 0
        || fj_start_time(ppid, started, sizeof(started)) < 0
        || strcmp(parent->argv[1], started) != 0)
        return "an outcome record of another run of this step";
    if (fr_get(&j->rec, "no_container"))
        return "the step's first rank runs no shared container";
    const char *command = fr_value(&j->rec, "failed_command");
    if (command && (j->ncommand == 0 || strcmp(j->command[0], command) != 0))
        return "the step's first rank failed for another command";
    return fj_failed;
}

int fj_conf_sets(const char *path, const char *key)
{
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    /* slurm.conf is a few KiB: read what is there, at most FR_MAX_BYTES */
    size_t size = fstat(fd, &st) == 0 && st.st_size > 0 && st.st_size < FR_MAX_BYTES
                  ? (size_t)st.st_size : FR_MAX_BYTES;
    char *text = malloc(size + 1);
    ssize_t n = text ? read(fd, text, size) : -1;
    close(fd);
    if (n < 0) {
        free(text);
        return 0;
    }
    text[n] = '\0';
    size_t klen = strlen(key);
    int found = 0;
    for (char *line = text, *next; line && !found; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        line += strspn(line, " \t");
        if (strncasecmp(line, key, klen) != 0)
            continue;
        char *value = line + klen + strspn(line + klen, " \t");
        if (*value != '=')
            continue;
        value++;
        value += strspn(value, " \t");
        found = *value && *value != '#';
    }
    free(text);
    return found;
}

int fj_setns_user(int fd)
{
    if (setns(fd, CLONE_NEWUSER) == 0)
        return 0;
    /* EINVAL also means a caller with threads (another plugin's): only the same
     * namespace is no error */
    struct stat ours, theirs;
    return errno == EINVAL && stat("/proc/self/ns/user", &ours) == 0 && fstat(fd, &theirs) == 0
           && ours.st_ino == theirs.st_ino && ours.st_dev == theirs.st_dev ? 0 : -1;
}

void fj_fail_as_recorded(struct fj_join *j)
{
    const struct fr_line *failed = fr_get(&j->rec, "failed");
    if (j->me.size > 1)
        fj_name_rank(j->me.rank);
    fj_die(atoi(failed->argv[0]), fr_value(&j->rec, "failed_hint"), "%s", failed->argv[1]);
}

/* Everything that can still hand over to Python; 0 when we are about to setns. */
const char *fj_prepare(struct fj_join *j, int argc, char **argv, char **envp)
{
    struct fr_rank me;
    char name[160], cwd[4096], dirpath[4096];
    const char *why;
    if (getuid() != geteuid() || getgid() != getegid())
        return "set-uid or set-gid";
    if (fr_detect(envp, (long)getppid(), &me) < 0
        || fr_record_name(me.step_key, name, sizeof(name)) < 0)
        return "cannot tell the step";
    j->me = me;
    if ((why = fj_record_dir(envp, dirpath, sizeof(dirpath))))
        return why;
    /* the record's directory: in the usual case the step's launch directory itself (one
     * open and fstat less), see below */
    int dir = fj_open_private_dir(AT_FDCWD, dirpath);
    if (dir < 0)
        return "no private record directory";
    size_t len = 0;
    struct stat rst;
    char *data = fj_read_record(dir, name, &len, &rst);
    if (!data) {
        why = holds_records(dir) ? "no record for this step"
                                 : "no record on this node (no N1 step ran here lately)";
        goto out;
    }
    int bad = fr_parse(data, len, &j->rec, &why);
    free(data);
    if (bad)
        goto out;
    why = "the record is another step's";
    if (strcmp(fr_value(&j->rec, "step"), me.step_key) != 0)
        goto out;
    if (!getcwd(cwd, sizeof(cwd)))
        cwd[0] = '\0';
    if (fr_match(&j->rec, argc - 1, argv + 1, envp, cwd[0] ? cwd : NULL, getuid(), getgid(),
                 &j->command, &j->ncommand, &why) < 0)
        goto out;
    if (fr_outcome(&j->rec)) {
        why = outcome(j);
        goto out;
    }
    /* The rendezvous directory: the descriptor we hold when the record names the path we
     * opened and checked (the writer put the record into it), else a second open with the
     * same checks (the policy's storage.local_dir is not the environment's). */
    const char *launch = fr_value(&j->rec, "launch_dir");
    j->launch = strcmp(launch, dirpath) == 0 ? dir : fj_open_private_dir(AT_FDCWD, launch);
    why = "the rendezvous directory is not private";
    if (j->launch < 0)
        goto out;
    char lockname[512];
    why = "bad stem";
    if (snprintf(lockname, sizeof(lockname), "%s.lock", fr_value(&j->rec, "stem"))
            >= (int)sizeof(lockname)
        || strchr(fr_value(&j->rec, "stem"), '/'))
        goto out;
    j->lock = lock_step(j->launch, lockname);
    why = "the step's lock is busy";
    if (j->lock < 0)
        goto out;
    /* Under the lock, the record must still be the one we read (a new generation
     * replaces it by rename, under this same lock). */
    struct stat now;
    why = "the record changed";
    if (fstatat(dir, name, &now, AT_SYMLINK_NOFOLLOW) != 0 || now.st_ino != rst.st_ino
        || now.st_dev != rst.st_dev)
        goto out;
    why = NULL;
out:
    if (dir != j->launch)
        close(dir); /* j->launch, when it is dir, stays open for fj_add_member */
    if (why)
        return why;
    unsigned long long u = strtoull(fr_value(&j->rec, "user_ns"), NULL, 10);
    unsigned long long m = strtoull(fr_value(&j->rec, "mnt_ns"), NULL, 10);
    int found = -1;
    for (size_t i = j->rec.n; i-- > 0 && found < 0;) {
        const struct fr_line *l = &j->rec.lines[i];
        if (strcmp(fr_fields[l->field].name, "member") == 0)
            found = open_member(l->argv[0], l->argv[1], u, m, j->ns);
    }
    if (found < 0) {
        char members[600];
        snprintf(members, sizeof(members), "%s.g%s.members", fr_value(&j->rec, "stem"),
                 fr_value(&j->rec, "generation"));
        found = member_from_file(j->launch, members, u, m, j->ns);
    }
    if (found < 0)
        return "no live member (the Python launcher starts a new generation)";
    j->env = fr_run_env(&j->rec, envp);
    if (!j->env)
        return "out of memory";
    return NULL;
}

void fj_add_member(struct fj_join *j, const char *started)
{
    char members[600], line[64];
    snprintf(members, sizeof(members), "%s.g%s.members", fr_value(&j->rec, "stem"),
             fr_value(&j->rec, "generation"));
    int fd = openat(j->launch, members, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC,
                    0600);
    if (fd >= 0) {
        int n = snprintf(line, sizeof(line), "%d %s\n", (int)getpid(), started);
        if (write(fd, line, (size_t)n) != n) {
            /* the holder then waits for its idle limit: no harm */
        }
        close(fd);
    }
    close(j->lock);
    close(j->launch);
    j->lock = j->launch = -1;
}

void fj_release(struct fj_join *j)
{
    int *fds[] = { &j->launch, &j->lock, &j->ns[0], &j->ns[1] };
    for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
    fr_free_env(j->env);
    free(j->command);
    fr_free(&j->rec);
    j->env = j->command = NULL;
}

/* base.resolve_command: COMMAND in the payload's PATH (a regular file we may execute). */
const char *fj_resolve(const char *command, const char *path, int *denied)
{
    static char candidate[8192];
    char *copy = strdup(path);
    *denied = 0;
    for (char *p = copy, *save = NULL, *dir; copy && (dir = strtok_r(p, ":", &save)); p = NULL) {
        struct stat st;
        if (dir[0] != '/' ||
            snprintf(candidate, sizeof(candidate), "%s/%s", dir, command) >= (int)sizeof(candidate))
            continue;
        if (stat(candidate, &st) == 0 && S_ISREG(st.st_mode)) {
            if (access(candidate, X_OK) == 0) {
                free(copy);
                return candidate;
            }
            *denied = 1;
        }
    }
    free(copy);
    return NULL;
}

static char diag_prefix[64] = "uctr";

void fj_name_rank(long rank)
{
    snprintf(diag_prefix, sizeof(diag_prefix), "uctr[rank %ld]", rank);
}

/* Each line of TEXT, the first after LEAD, prefixed as launch.main.Diag.write does. */
static void print_lines(const char *lead, const char *text)
{
    for (const char *line = text; line;) {
        const char *nl = strchr(line, '\n');
        int len = nl ? (int)(nl - line) : (int)strlen(line);
        fprintf(stderr, "%s: %s%.*s\n", diag_prefix, lead, len, line);
        lead = "";
        line = nl ? nl + 1 : NULL;
    }
}

void fj_die(int code, const char *hint, const char *fmt, ...)
{
    va_list ap;
    char msg[8400];
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    print_lines("error: ", msg);
    if (hint && *hint)
        print_lines("hint: ", hint);
    fflush(stderr);
    _exit(code);
}
