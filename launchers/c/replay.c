/* The C creator (replay.h): local task 0 of a later step replays the container setup the
 * Python launcher recorded for an earlier step of the same request. Everything here runs
 * as the user; every file read is checked as the join checks its record (fastjoin.c). Any
 * doubt before the holder is up returns a reason: the task then goes through uctr-exec. */
#define _GNU_SOURCE
#include "replay.h"

#include "fastctr.h"
#include "fastjoin.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define JOB_MARK "\x01J"   /* launch/replay.py JOB and STEP */
#define STEP_MARK "\x01S"

static int is(const struct fr_line *line, const char *name)
{
    return strcmp(fr_fields[line->field].name, name) == 0;
}

static int digits(const char *s)
{
    if (!s || !*s || strlen(s) > 20)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

void rp_key(char *const *envp, const char *cwd, char *const *prefix, int nprefix,
            char out[17])
{
    const char *image = fr_getenv(envp, "UCTR_IMAGE");
    const char *parts[2] = { image ? image : "", cwd ? cwd : "/" };
    size_t len = strlen(parts[0]) + strlen(parts[1]) + 2;
    for (int i = 0; i < nprefix; i++)
        len += strlen(prefix[i]) + 1;
    char *text = malloc(len), *at = text;
    if (!text) {
        out[0] = '\0';
        return;
    }
    for (int i = 0; i < 2 + nprefix; i++) {  /* "\0".join(...) */
        const char *part = i < 2 ? parts[i] : prefix[i - 2];
        if (i)
            *at++ = '\0';
        memcpy(at, part, strlen(part));
        at += strlen(part);
    }
    fc_digest(text, (size_t)(at - text), out);
    free(text);
}

/* TEXT with every A replaced by RA and every B by RB (malloc'ed; NULL on OOM). */
static char *replace2(const char *text, const char *a, const char *ra, const char *b,
                      const char *rb)
{
    size_t la = strlen(a), lb = strlen(b), size = 1;
    for (const char *p = text; *p;) {  /* the exact size: a template line may be 1 MiB */
        if (strncmp(p, a, la) == 0) {
            size += strlen(ra);
            p += la;
        } else if (strncmp(p, b, lb) == 0) {
            size += strlen(rb);
            p += lb;
        } else {
            size++;
            p++;
        }
    }
    char *out = malloc(size), *at = out;
    if (!out)
        return NULL;
    while (*text) {
        if (strncmp(text, a, la) == 0) {
            at = stpcpy(at, ra);
            text += la;
        } else if (strncmp(text, b, lb) == 0) {
            at = stpcpy(at, rb);
            text += lb;
        } else {
            *at++ = *text++;
        }
    }
    *at = '\0';
    return out;
}

/* -- is the template this request's, and still good? ----------------------------------- */

static const char *required_value(const struct fr_record *rec, const char *name)
{
    for (size_t i = 0; i < rec->n; i++)
        if (is(&rec->lines[i], "require") && strcmp(rec->lines[i].argv[0], name) == 0)
            return rec->lines[i].argv[1];
    return NULL;
}

static int varies(const struct fr_record *rec, const char *entry)
{
    size_t len = strcspn(entry, "=");
    for (size_t i = 0; i < rec->n; i++)
        if (is(&rec->lines[i], "replay_vary") && strlen(rec->lines[i].argv[0]) == len
            && strncmp(rec->lines[i].argv[0], entry, len) == 0)
            return 1;
    return 0;
}

/* fr_match with the varying variables (the ids) at the template's values. */
static const char *same_request(struct rp *r, int argc, char **argv, char **envp,
                                const char *cwd)
{
    size_t n = 0, k = 0, nvary = 0;
    while (envp[n])
        n++;
    for (size_t i = 0; i < r->tpl.n; i++)
        nvary += is(&r->tpl.lines[i], "replay_vary");
    char **env = calloc(n + nvary + 1, sizeof(char *));
    char **owned = calloc(nvary + 1, sizeof(char *));
    const char *why = "out of memory";
    if (!env || !owned)
        goto out;
    for (size_t i = 0; i < n; i++)
        if (!varies(&r->tpl, envp[i]))
            env[k++] = envp[i];
    why = NULL;
    for (size_t i = 0, o = 0; i < r->tpl.n && !why; i++) {
        const struct fr_line *l = &r->tpl.lines[i];
        if (!is(l, "replay_vary"))
            continue;
        const char *value = required_value(&r->tpl, l->argv[0]);
        if (!value || !fr_getenv(envp, l->argv[0]))
            why = "a varying variable is not set";
        else if (asprintf(&owned[o], "%s=%s", l->argv[0], value) < 0)
            why = "out of memory";
        else
            env[k++] = owned[o++];
    }
    char **command = NULL;
    int ncommand = 0;
    if (!why)
        fr_match(&r->tpl, argc - 1, argv + 1, env, cwd, getuid(), getgid(), &command,
                 &ncommand, &why);
    const char *program = fr_value(&r->tpl, "replay_command");
    if (!why && (!program || ncommand < 1 || strcmp(command[0], program) != 0))
        why = "another program (the container was planned for the template's)";
    free(command);
out:
    for (size_t i = 0; owned && owned[i]; i++)
        free(owned[i]);
    free(owned);
    free(env);
    return why;
}

static long long ns_of(const struct timespec *t)
{
    return (long long)t->tv_sec * 1000000000LL + t->tv_nsec;
}

/* replay_stat: policy_cache.stat_rows, then and now. */
static const char *files_unchanged(const struct fr_record *rec)
{
    for (size_t i = 0; i < rec->n; i++) {
        const struct fr_line *l = &rec->lines[i];
        if (!is(l, "replay_stat"))
            continue;
        struct stat st;
        int there = stat(l->argv[0], &st) == 0;
        if (l->argc == 1 ? there : !there)
            return "a file the container depends on came or went";
        if (l->argc == 1)
            continue;
        if (l->argc != 5 || ns_of(&st.st_mtim) != atoll(l->argv[1])
            || ns_of(&st.st_ctim) != atoll(l->argv[2])
            || (long long)st.st_size != atoll(l->argv[3])
            || (unsigned long long)st.st_ino != strtoull(l->argv[4], NULL, 10))
            return "a file the container depends on changed";
    }
    return NULL;
}

/* replay_marker: staged.marker_digest, stripped. */
static const char *bundle_complete(const struct fr_record *rec)
{
    for (size_t i = 0; i < rec->n; i++) {
        const struct fr_line *l = &rec->lines[i];
        if (!is(l, "replay_marker"))
            continue;
        char buf[257];
        int fd = open(l->argv[0], O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
        ssize_t n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;
        if (fd >= 0)
            close(fd);
        if (n < 0)
            return "the bundle is not complete";
        buf[n] = '\0';
        char *start = buf + strspn(buf, " \t\r\n\v\f");
        size_t len = strlen(start);
        while (len && strchr(" \t\r\n\v\f", start[len - 1]))
            len--;
        if (len != strlen(l->argv[1]) || strncmp(start, l->argv[1], len) != 0)
            return "the bundle is not complete";
    }
    return NULL;
}

/* replay_absent_dir: this step has no PMI directory the earlier one did not have. */
static const char *no_step_dirs(const struct rp *r)
{
    for (size_t i = 0; i < r->tpl.n; i++) {
        const struct fr_line *l = &r->tpl.lines[i];
        if (!is(l, "replay_absent_dir"))
            continue;
        char *path = replace2(l->argv[0], JOB_MARK, r->job, STEP_MARK, r->step);
        struct stat st;
        int there = !path || lstat(path, &st) == 0 || errno != ENOENT;
        free(path);
        if (there)
            return "the step has directories of its own (PMI)";
    }
    return NULL;
}

/* The rendezvous stem, as sharedns.Rendezvous names it: the namespace key is recipe.digest
 * of the inputs' repr, the template's with this step's ids (replay.fill). */
static const char *make_stem(struct rp *r)
{
    char job[32], step[32], key[17], name[200];
    const char *text = fr_value(&r->tpl, "replay_nskey");
    if (!text)
        return "no namespace key";
    snprintf(job, sizeof(job), "'%s'", r->job);
    snprintf(step, sizeof(step), "'%s'", r->step);
    char *filled = replace2(text, "'\\x01J'", job, "'\\x01S'", step);
    if (!filled)
        return "out of memory";
    fc_digest(filled, strlen(filled), key);
    free(filled);
    /* fr_record_name: "fast-step-<safe key>.rec", the safe key as sharedns.safe_name */
    if (fr_record_name(r->step_key, name, sizeof(name)) < 0)
        return "cannot name the step";
    name[strlen(name) - strlen(".rec")] = '\0';
    snprintf(r->stem, sizeof(r->stem), "step-%s-%s", name + strlen("fast-step-"), key);
    return NULL;
}

/* The setup the template records: first the namespaces, last the pivot. */
static const char *ops_sane(const struct fr_record *rec)
{
    const struct fr_line *first = NULL, *last = NULL;
    for (size_t i = 0; i < rec->n; i++)
        if (is(&rec->lines[i], "replay_op")) {
            first = first ? first : &rec->lines[i];
            last = &rec->lines[i];
        }
    if (!first || strcmp(first->argv[0], "userns") != 0 || strcmp(last->argv[0], "pivot") != 0)
        return "no recorded setup";
    return NULL;
}

const char *rp_prepare(struct rp *r, int argc, char **argv, int nprefix, char **envp)
{
    const char *job = fr_getenv(envp, "SLURM_JOBID"), *step = fr_getenv(envp, "SLURM_STEP_ID");
    const char *why;
    char cwd[4096], key[17], name[64];
    struct fr_rank me;
    memset(r, 0, sizeof(*r));
    if (!digits(job) || !digits(step) || strlen(job) >= sizeof(r->job) - 2
        || strlen(step) >= sizeof(r->step) - 2)
        return "no Slurm job and step ids";
    strcpy(r->job, job);
    strcpy(r->step, step);
    if (fr_detect(envp, (long)getppid(), &me) < 0)
        return "cannot tell the step";
    snprintf(r->step_key, sizeof(r->step_key), "%s", me.step_key);
    r->rank = me.size > 1 ? me.rank : -1;
    if ((why = fj_record_dir(envp, r->dir, sizeof(r->dir))))
        return why;
    if (!getcwd(cwd, sizeof(cwd)))
        return "no working directory";
    rp_key(envp, cwd, argv + 1, nprefix, key);
    snprintf(name, sizeof(name), "fast-replay-%s.rec", key);
    snprintf(r->template_name, sizeof(r->template_name), "%s", name);
    int dir = fj_open_private_dir(AT_FDCWD, r->dir);
    if (dir < 0)
        return "no private record directory";
    size_t len = 0;
    struct stat st;
    char *data = fj_read_record(dir, name, &len, &st);
    close(dir);
    if (!data)
        return "no replay template for this request";
    r->template_ino = st.st_ino;
    int bad = fr_parse(data, len, &r->tpl, &why);
    free(data);
    if (bad)
        return why;
    const char *until = fr_value(&r->tpl, "replay_until");
    if (!fr_value(&r->tpl, "replay_key") || strcmp(fr_value(&r->tpl, "replay_key"), key) != 0
        || fr_outcome(&r->tpl) || !fr_value(&r->tpl, "replay_extras")
        || !fr_get(&r->tpl, "replay_python"))
        why = "not a replay template for this request";
    else if (!until || time(NULL) >= atoll(until))
        why = "the template expired (recipe.MAX_AGE)";
    else if (strcmp(fr_value(&r->tpl, "launch_dir"), r->dir) != 0)
        why = "the rendezvous directory is elsewhere";
    if (!why)
        why = ops_sane(&r->tpl);
    if (!why)
        why = same_request(r, argc, argv, envp, cwd);
    if (!why)
        why = files_unchanged(&r->tpl);
    if (!why)
        why = bundle_complete(&r->tpl);
    if (!why)
        why = no_step_dirs(r);
    if (!why)
        why = make_stem(r);
    if (why)
        rp_release(r);
    return why;
}

void rp_release(struct rp *r)
{
    fr_free(&r->tpl);
}

/* -- the setup, in the holder ----------------------------------------------------------- */

static int write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, text, strlen(text));
    close(fd);
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

static int mkdirs(const char *path)
{
    char buf[4096];
    if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf))
        return -1;
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0777) < 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    return mkdir(buf, 0777) < 0 && errno != EEXIST ? -1 : 0;
}

