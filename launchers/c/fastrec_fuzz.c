/* A bounded, deterministic fuzz run of the record parser, the request check and the env
 * program, built with AddressSanitizer and UBSan (no libFuzzer needed; clang's
 * -fsanitize=fuzzer can use LLVMFuzzerTestOneInput below as it is).
 *
 *   fastrec-fuzz ITERATIONS SEED FILE...    mutates the seed records FILE... ITERATIONS
 *                                           times; any memory error aborts (exit != 0)
 *
 * Mutations: flip, insert and delete bytes, duplicate and drop lines, splice two seeds,
 * insert escape sequences and separators: what a hostile or truncated record looks like. */
#define _GNU_SOURCE
#include "fastrec.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *fuzz_env[] = {
    "PATH=/usr/bin:/bin", "SLURM_JOB_ID=7", "SLURM_STEP_ID=0", "SLURM_PROCID=1",
    "PMIX_RANK=1", "PMI_FD=9", "UCTR_IMAGE=img", "OMPI_X=", "HOME=/h", "LD_LIBRARY_PATH=::a::b:a",
    "=novalue", "NOEQUALS", NULL,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fr_record rec;
    const char *why;
    if (fr_parse((const char *)data, size, &rec, &why) < 0)
        return 0;
    char *argv[] = { "--writable", "img", "--", "cmd", "arg", NULL };
    char **command;
    int n;
    for (int argc = 0; argc <= 5; argc++) {
        if (fr_match(&rec, argc, argv, fuzz_env, "/work", 1000, 1000, &command, &n, &why) == 0)
            free(command);
    }
    char **env = fr_run_env(&rec, fuzz_env);
    fr_free_env(env);
    fr_free(&rec);
    return 0;
}

static uint64_t state;

static uint64_t next(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

static const char *tokens[] = { " ", "\n", "%", "%-", "%00", "%zz", "%4", "%41", "  ", "end\n",
                                "env_join A", "member 1 2\n", "\xff", "\t" };

static size_t mutate(char *buf, size_t len, size_t cap, char **seeds, size_t *lens, int nseeds)
{
    int rounds = 1 + (int)(next() % 4);
    for (int r = 0; r < rounds; r++) {
        size_t pos = len ? next() % (len + 1) : 0;
        switch (next() % 7) {
        case 0: /* flip a byte */
            if (len)
                buf[pos % len] ^= (char)(1u << (next() % 8));
            break;
        case 1: { /* insert a token */
            const char *t = tokens[next() % (sizeof(tokens) / sizeof(tokens[0]))];
            size_t tl = strlen(t);
            if (len + tl < cap) {
                memmove(buf + pos + tl, buf + pos, len - pos);
                memcpy(buf + pos, t, tl);
                len += tl;
            }
            break;
        }
        case 2: { /* delete a span */
            size_t span = next() % 16;
            if (pos + span > len)
                span = len - pos;
            memmove(buf + pos, buf + pos + span, len - pos - span);
            len -= span;
            break;
        }
        case 3: { /* duplicate a line */
            char *nl = memchr(buf + pos, '\n', len - pos);
            size_t start = pos;
            while (start > 0 && buf[start - 1] != '\n')
                start--;
            size_t end = nl ? (size_t)(nl - buf) + 1 : len;
            size_t l = end - start;
            if (len + l < cap) {
                memmove(buf + end + l, buf + end, len - end);
                memcpy(buf + end, buf + start, l);
                len += l;
            }
            break;
        }
        case 4: /* truncate */
            len = pos;
            break;
        case 5: { /* splice the tail of another seed */
            int s = (int)(next() % (uint64_t)nseeds);
            size_t from = lens[s] ? next() % lens[s] : 0;
            size_t l = lens[s] - from;
            if (pos + l > cap)
                l = cap - pos;
            memcpy(buf + pos, seeds[s] + from, l);
            len = pos + l;
            break;
        }
        default: /* a random byte */
            if (len)
                buf[pos % len] = (char)next();
            break;
        }
    }
    return len;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: fastrec-fuzz ITERATIONS SEED FILE...\n");
        return 2;
    }
    long iterations = strtol(argv[1], NULL, 10);
    state = strtoull(argv[2], NULL, 10) | 1;
    int nseeds = argc - 3;
    char **seeds = calloc((size_t)nseeds, sizeof(char *));
    size_t *lens = calloc((size_t)nseeds, sizeof(size_t));
    size_t cap = 1 << 17;
    for (int i = 0; i < nseeds; i++) {
        FILE *f = fopen(argv[3 + i], "rb");
        if (!f) {
            perror(argv[3 + i]);
            return 2;
        }
        seeds[i] = malloc(cap);
        lens[i] = fread(seeds[i], 1, cap, f);
        fclose(f);
        LLVMFuzzerTestOneInput((const uint8_t *)seeds[i], lens[i]);
    }
    char *buf = malloc(cap);
    long accepted = 0;
    for (long it = 0; it < iterations; it++) {
        int s = (int)(next() % (uint64_t)nseeds);
        memcpy(buf, seeds[s], lens[s]);
        size_t len = mutate(buf, lens[s], cap, seeds, lens, nseeds);
        /* exact-size copy: ASan sees any read past the input */
        char *exact = malloc(len ? len : 1);
        memcpy(exact, buf, len);
        struct fr_record rec;
        const char *why;
        if (fr_parse(exact, len, &rec, &why) == 0) {
            accepted++;
            fr_free(&rec);
        }
        LLVMFuzzerTestOneInput((const uint8_t *)exact, len);
        free(exact);
    }
    printf("%ld iterations, %ld accepted\n", iterations, accepted);
    for (int i = 0; i < nseeds; i++)
        free(seeds[i]);
    free(seeds);
    free(lens);
    free(buf);
    return 0;
}
