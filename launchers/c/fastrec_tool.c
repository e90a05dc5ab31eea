/* Test tool for the record parser (tests/unit/test_fastrec.py, tests/fuzz/test_fuzz_fastrec.py):
 * the same fastrec.c that uctr-exec runs, driven from the command line.
 *
 *   fastrec-tool parse FILE...       per file: "ok" and the lines, or "refused: WHY"
 *   fastrec-tool env FILE            the env program over this process's environment
 *   fastrec-tool step PPID           the step key and record name for this environment
 *   fastrec-tool match FILE CWD UID GID [ARG]...   the payload argv, or "no: WHY"
 *   fastrec-tool join [ARG]...       fastjoin's fj_prepare for the request uctr-exec ARG...
 *                                    from here, then fj_add_member (no setns): "joined", or
 *                                    "no: WHY"
 *   fastrec-tool wait MS             fj_watch_records, "watching" (or "no watch"), then
 *                                    fj_wait_records until MS ms passed: one line per
 *                                    answer, "1" (our record), "0" (another file), "-1"
 *
 *   fastrec-tool digest STRING       fastctr's fc_digest: the 16 hex digits
 *   fastrec-tool digest-file FILE    the same over the bytes of FILE (NULs, long inputs)
 *   fastrec-tool ns-record OUTFILE MAJOR MINOR GENERATION CREATED CREATOR HOLDER USER MNT
 *                EXTRAS [PID START]...   fc_write_ns_record into OUTFILE's directory;
 *                                    EXTRAS: a file with marshal.dumps(extras); START "-":
 *                                    None
 *   fastrec-tool holder DIR RECORD MEMBERS LOCAL_SIZE LIMIT SETUP
 *                                    fc_spawn_holder with a setup that does SETUP: "ok"
 *                                    (writes DIR/setup-ran: its pid), "publish" (that, then
 *                                    a record RECORD), "fail:MESSAGE", "hang"; prints "pid N" and "grandchild" when the
 *                                    holder is not our child, or "error: MESSAGE". An
 *                                    inherited descriptor and stdout stay open here: the
 *                                    holder must close them
 *
 * Strings are printed hex-encoded, one token per space, so any byte compares exactly. */
#define _GNU_SOURCE
#include "fastctr.h"
#include "fastjoin.h"
#include "replay.h"
#include "fastrec.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static void hex(const char *s)
{
    putchar(' ');
    if (!*s)
        putchar('-');
    for (; *s; s++)
        printf("%02x", (unsigned char)*s);
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = FR_MAX_BYTES + 2, n;
    char *buf = malloc(cap);
    n = buf ? fread(buf, 1, cap, f) : 0;
    fclose(f);
    *len = n;
    return buf;
}

static int load(const char *path, struct fr_record *rec, int quiet)
{
    size_t len;
    const char *why;
    char *data = slurp(path, &len);
    if (!data) {
        printf("refused: unreadable\n");
        return -1;
    }
    int r = fr_parse(data, len, rec, &why);
    free(data);
    if (r < 0) {
        printf("refused: %s\n", why);
        return -1;
    }
    if (!quiet)
        printf("ok\n");
    return 0;
}

/* -- fastctr ---------------------------------------------------------------------------- */

