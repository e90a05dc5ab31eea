/* Creating a job step's N1 container from C (fastctr.h): the digest of recipe.digest and
 * sharedns.ns_key, the step's namespace record as sharedns.Rendezvous.publish marshals it,
 * and the holder of sharedns.spawn_holder. Everything the holder runs after fork is plain
 * system calls (no malloc, no stdio): the SPANK plugin forks it from a threaded slurmstepd. */
#define _GNU_SOURCE
#include "fastctr.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* -- the digest ------------------------------------------------------------------------ */

/* zlib's CRC-32 (reflected 0xEDB88320), four bits at a time: a 16-entry constant table, so
 * nothing is built at run time (no lazy init to race on in a threaded caller). */
static uint32_t crc32_ieee(const unsigned char *p, size_t len)
{
    static const uint32_t nibble[16] = {
        0x00000000, 0x1DB71064, 0x3B6E20C8, 0x26D930AC, 0x76DC4190, 0x6B6B51F4,
        0x4DB26158, 0x5005713C, 0xEDB88320, 0xF00F9344, 0xD6D6A3E8, 0xCB61B38C,
        0x9B64C2B0, 0x86D3D2D4, 0xA00AE278, 0xBDBDF21C,
    };
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++) {
        crc = (crc >> 4) ^ nibble[(crc ^ p[i]) & 0xF];
        crc = (crc >> 4) ^ nibble[(crc ^ (p[i] >> 4)) & 0xF];
    }
    return crc ^ 0xFFFFFFFFu;
}

/* zlib's Adler-32; the modulo every 5552 bytes (zlib's NMAX) keeps b within 32 bits. */
static uint32_t adler32(const unsigned char *p, size_t len)
{
    uint32_t a = 1, b = 0;
    while (len > 0) {
        size_t n = len < 5552 ? len : 5552;
        len -= n;
        while (n--) {
            a += *p++;
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    return (b << 16) | a;
}

void fc_digest(const char *data, size_t len, char out[17])
{
    const unsigned char *p = (const unsigned char *)data;
    snprintf(out, 17, "%08x%08x", (unsigned)crc32_ieee(p, len), (unsigned)adler32(p, len));
}

/* -- the record (marshal version 4) ----------------------------------------------------- */

/* Nothing written here has FLAG_REF (0x80) set. marshal.loads numbers the objects that
 * carry the flag in the order it meets them, and a back-reference ('r' + index) names one
 * by that number. The extras blob is a whole marshal.dumps() output, its indices counted
 * from 0 at its own first flagged object: embedded after objects without the flag, its
 * references still name the objects they named in the blob. */
void fc_put(struct fc_buf *b, const void *data, size_t len)
{
    if (b->oom)
        return;
    if (len > b->cap - b->n) {
        size_t cap = b->cap ? b->cap : 256;
        while (len > cap - b->n) {
            if (cap > SIZE_MAX / 2) {
                b->oom = 1;
                return;
            }
            cap *= 2;
        }
        unsigned char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, data, len);
    b->n += len;
}

static void w_byte(struct fc_buf *b, unsigned char c)
{
    fc_put(b, &c, 1);
}

static void w_i32(struct fc_buf *b, int32_t v)
{
    uint32_t u = (uint32_t)v;
    unsigned char le[4] = { u & 0xFF, (u >> 8) & 0xFF, (u >> 16) & 0xFF, u >> 24 };
    fc_put(b, le, 4);
}

/* TYPE_LONG: a signed count of 15-bit digits (negative for a negative number), then the
 * digits, least significant first, as 16-bit little-endian; marshal.loads refuses a zero
 * top digit, so the count is exact. */
static void w_biglong(struct fc_buf *b, unsigned long long mag, int negative)
{
    unsigned char digits[2 * 6]; /* 64 bits: at most 5 digits of 15 bits */
    int32_t n = 0;
    for (; mag; mag >>= 15, n++) {
        digits[2 * n] = mag & 0xFF;
        digits[2 * n + 1] = (mag >> 8) & 0x7F;
    }
    w_byte(b, 'l');
    w_i32(b, negative ? -n : n);
    fc_put(b, digits, 2 * (size_t)n);
}

/* As marshal writes an int: TYPE_INT when it fits 32 bits, else TYPE_LONG. */
static void w_int(struct fc_buf *b, long long v)
{
    if (v >= INT32_MIN && v <= INT32_MAX) {
        w_byte(b, 'i');
        w_i32(b, (int32_t)v);
    } else if (v < 0) {
        w_biglong(b, 0ULL - (unsigned long long)v, 1);
    } else {
        w_biglong(b, (unsigned long long)v, 0);
    }
}

static void w_uint(struct fc_buf *b, unsigned long long v)
{
    if (v <= INT32_MAX)
        w_int(b, (long long)v);
    else
        w_biglong(b, v, 0);
}

static int is_ascii(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] >= 0x80)
            return 0;
    return 1;
}

