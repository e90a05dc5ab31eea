/* The fast-join record (launchers/c/record.md): parser, request checks and the environment
 * program. Pure functions on memory and an environment array: no file system access, so
 * the fuzz driver and the test tool exercise exactly what uctr-exec runs. */
#ifndef FASTREC_H_INCLUDED
#define FASTREC_H_INCLUDED

#include <stddef.h>

#define FR_VERSION "1"
#define FR_MAX_BYTES (1 << 20)
#define FR_MAX_LINES 65536

/* CONT: exactly once in a container record, never in an outcome record. */
enum fr_how { ONCE, OPT, MANY, CONT };

struct fr_field {
    const char *name;
    int least, most;
    enum fr_how how;
};

extern const struct fr_field fr_fields[];
extern const size_t fr_nfields;

struct fr_line {
    int field;      /* index into fr_fields */
    int argc;
    char **argv;    /* decoded, NUL-terminated */
};

struct fr_record {
    struct fr_line *lines;
    size_t n;
};

/* Parse DATA (LEN bytes). 0 and *rec filled, or -1 with *why set (a static string). */
int fr_parse(const char *data, size_t len, struct fr_record *rec, const char **why);
void fr_free(struct fr_record *rec);

/* An outcome record (no_container or failed): the first rank made no container. */
int fr_outcome(const struct fr_record *rec);

/* The first line of field NAME, or NULL. */
const struct fr_line *fr_get(const struct fr_record *rec, const char *name);
const char *fr_value(const struct fr_record *rec, const char *name);

/* What the launcher variables say about this rank (launch/rank.py). */
struct fr_rank {
    char step_key[512];
    long rank, size;
};

/* 0 and *out filled; -1 when the environment is one the C front will not interpret
 * (non-ASCII in the launcher's ids...): the caller hands over to Python. */
int fr_detect(char *const *envp, long ppid, struct fr_rank *out);

/* "fast-step-<safe key>.rec" into buf; -1 when it does not fit or the key is not ASCII. */
int fr_record_name(const char *step_key, char *buf, size_t size);

/* Does the request (argv after argv[0], environment, cwd, ids) ask for this record's
 * container? 0 yes, -1 no (*why). On yes, *command and *ncommand is the payload's argv
 * (image Entrypoint + the command, else + Cmd), malloc'ed (the strings are borrowed).
 * For an outcome record: is it the request the first rank had? Then *command is the
 * rank's own command, possibly empty. */
int fr_match(const struct fr_record *rec, int argc, char *const *argv, char *const *envp,
             const char *cwd, unsigned long uid, unsigned long gid, char ***command,
             int *ncommand, const char **why);

/* Run the record's env_* program over the host environment ENVP; a malloc'ed NULL
 * terminated "K=V" array (free with fr_free_env), or NULL on allocation failure. */
char **fr_run_env(const struct fr_record *rec, char *const *envp);
void fr_free_env(char **env);
const char *fr_getenv(char *const *envp, const char *name);

#endif