/* nsutil.remount_readonly: keep the flags the kernel locked in a user namespace */
static int remount_ro(const char *path)
{
    static const unsigned long map[][2] = {
        { ST_NOSUID, MS_NOSUID }, { ST_NODEV, MS_NODEV }, { ST_NOEXEC, MS_NOEXEC },
        { ST_NOATIME, MS_NOATIME }, { ST_NODIRATIME, MS_NODIRATIME },
        { ST_RELATIME, MS_RELATIME },
    };
    struct statvfs sv;
    if (statvfs(path, &sv) < 0)
        return -1;
    unsigned long flags = MS_BIND | MS_REMOUNT | MS_RDONLY;
    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
        if (sv.f_flag & map[i][0])
            flags |= map[i][1];
    return mount(NULL, path, NULL, flags, NULL);
}

static int enter_userns(const char *inside_uid, const char *inside_gid)
{
    char map[64];
    unsigned uid = (unsigned)getuid(), gid = (unsigned)getgid();
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) < 0 || write_file("/proc/self/setgroups", "deny"))
        return -1;
    snprintf(map, sizeof(map), "%s %u 1\n", inside_uid, uid);
    if (write_file("/proc/self/uid_map", map))
        return -1;
    snprintf(map, sizeof(map), "%s %u 1\n", inside_gid, gid);
    if (write_file("/proc/self/gid_map", map))
        return -1;
    return mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL);
}