/* A str: short ascii ('z', or 'Z' interned, for keys), ascii, or UTF-8 ('u') otherwise. */
static void w_str(struct fc_buf *b, const char *s, int interned)
{
    size_t len = strlen(s);
    if (len > INT32_MAX) {
        b->oom = 1;
        return;
    }
    if (is_ascii(s, len) && len < 256) {
        w_byte(b, interned ? 'Z' : 'z');
        w_byte(b, (unsigned char)len);
    } else {
        w_byte(b, is_ascii(s, len) ? 'a' : 'u');
        w_i32(b, (int32_t)len);
    }
    fc_put(b, s, len);
}

static void w_key(struct fc_buf *b, const char *key)
{
    w_str(b, key, 1);
}

/* TYPE_BINARY_FLOAT: the IEEE 754 double, little-endian. */
static void w_float(struct fc_buf *b, double d)
{
    uint64_t u;
    unsigned char le[8];
    memcpy(&u, &d, sizeof(u));
    for (int i = 0; i < 8; i++)
        le[i] = (u >> (8 * i)) & 0xFF;
    w_byte(b, 'g');
    fc_put(b, le, 8);
}

static void w_members(struct fc_buf *b, const struct fc_member *m, size_t n)
{
    if (n > INT32_MAX) {
        b->oom = 1;
        return;
    }
    w_byte(b, '[');
    w_i32(b, (int32_t)n);
    for (size_t i = 0; i < n; i++) {
        w_byte(b, ')');     /* small tuple */
        w_byte(b, 2);
        w_int(b, m[i].pid);
        if (m[i].start)
            w_str(b, m[i].start, 0);
        else
            w_byte(b, 'N');
    }
}

unsigned char *fc_ns_record(const struct fc_ns *ns, size_t *len)
{
    struct fc_buf b = { 0 };
    w_byte(&b, '{');
    w_key(&b, "format");
    w_int(&b, 1);           /* sharedns.RECORD_FORMAT */
    w_key(&b, "python");
    w_byte(&b, ')');
    w_byte(&b, 2);
    w_int(&b, ns->py_major);
    w_int(&b, ns->py_minor);
    w_key(&b, "generation");
    w_int(&b, ns->generation);
    w_key(&b, "created");
    w_float(&b, ns->created);
    w_key(&b, "creator");
    w_int(&b, ns->creator);
    w_key(&b, "holder");
    if (ns->holder > 0)
        w_int(&b, ns->holder);
    else
        w_byte(&b, 'N');
    w_key(&b, "user");
    w_uint(&b, ns->user);
    w_key(&b, "mnt");
    w_uint(&b, ns->mnt);
    w_key(&b, "members");
    w_members(&b, ns->members, ns->nmembers);
    w_key(&b, "extras");
    fc_put(&b, ns->extras, ns->extras_len);
    w_byte(&b, '0');        /* TYPE_NULL: the end of the dict */
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    *len = b.n;
    return b.p;
}