static int ns_record(int argc, char **argv)
{
    size_t extras_len;
    char *extras = slurp(argv[11], &extras_len);
    size_t n = (size_t)(argc - 12) / 2;
    struct fc_member *m = calloc(n + 1, sizeof(*m));
    if (!extras || !m)
        return 1;
    for (size_t i = 0; i < n; i++) {
        m[i].pid = strtol(argv[12 + 2 * i], NULL, 10);
        m[i].start = strcmp(argv[13 + 2 * i], "-") ? argv[13 + 2 * i] : NULL;
    }
    struct fc_ns ns = {
        .py_major = atoi(argv[3]), .py_minor = atoi(argv[4]),
        .generation = strtol(argv[5], NULL, 10), .created = strtod(argv[6], NULL),
        .creator = strtol(argv[7], NULL, 10), .holder = strtol(argv[8], NULL, 10),
        .user = strtoull(argv[9], NULL, 10), .mnt = strtoull(argv[10], NULL, 10),
        .members = m, .nmembers = n,
        .extras = (const unsigned char *)extras, .extras_len = extras_len,
    };
    char *dirc = strdup(argv[2]), *basec = strdup(argv[2]);
    int dir = dirc ? open(dirname(dirc), O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
    int r = dir >= 0 && basec ? fc_write_ns_record(dir, basename(basec), &ns) : -1;
    if (r < 0)
        perror("fc_write_ns_record");
    if (dir >= 0)
        close(dir);
    free(dirc);
    free(basec);
    free(m);
    free(extras);
    return r < 0;
}

struct setup_arg {
    int dir;
    const char *what, *record;
};

/* Runs in the holder: proves so by writing its pid where the test can read it. */
static int test_setup(void *arg, int dir, int status, char *err, size_t errlen)
{
    (void)dir;
    (void)status;
    const struct setup_arg *a = arg;
    if (strncmp(a->what, "fail:", 5) == 0) {
        snprintf(err, errlen, "%s", a->what + 5);
        return -1;
    }
    if (strcmp(a->what, "hang") == 0)
        for (;;)
            pause();
    int fd = openat(a->dir, "setup-ran", O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC,
                    0600);
    if (fd < 0) {
        snprintf(err, errlen, "setup-ran: %s", strerror(errno));
        return -1;
    }
    dprintf(fd, "%ld\n", (long)getpid());
    close(fd);
    if (strcmp(a->what, "publish") == 0) { /* the record, as a creator writes it */
        static const unsigned char none = 'N';
        struct fc_ns ns = { .holder = getpid(), .extras = &none, .extras_len = 1 };
        if (fc_write_ns_record(a->dir, a->record, &ns) < 0) {
            snprintf(err, errlen, "%s: %s", a->record, strerror(errno));
            return -1;
        }
    }
    return 0;
}

static int holder(char **argv)
{
    char err[512];
    int dir = open(argv[2], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    /* Not close-on-exec, like a lock or PMI_FD a launcher hands down: the holder must
     * not keep it (nor our stdout, a pipe the test reads to EOF). */
    int inherited = open("/dev/zero", O_RDONLY);
    if (dir < 0 || inherited < 0)
        return 1;
    struct setup_arg a = { dir, argv[7], argv[3] };
    pid_t pid = fc_spawn_holder(test_setup, &a, dir, argv[3], argv[4],
                                strtol(argv[5], NULL, 10), strtod(argv[6], NULL), err,
                                sizeof(err));
    if (pid < 0) {
        printf("error: %s\n", err);
        return 0;
    }
    printf("pid %ld\n", (long)pid);
    /* The intermediate child was reaped and the holder was never ours. */
    if (waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD)
        printf("grandchild\n");
    return 0;
}

int main(int argc, char **argv)
{
    struct fr_record rec;
    if (argc >= 3 && strcmp(argv[1], "parse") == 0) {
        for (int f = 2; f < argc; f++) {
            if (load(argv[f], &rec, 0) < 0)
                continue;
            for (size_t i = 0; i < rec.n; i++) {
                printf("%s", fr_fields[rec.lines[i].field].name);
                for (int a = 0; a < rec.lines[i].argc; a++)
                    hex(rec.lines[i].argv[a]);
                putchar('\n');
            }
            fr_free(&rec);
            printf("--\n");
        }
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "env") == 0) {
        if (load(argv[2], &rec, 1) < 0)
            return 1;
        char **env = fr_run_env(&rec, environ);
        for (char **p = env; p && *p; p++) {
            printf("var");
            hex(*p);
            putchar('\n');
        }
        fr_free_env(env);
        fr_free(&rec);
        return env ? 0 : 1;
    }
    if (argc == 3 && strcmp(argv[1], "step") == 0) {
        struct fr_rank me;
        char name[200];
        if (fr_detect(environ, strtol(argv[2], NULL, 10), &me) < 0) {
            printf("doubt\n");
            return 0;
        }
        if (fr_record_name(me.step_key, name, sizeof(name)) < 0)
            strcpy(name, "-");
        printf("%s %s %ld %ld\n", me.step_key, name, me.rank, me.size);
        return 0;
    }
    if (argc >= 6 && strcmp(argv[1], "match") == 0) {
        char **command;
        int n;
        const char *why;
        if (load(argv[2], &rec, 1) < 0)
            return 1;
        if (fr_match(&rec, argc - 6, argv + 6, environ, *argv[3] ? argv[3] : NULL,
                     strtoul(argv[4], NULL, 10), strtoul(argv[5], NULL, 10), &command, &n,
                     &why) < 0) {
            printf("no: %s\n", why);
        } else {
            printf("argv");
            for (int i = 0; i < n; i++)
                hex(command[i]);
            putchar('\n');
            free(command);
        }
        fr_free(&rec);
        return 0;
    }
    if (argc >= 4 && strcmp(argv[1], "replay") == 0) {
        /* replay NPREFIX LAUNCHER ARGS...: does a template hold for this step? */
        struct rp r;
        const char *why = rp_prepare(&r, argc - 3, argv + 3, atoi(argv[2]), environ);
        if (why) {
            printf("no: %s\n", why);
        } else {
            printf("ok %s\n", r.stem);
            rp_release(&r);
        }
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "conf-sets") == 0) {
        printf("%d\n", fj_conf_sets(argv[2], argv[3]));
        return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "join") == 0) {
        struct fj_join j = FJ_JOIN_INIT;
        const char *why = fj_prepare(&j, argc - 1, argv + 1, environ);
        if (why == fj_failed) {
            fflush(stdout);
            fj_fail_as_recorded(&j);
        }
        if (why) {
            printf("no: %s\n", why);
        } else {
            fj_add_member(&j, "1");
            printf("joined\n");
        }
        fj_release(&j);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "wait") == 0) {
        char name[160];
        int watch = fj_watch_records(environ, name, sizeof(name));
        printf("%s\n", watch >= 0 ? "watching" : "no watch");
        fflush(stdout);
        struct timespec start, now;
        clock_gettime(CLOCK_MONOTONIC, &start);
        for (long left = atol(argv[2]); left > 0;) {
            printf("%d\n", fj_wait_records(watch, name, left));
            fflush(stdout);
            clock_gettime(CLOCK_MONOTONIC, &now);
            left = atol(argv[2]) - ((now.tv_sec - start.tv_sec) * 1000
                                    + (now.tv_nsec - start.tv_nsec) / 1000000);
        }
        if (watch >= 0)
            close(watch);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "digest") == 0) {
        char out[17];
        fc_digest(argv[2], strlen(argv[2]), out);
        printf("%s\n", out);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "digest-file") == 0) {
        char out[17];
        size_t len;
        char *data = slurp(argv[2], &len);
        if (!data)
            return 1;
        fc_digest(data, len, out);
        free(data);
        printf("%s\n", out);
        return 0;
    }
    if (argc >= 12 && argc % 2 == 0 && strcmp(argv[1], "ns-record") == 0)
        return ns_record(argc, argv);
    if (argc == 8 && strcmp(argv[1], "holder") == 0)
        return holder(argv);
    fprintf(stderr, "usage: fastrec-tool parse FILE... | env FILE | step PPID | "
            "match FILE CWD UID GID [ARG]... | join [ARG]... | wait MS | digest STRING | "
            "digest-file FILE | ns-record OUTFILE ... | holder DIR RECORD MEMBERS SIZE LIMIT "
            "SETUP\n");
    return 2;
}