static int exists_as(const char *path, const char *kind)
{
    struct stat st;
    if (lstat(path, &st) < 0)
        return -1;
    if (strcmp(kind, "dir") == 0 ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)) {
        errno = ENOTDIR;
        return -1;
    }
    return 0;
}

static int pivot(const char *root)
{
    if (chdir(root) < 0 || syscall(SYS_pivot_root, ".", ".") < 0
        || umount2(".", MNT_DETACH) < 0)
        return -1;
    return chdir("/");
}

static int run_op(const struct fr_line *l)
{
    const char *op = l->argv[0], *a = l->argv[1], *b = l->argc > 2 ? l->argv[2] : NULL;
    int two = l->argc == 3, three = l->argc == 4;
    if (strcmp(op, "userns") == 0 && two)
        return enter_userns(a, b);
    if (strcmp(op, "exists") == 0 && two)
        return exists_as(a, b);
    if (strcmp(op, "bind") == 0 && two)
        return mount(a, b, NULL, MS_BIND | MS_REC, NULL);
    if (strcmp(op, "ro") == 0 && l->argc == 2)
        return remount_ro(a);
    if (strcmp(op, "tmpfs") == 0 && three)
        return mount("tmpfs", a, "tmpfs", strtoul(b, NULL, 10), l->argv[3]);
    if (strcmp(op, "mkdir") == 0 && l->argc == 2)
        return mkdirs(a);
    if (strcmp(op, "touch") == 0 && l->argc == 2) {
        int fd = open(a, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        return fd < 0 ? -1 : close(fd);
    }
    if (strcmp(op, "symlink") == 0 && two)
        return symlink(a, b);
    if (strcmp(op, "pivot") == 0 && l->argc == 2)
        return pivot(a);
    errno = EINVAL;
    return -1;
}

static int setup(void *arg, int dir, int status, char *err, size_t errlen)
{
    const struct rp *r = arg;
    (void)dir;
    (void)status;
    for (size_t i = 0; i < r->tpl.n; i++) {
        const struct fr_line *l = &r->tpl.lines[i];
        if (is(l, "replay_op") && run_op(l) < 0) {
            snprintf(err, errlen, "%s %s: %s", l->argv[0], l->argv[1], strerror(errno));
            return -1;
        }
    }
    return 0;
}

/* The holder replays the setup in a program of its own: forked from slurmstepd's task, it
 * holds a copy of slurmstepd's memory (on Slurm >= 23.11 with auth/slurm, the cluster's
 * key), which is why the kernel made it non-dumpable after the switch to the user's ids;
 * non-dumpable, it cannot write its own id maps (its /proc files are root's). An exec of
 * the C front (a user program, nothing set-uid) leaves that memory behind: the holder is
 * an ordinary process of the user, which maps its ids as the Python launcher does. */
struct holder_exec {
    const char *front, *record, *members;
    const struct rp *r;
    long local_size;
    double limit;
};

static int exec_holder(void *arg, int dir, int status, char *err, size_t errlen)
{
    const struct holder_exec *h = arg;
    char fds[2][16], ino[24], size[24], limit[32];
    snprintf(fds[0], sizeof(fds[0]), "%d", status);
    snprintf(fds[1], sizeof(fds[1]), "%d", dir);
    snprintf(ino, sizeof(ino), "%llu", (unsigned long long)h->r->template_ino);
    snprintf(size, sizeof(size), "%ld", h->local_size);
    snprintf(limit, sizeof(limit), "%.0f", h->limit);
    char *argv[] = { (char *)"uctr-exec", (char *)RP_HOLDER_FLAG, fds[0], fds[1],
                     (char *)h->r->template_name, ino, (char *)h->record, (char *)h->members,
                     size, limit, NULL };
    char *envp[] = { NULL };
    if (fcntl(dir, F_SETFD, 0) < 0 || fcntl(status, F_SETFD, 0) < 0)
        goto fail;
    execve(h->front, argv, envp);
fail:
    snprintf(err, errlen, "cannot start %s as the holder: %s", h->front, strerror(errno));
    return -1;
}

void rp_holder_main(int argc, char **argv)
{
    /* uctr-exec RP_HOLDER_FLAG STATUS DIR TEMPLATE INODE RECORD MEMBERS LOCAL-SIZE LIMIT */
    struct rp r;
    memset(&r, 0, sizeof(r));
    if (argc != 10)
        _exit(2);
    int status = atoi(argv[2]), dir = atoi(argv[3]);
    fcntl(status, F_SETFD, FD_CLOEXEC);
    fcntl(dir, F_SETFD, FD_CLOEXEC);
    size_t len = 0;
    struct stat st;
    const char *why = NULL;
    char *data = fj_read_record(dir, argv[4], &len, &st);
    if (!data || (unsigned long long)st.st_ino != strtoull(argv[5], NULL, 10))
        why = "the replay template changed";
    else if (fr_parse(data, len, &r.tpl, &why) == 0)
        why = ops_sane(&r.tpl);
    free(data);
    if (why) {
        if (write(status, why, strlen(why)) < 0) {
            /* the creator reads EOF: "exited during its setup" */
        }
        _exit(1);
    }
    fc_hold(dir, status, argv[6], argv[7], atol(argv[8]), atof(argv[9]), setup, &r);
}

/* -- the step's records ------------------------------------------------------------------ */

/* fastrec.encode: bytes outside '!'..'~' and '%' as %XX, the empty string as %- */
static void put_token(struct fc_buf *b, const char *s)
{
    char esc[4];
    fc_put(b, " ", 1);
    if (!*s)
        fc_put(b, "%-", 2);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p >= 0x21 && *p <= 0x7e && *p != '%') {
            fc_put(b, (const char *)p, 1);
        } else {
            snprintf(esc, sizeof(esc), "%%%02X", *p);
            fc_put(b, esc, 3);
        }
    }
}