static int write_all(int fd, const void *data, size_t len)
{
    const char *p = data;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* nodelock.write_marshal: readers see the old record or the new one, never a part. */
int fc_write_file(int dir_fd, const char *name, const void *data, size_t len)
{
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof(tmp), "%s.%ld.tmp", name, (long)getpid()) >= (int)sizeof(tmp)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int fd = openat(dir_fd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    int r = fd < 0 ? -1 : write_all(fd, data, len);
    if (fd >= 0 && close(fd) < 0)
        r = -1;
    if (r == 0 && renameat(dir_fd, tmp, dir_fd, name) == 0)
        return 0;
    int saved = errno;
    if (fd >= 0)
        unlinkat(dir_fd, tmp, 0);   /* Python leaves it; nobody else would remove it */
    errno = saved;
    return -1;
}

int fc_write_ns_record(int dir_fd, const char *name, const struct fc_ns *ns)
{
    size_t len;
    unsigned char *data = fc_ns_record(ns, &len);
    if (!data) {
        errno = ENOMEM;
        return -1;
    }
    int r = fc_write_file(dir_fd, name, data, len);
    int saved = errno;
    free(data);
    errno = saved;
    return r;
}

/* -- the holder ------------------------------------------------------------------------ */

static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Is PID (ASCII digits) alive with start time STARTED? sharedns.start_time(pid) == started:
 * field 22 of /proc/PID/stat, which tells a reused pid from the member. */
static int started_as(const char *pid, size_t pidlen, const char *started, size_t len)
{
    char path[64] = "/proc/", buf[1024];
    if (pidlen > 20)
        return 0;
    memcpy(path + 6, pid, pidlen);
    memcpy(path + 6 + pidlen, "/stat", 6);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (!p)
        return 0;
    p++;
    for (int field = 0; field < 19; field++) { /* skip state .. field 21 */
        p += strspn(p, " ");
        p += strcspn(p, " ");
    }
    p += strspn(p, " ");
    return strcspn(p, " \n") == len && memcmp(p, started, len) == 0;
}

/* What bytes.split() splits on. */
static int is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* One line of a members file, as _read_members takes it: two words, the first digits.
 * *alive: set when asked (ALIVE non-NULL) and its process is the recorded one. */
static int member_line(const char *line, size_t len, int *alive)
{
    const char *w[3];
    size_t wl[3];
    int words = 0;
    for (size_t i = 0; i < len && words < 3;) {
        while (i < len && is_ws(line[i]))
            i++;
        if (i >= len)
            break;
        w[words] = line + i;
        while (i < len && !is_ws(line[i]))
            i++;
        wl[words] = (size_t)(line + i - w[words]);
        words++;
    }
    if (words != 2)
        return 0;
    for (size_t i = 0; i < wl[0]; i++)
        if (w[0][i] < '0' || w[0][i] > '9')
            return 0;
    if (alive && !*alive)
        *alive = started_as(w[0], wl[0], w[1], wl[1]);
    return 1;
}

#define MEMBERS_MAX (1 << 20)   /* what _read_members reads */
#define LINE_MAX_ 256           /* longer lines are no "PID START" (Python would still count
                                 * two long words; nobody writes them) */

/* The members in NAME (the holder is never one of them), and, when ALIVE is non-NULL,
 * whether one of them is still running. Read in pieces on the stack: no malloc here. */
static long count_members(int dir, const char *name, int *alive)
{
    char chunk[4096], line[LINE_MAX_];
    size_t used = 0, total = 0;
    int overlong = 0;
    long count = 0;
    int fd = openat(dir, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return 0;
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof(chunk));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || total >= MEMBERS_MAX)
            break;
        if ((size_t)n > MEMBERS_MAX - total)
            n = (ssize_t)(MEMBERS_MAX - total);
        total += (size_t)n;
        for (ssize_t i = 0; i < n; i++) {
            if (chunk[i] == '\n') {
                count += !overlong && member_line(line, used, alive);
                used = 0;
                overlong = 0;
            } else if (used < sizeof(line)) {
                line[used++] = chunk[i];
            } else {
                overlong = 1;
            }
        }
    }
    close(fd);
    if (used)   /* the last line without its newline counts as in Python */
        count += !overlong && member_line(line, used, alive);
    return count;
}

/* The record as the holder saw it; ino 0 and present 0 when it was missing. */
struct seen {
    int present;
    dev_t dev;
    ino_t ino;
};

static struct seen look(int dir, const char *name)
{
    struct stat st;
    struct seen s = { 0 };
    if (fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW) == 0) {
        s.present = 1;
        s.dev = st.st_dev;
        s.ino = st.st_ino;
    }
    return s;
}

static int same(struct seen a, struct seen b)
{
    return a.present == b.present && (!a.present || (a.dev == b.dev && a.ino == b.ino));
}

/* _holder_main's loop. BEFORE: the record as it was before the setup (missing, or the
 * previous generation's): the first record that replaces it is ours (written by the
 * creator after the setup, or by the setup itself); it must come within
 * FC_HOLDER_RECORD_GRACE, and once it is replaced or removed, a new generation took over.
 * (An inode number cannot come back at once: the new record is written beside the old.) */
static void hold(int dir, const char *record, const char *members, long local_size,
                 double limit, struct seen before)
{
    const struct timespec poll_ = { 0, FC_HOLDER_POLL_NS };
    double idle_limit = local_size > 0 ? FC_HOLDER_IDLE_KNOWN : FC_HOLDER_IDLE_UNKNOWN;
    double started = monotonic(), last_change = started;
    struct seen ours = { 0 };
    int published = 0;
    long seen = 0;
    for (;;) {
        nanosleep(&poll_, NULL);
        double now = monotonic();
        struct seen s = look(dir, record);
        if (!published) {
            if (same(s, before) || !s.present) {
                if (now - started > FC_HOLDER_RECORD_GRACE)
                    return;     /* never published */
                continue;
            }
            ours = s;
            published = 1;
        } else if (!same(s, ours)) {
            return;             /* replaced or removed: not ours any more */
        }
        long count = count_members(dir, members, NULL);
        if (local_size > 0 && count >= local_size)
            return;
        if (count != seen) {
            seen = count;
            last_change = now;
        }
        double idle = now - last_change;
        if (idle > idle_limit || now - started > limit)
            return;
        int alive = 0;
        if (idle > FC_HOLDER_IDLE_UNKNOWN) {
            count_members(dir, members, &alive);
            if (!alive)
                return;         /* every task that joined is gone, nobody new came */
        }
    }
}

