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
 * Strings are printed hex-encoded, one token per space, so any byte compares exactly. */
#define _GNU_SOURCE
#include "fastjoin.h"
#include "fastrec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
    fprintf(stderr, "usage: fastrec-tool parse FILE... | env FILE | step PPID | "
            "match FILE CWD UID GID [ARG]... | join [ARG]... | wait MS\n");
    return 2;
}