static void put_line(struct fc_buf *b, const char *name, int argc, const char *const *argv)
{
    fc_put(b, name, strlen(name));
    for (int i = 0; i < argc; i++)
        put_token(b, argv[i]);
    fc_put(b, "\n", 1);
}

/* The template's record lines for this step: its ids, stem, namespaces and holder. */
static void step_record(const struct rp *r, char **envp, const char *holder,
                        const char *started, const char *user, const char *mnt,
                        struct fc_buf *b)
{
    int member_done = 0;
    for (size_t i = 0; i < r->tpl.n; i++) {
        const struct fr_line *l = &r->tpl.lines[i];
        const char *name = fr_fields[l->field].name;
        const char *value = NULL;
        if (strncmp(name, "replay_", 7) == 0)
            continue;
        if (strcmp(name, "step") == 0)
            value = r->step_key;
        else if (strcmp(name, "stem") == 0)
            value = r->stem;
        else if (strcmp(name, "generation") == 0)
            value = "1";
        else if (strcmp(name, "user_ns") == 0)
            value = user;
        else if (strcmp(name, "mnt_ns") == 0)
            value = mnt;
        if (value) {
            put_line(b, name, 1, &value);
        } else if (strcmp(name, "member") == 0) {
            const char *pair[2] = { holder, started };
            if (!member_done++)
                put_line(b, name, 2, pair);
        } else if (strcmp(name, "require") == 0 && varies(&r->tpl, l->argv[0])) {
            const char *pair[2] = { l->argv[0], fr_getenv(envp, l->argv[0]) };
            put_line(b, name, 2, pair);
        } else {
            put_line(b, name, l->argc, (const char *const *)l->argv);
        }
    }
}