#ifndef SYS_close_range
#ifdef __NR_close_range
#define SYS_close_range __NR_close_range
#endif
#endif

/* close_range(2) (Linux 5.9); -1 when the kernel or the headers lack it. */
static int close_span(unsigned first, unsigned last)
{
    if (first > last)
        return 0;
#ifdef SYS_close_range
    return (int)syscall(SYS_close_range, first, last, 0);
#else
    errno = ENOSYS;
    return -1;
#endif
}

struct dirent64_ {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* Without close_range: the descriptors /proc/self/fd lists (getdents64, no malloc), else
 * every number below the descriptor limit (capped: a huge limit would take seconds). */
static void close_listed(int keep1, int keep2)
{
    char buf[4096];
    int dfd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) {
        struct rlimit rl;
        long max = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 65536
            ? (long)rl.rlim_cur : 65536;
        for (int fd = 3; fd < max; fd++)
            if (fd != keep1 && fd != keep2)
                close(fd);
        return;
    }
    long n;
    while ((n = syscall(SYS_getdents64, dfd, buf, sizeof(buf))) > 0) {
        for (long off = 0; off < n;) {
            struct dirent64_ *d = (struct dirent64_ *)(buf + off);
            char *end;
            long fd = strtol(d->d_name, &end, 10);
            if (*end == '\0' && end != d->d_name && fd > 2 && fd != keep1 && fd != keep2 &&
                fd != dfd)
                close((int)fd);
            off += d->d_reclen;
        }
    }
    close(dfd);
}

/* Keep no inherited descriptor (the step lock, srun's stdio pipes, PMI_FD...): its open
 * copy would outlive the caller, and holding a pipe open hangs whoever reads it. */
static void close_others(int keep1, int keep2)
{
    unsigned lo = (unsigned)(keep1 < keep2 ? keep1 : keep2);
    unsigned hi = (unsigned)(keep1 < keep2 ? keep2 : keep1);
    if (close_span(3, lo - 1) < 0 || close_span(lo + 1, hi - 1) < 0 ||
        close_span(hi + 1, ~0U) < 0)
        close_listed(keep1, keep2);
}

/* The caller's signal handlers are its code, not the holder's (slurmstepd's in the SPANK
 * plugin): back to the default as exec would; ignored signals stay ignored, as for the
 * Python holder. Blocked signals are unblocked so that the step's SIGTERM ends it. */