static unsigned char *unhex(const char *hex, size_t *len)
{
    size_t n = strlen(hex) / 2;
    unsigned char *out = malloc(n + 1);
    for (size_t i = 0; out && i < n; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) {
            free(out);
            return NULL;
        }
        out[i] = (unsigned char)v;
    }
    *len = n;
    return out;
}

/* The injection manifest of the step, where another container's replaced it. */
static void put_manifest(const struct fr_record *tpl)
{
    const struct fr_line *m = fr_get(tpl, "replay_manifest");
    size_t len = 0;
    unsigned char *want = m ? unhex(m->argv[1], &len) : NULL;
    if (!want)
        return;
    char now[1 << 16];
    int fd = open(m->argv[0], O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    ssize_t n = fd >= 0 ? read(fd, now, sizeof(now)) : -1;
    if (fd >= 0)
        close(fd);
    if (n != (ssize_t)len || memcmp(now, want, len) != 0) {
        char dir[4096];
        snprintf(dir, sizeof(dir), "%s", m->argv[0]);
        char *slash = strrchr(dir, '/');
        if (slash) {
            *slash = '\0';
            int d = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (d >= 0) {
                fc_write_file(d, slash + 1, want, len);  /* as Python: a warning at most */
                close(d);
            }
        }
    }
    free(want);
}

static const char *publish(struct rp *r, int dir, char **envp, pid_t holder)
{
    char pid[24], started[32], user[24], mnt[24], path[64], name[700];
    struct stat us, ms;
    snprintf(pid, sizeof(pid), "%d", (int)holder);
    snprintf(path, sizeof(path), "/proc/%d/ns/user", (int)holder);
    if (stat(path, &us) < 0)
        return "the holder is gone";
    snprintf(path, sizeof(path), "/proc/%d/ns/mnt", (int)holder);
    if (stat(path, &ms) < 0 || fj_start_time(pid, started, sizeof(started)) < 0)
        return "the holder is gone";
    snprintf(user, sizeof(user), "%llu", (unsigned long long)us.st_ino);
    snprintf(mnt, sizeof(mnt), "%llu", (unsigned long long)ms.st_ino);
    size_t extras_len = 0;
    unsigned char *extras = unhex(fr_value(&r->tpl, "replay_extras"), &extras_len);
    if (!extras)
        return "bad extras";
    const struct fr_line *py = fr_get(&r->tpl, "replay_python");
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct fc_member member = { .pid = holder, .start = started };
    struct fc_ns ns = {
        .py_major = atoi(py->argv[0]), .py_minor = atoi(py->argv[1]), .generation = 1,
        .created = (double)tv.tv_sec + tv.tv_usec / 1e6, .creator = holder, .holder = holder,
        .user = us.st_ino, .mnt = ms.st_ino, .members = &member, .nmembers = 1,
        .extras = extras, .extras_len = extras_len,
    };
    snprintf(name, sizeof(name), "%s.ns", r->stem);
    int failed = fc_write_ns_record(dir, name, &ns);
    free(extras);
    if (failed)
        return "cannot write the rendezvous record";
    put_manifest(&r->tpl);
    struct fc_buf b = { 0 };
    step_record(r, envp, pid, started, user, mnt, &b);
    char record[200];
    if (b.oom || fr_record_name(r->step_key, record, sizeof(record)) < 0
        || fc_write_file(dir, record, b.p, b.n) < 0) {
        free(b.p);
        unlinkat(dir, name, 0);
        return "cannot write the fast-join record";
    }
    free(b.p);
    fj_touch_seen(dir);
    return NULL;
}

static void warn_as_python(const struct rp *r)
{
    char prefix[48] = "uctr";
    if (r->rank >= 0)
        snprintf(prefix, sizeof(prefix), "uctr[rank %ld]", r->rank);
    for (size_t i = 0; i < r->tpl.n; i++)
        if (is(&r->tpl.lines[i], "replay_warning"))
            fprintf(stderr, "%s: warning: %s\n", prefix, r->tpl.lines[i].argv[0]);
}

const char *rp_create(struct rp *r, long local_size, char **envp, const char *front)
{
    const char *why = NULL;
    char name[700], record[700], members[700], err[512];
    int lock = -1, dir = fj_open_private_dir(AT_FDCWD, r->dir);
    if (dir < 0) {
        why = "no private record directory";
        goto out;
    }
    /* the step's lock, as the Python creator takes it: no second container for the step */
    snprintf(name, sizeof(name), "%s.lock", r->stem);
    lock = openat(dir, name, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (lock < 0 || flock(lock, LOCK_EX | LOCK_NB) < 0) {
        why = "the step's lock is busy";
        goto out;
    }
    struct stat st;
    snprintf(record, sizeof(record), "%s.ns", r->stem);
    if (fstatat(dir, record, &st, AT_SYMLINK_NOFOLLOW) == 0) {
        why = "the step has a container already";
        goto out;
    }
    snprintf(members, sizeof(members), "%s.g1.members", r->stem);
    /* in use before it is mounted, as the Python creator marks it (staged.ensure): quota
     * eviction never takes a root filesystem a container is being made of */
    const char *inuse = fr_value(&r->tpl, "inuse_dir");
    if (inuse)
        fj_mark_in_use(inuse);
    const char *limit = fr_value(&r->tpl, "replay_limit");
    struct holder_exec h = { front, record, members, r, local_size,
                             limit ? atof(limit) : 600.0 };
    pid_t holder = fc_spawn_holder(exec_holder, &h, dir, record, members, local_size,
                                   h.limit, err, sizeof(err));
    if (holder < 0) {
        static char failed[600];  /* a task is one process: the message outlives r */
        snprintf(failed, sizeof(failed), "the replayed setup failed: %s", err);
        why = failed;
        goto out;
    }
    why = publish(r, dir, envp, holder);
    if (why)
        kill(holder, SIGKILL);
    else
        warn_as_python(r);
out:
    if (lock >= 0)
        close(lock);
    if (dir >= 0)
        close(dir);
    rp_release(r);
    return why;
}