static void reset_signals(void)
{
    sigset_t none;
    sigemptyset(&none);
    for (int sig = 1; sig < NSIG; sig++) {
        struct sigaction sa;
        if (sig == SIGKILL || sig == SIGSTOP || sigaction(sig, NULL, &sa) < 0)
            continue;
        if (!(sa.sa_flags & SA_SIGINFO) && (sa.sa_handler == SIG_DFL || sa.sa_handler == SIG_IGN))
            continue;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = SIG_DFL;
        sigaction(sig, &sa, NULL);
    }
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* A descriptor numbered 3 or above: 0-2 become /dev/null. -1 on failure. */
static int above_stdio(int fd)
{
    return fd > 2 ? fd : fcntl(fd, F_DUPFD_CLOEXEC, 3);
}

static void copy_msg(char *dst, size_t size, const char *src)
{
    if (size == 0)
        return;
    size_t n = strlen(src);
    if (n >= size)
        n = size - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

struct holder_args {
    fc_setup_fn *setup;
    void *arg;
    int dir;
    const char *record, *members;
    long local_size;
    double limit;
};

static void holder_main(const struct holder_args *a, int status)
    __attribute__((noreturn));

static void holder_main(const struct holder_args *a, int status)
{
    int dir = above_stdio(a->dir);
    status = above_stdio(status);
    reset_signals();
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (dir < 0 || status < 0 || null < 0)
        _exit(1);   /* the caller reads EOF: "exited during its setup" */
    for (int fd = 0; fd < 3; fd++)
        dup2(null, fd);
    close_others(dir, status);
    fc_hold(dir, status, a->record, a->members, a->local_size, a->limit, a->setup, a->arg);
}

void fc_hold(int dir, int status, const char *record, const char *members, long local_size,
             double limit, fc_setup_fn *setup, void *arg)
{
    char msg[1024] = "";
    struct seen before = look(dir, record);
    if (setup && setup(arg, dir, status, msg, sizeof(msg)) != 0) {
        if (!msg[0])
            copy_msg(msg, sizeof(msg), "the namespace setup failed");
        msg[sizeof(msg) - 1] = '\0';
        write_all(status, msg, strlen(msg));
        _exit(1);
    }
    write_all(status, "ok", 2);
    close(status);
    hold(dir, record, members, local_size, limit, before);
    _exit(0);
}

/* The intermediate child: fork the holder, tell the caller its pid (and errno on failure)
 * through PIDW, exit; the holder is re-parented at once. */
static void intermediate(const struct holder_args *a, int pidw, int statusw)
    __attribute__((noreturn));

static void intermediate(const struct holder_args *a, int pidw, int statusw)
{
    int report[2];
    pid_t holder = fork();
    if (holder == 0) {
        close(pidw);
        holder_main(a, statusw);
    }
    report[0] = (int)holder;
    report[1] = holder < 0 ? errno : 0;
    write_all(pidw, report, sizeof(report));
    _exit(holder < 0);
}

static ssize_t read_full(int fd, void *data, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, (char *)data + got, len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    return (ssize_t)got;
}

/* The holder's status until it closes the pipe (all of the setup's children too: the pipe
 * is close-on-exec, a forked helper holds it until it exits). 1 done, 0 timed out. */
static int read_status(int fd, double limit, char *out, size_t size, size_t *len)
{
    double deadline = monotonic() + limit;
    char chunk[512];
    *len = 0;
    for (;;) {
        int ms = -1;
        if (limit > 0) {
            double left = deadline - monotonic();
            if (left <= 0)
                return 0;
            ms = left > 1e6 ? 1000000000 : (int)(left * 1000) + 1;
        }
        struct pollfd p = { .fd = fd, .events = POLLIN };
        int r = poll(&p, 1, ms);
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0)
            continue;   /* the deadline check above ends it */
        ssize_t n = r < 0 ? -1 : read(fd, chunk, sizeof(chunk));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return 1;
        for (ssize_t i = 0; i < n && *len + 1 < size; i++)
            out[(*len)++] = chunk[i];
    }
}

pid_t fc_spawn_holder(fc_setup_fn *setup, void *arg,
                      int dir_fd, const char *record_name, const char *members_name,
                      long local_size, double limit, char *err, size_t errlen)
{
    const struct holder_args a = { setup, arg, dir_fd, record_name, members_name,
                                   local_size, limit };
    int pidp[2], statp[2], report[2] = { -1, 0 };
    if (pipe2(pidp, O_CLOEXEC) < 0)
        goto sys_fail;
    if (pipe2(statp, O_CLOEXEC) < 0) {
        int saved = errno;
        close(pidp[0]);
        close(pidp[1]);
        errno = saved;
        goto sys_fail;
    }
    pid_t mid = fork();
    if (mid == 0) {
        close(pidp[0]);
        close(statp[0]);
        intermediate(&a, pidp[1], statp[1]);
    }
    int fork_errno = errno;
    close(pidp[1]);
    close(statp[1]);
    if (mid > 0) {
        if (read_full(pidp[0], report, sizeof(report)) != sizeof(report))
            report[0] = -1;
        while (waitpid(mid, NULL, 0) < 0 && errno == EINTR)
            ;
    } else {
        report[1] = fork_errno;
    }
    close(pidp[0]);
    if (report[0] <= 0) {
        close(statp[0]);
        errno = report[1] ? report[1] : ECHILD;
        goto sys_fail;
    }
    char msg[1024];
    size_t len;
    int done = read_status(statp[0], limit, msg, sizeof(msg), &len);
    close(statp[0]);
    msg[len] = '\0';
    if (done && strcmp(msg, "ok") == 0)
        return (pid_t)report[0];
    if (!done) {
        kill((pid_t)report[0], SIGKILL);
        snprintf(err, errlen, "the namespace setup of this job step did not finish within "
                 "%.0f s", limit);
    } else {
        copy_msg(err, errlen, len ? msg : "the namespace holder of this job step exited "
                 "during its setup");
    }
    return -1;
sys_fail:
    snprintf(err, errlen, "cannot start the namespace holder of this job step: %s",
             strerror(errno));
    return -1;
}
