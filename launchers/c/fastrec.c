/* The fast-join record: see fastrec.h and record.md. The reference implementation is
 * uctr_batch/launch/fastrec.py; tests/unit/test_fastrec.py checks that both accept and
 * refuse the same records, compute the same environment and the same step key. */
#define _GNU_SOURCE
#include "fastrec.h"

#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FIELD(name, least, most, how) { name, least, most, how }

/* One row per record field: the same list, in the same order, as FIELDS in
 * uctr_batch/launch/fastrec.py (a test compares the two). */
const struct fr_field fr_fields[] = {
    FIELD("uctr-fast-record", 1, 1, ONCE),
    FIELD("step", 1, 1, ONCE),
    FIELD("uid", 1, 1, ONCE),
    FIELD("gid", 1, 1, ONCE),
    FIELD("mode", 1, 1, CONT),
    FIELD("fallback", 1, 1, OPT),
    FIELD("no_container", 1, 1, OPT),
    FIELD("failed", 2, 2, OPT),
    FIELD("failed_hint", 1, 1, OPT),
    FIELD("failed_command", 1, 1, OPT),
    FIELD("parent", 2, 2, OPT),
    FIELD("launch_dir", 1, 1, CONT),
    FIELD("stem", 1, 1, CONT),
    FIELD("generation", 1, 1, CONT),
    FIELD("user_ns", 1, 1, CONT),
    FIELD("mnt_ns", 1, 1, CONT),
    FIELD("member", 2, 2, MANY),
    FIELD("inuse_dir", 1, 1, OPT),
    FIELD("rootfs", 1, 1, CONT),
    FIELD("bind", 3, 3, MANY),
    FIELD("host_cwd", 1, 1, ONCE),
    FIELD("cwd", 1, 1, CONT),
    FIELD("handover", 1, 1, ONCE),
    FIELD("opt", 1, 1, MANY),
    FIELD("opts_complete", 1, 1, ONCE),
    FIELD("entrypoint", 1, 1, MANY),
    FIELD("cmd", 1, 1, MANY),
    FIELD("require", 2, 2, MANY),
    FIELD("absent", 1, 1, MANY),
    FIELD("require_prefix", 1, 1, MANY),
    FIELD("ignore", 1, 1, MANY),
    FIELD("env_set", 2, 2, MANY),
    FIELD("env_pass", 1, 1, MANY),
    FIELD("env_pass_prefix", 1, 1, MANY),
    FIELD("env_pass_name", 1, 1, MANY),
    FIELD("env_copy", 1, 1, MANY),
    FIELD("env_unset", 1, 1, MANY),
    FIELD("env_default", 2, 2, MANY),
    FIELD("env_join", 2, 256, MANY),
    FIELD("env_append", 2, 2, MANY),
    FIELD("replay_key", 1, 1, OPT),
    FIELD("replay_until", 1, 1, OPT),
    FIELD("replay_limit", 1, 1, OPT),
    FIELD("replay_python", 2, 2, OPT),
    FIELD("replay_stat", 1, 5, MANY),
    FIELD("replay_marker", 2, 2, MANY),
    FIELD("replay_vary", 1, 1, MANY),
    FIELD("replay_absent_dir", 1, 1, MANY),
    FIELD("replay_op", 2, 4, MANY),
    FIELD("replay_nskey", 1, 1, OPT),
    FIELD("replay_extras", 1, 1, OPT),
    FIELD("replay_manifest", 2, 2, OPT),
    FIELD("replay_warning", 1, 1, MANY),
    FIELD("replay_command", 1, 1, OPT),
    FIELD("end", 0, 0, ONCE),
};
const size_t fr_nfields = sizeof(fr_fields) / sizeof(fr_fields[0]);

/* -- parsing ------------------------------------------------------------------------- */

static int field_index(const char *name, size_t len)
{
    for (size_t i = 0; i < fr_nfields; i++)
        if (strlen(fr_fields[i].name) == len && memcmp(fr_fields[i].name, name, len) == 0)
            return (int)i;
    return -1;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decode one token (printable ASCII, %XX escapes, "%-" = empty) into a new string. */
static char *decode(const char *tok, size_t len)
{
    if (len == 0)
        return NULL;
    char *out = malloc(len + 1);
    if (!out)
        return NULL;
    if (len == 2 && tok[0] == '%' && tok[1] == '-') {
        out[0] = '\0';
        return out;
    }
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (tok[i] == '%') {
            int hi = i + 2 < len ? hexval(tok[i + 1]) : -1;
            int lo = i + 2 < len ? hexval(tok[i + 2]) : -1;
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
                free(out);
                return NULL;
            }
            out[o++] = (char)(hi * 16 + lo);
            i += 2;
        } else {
            out[o++] = tok[i];
        }
    }
    out[o] = '\0';
    return out;
}

static void free_line(struct fr_line *line)
{
    for (int i = 0; i < line->argc; i++)
        free(line->argv[i]);
    free(line->argv);
}

void fr_free(struct fr_record *rec)
{
    for (size_t i = 0; i < rec->n; i++)
        free_line(&rec->lines[i]);
    free(rec->lines);
    rec->lines = NULL;
    rec->n = 0;
}

/* One line (without its newline) into *line; NULL or the reason it is refused. */
static const char *parse_line(const char *p, size_t len, struct fr_line *line)
{
    size_t name_len = 0;
    while (name_len < len && p[name_len] != ' ')
        name_len++;
    line->field = field_index(p, name_len);
    line->argc = 0;
    line->argv = NULL;
    if (line->field < 0)
        return "unknown field";
    const struct fr_field *f = &fr_fields[line->field];
    line->argv = calloc((size_t)f->most + 1, sizeof(char *));
    if (!line->argv)
        return "out of memory";
    size_t i = name_len;
    while (i < len) {
        i++; /* the separating space */
        size_t start = i;
        while (i < len && p[i] != ' ')
            i++;
        if (line->argc >= f->most)
            return "too many arguments";
        char *arg = decode(p + start, i - start);
        if (!arg)
            return "bad token";
        line->argv[line->argc++] = arg;
    }
    if (line->argc < f->least)
        return "too few arguments";
    return NULL;
}

static size_t count_of(const struct fr_record *rec, int field)
{
    size_t count = 0;
    for (size_t i = 0; i < rec->n; i++)
        count += rec->lines[i].field == field;
    return count;
}

static int index_of(const char *name)
{
    return field_index(name, strlen(name));
}

/* An outcome's exit code: 1 to 255 in decimal, no sign, no leading zero. */
static int exit_code_ok(const char *s)
{
    size_t len = strlen(s);
    if (len == 0 || len > 3 || s[0] == '0')
        return 0;
    for (size_t i = 0; i < len; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return atoi(s) <= 255;
}

static const char *check_counts(const struct fr_record *rec)
{
    size_t outcomes = count_of(rec, index_of("no_container")) + count_of(rec, index_of("failed"));
    if (outcomes > 1)
        return "two outcomes";
    if (!count_of(rec, index_of("failed")) && (count_of(rec, index_of("failed_hint"))
                                               || count_of(rec, index_of("failed_command"))))
        return "failed_* without failed";
    for (size_t f = 0; f < fr_nfields; f++) {
        size_t count = count_of(rec, (int)f);
        if (fr_fields[f].how == CONT && outcomes && count)
            return "a container field in an outcome record";
        if ((fr_fields[f].how == ONCE || (fr_fields[f].how == CONT && !outcomes)) && count != 1)
            return count ? "field repeated" : "field missing";
        if ((fr_fields[f].how == OPT || fr_fields[f].how == CONT) && count > 1)
            return "field repeated";
    }
    if (rec->lines[0].field != 0)
        return "no header";
    if (rec->lines[rec->n - 1].field != (int)fr_nfields - 1)
        return "line after end";
    if (strcmp(rec->lines[0].argv[0], FR_VERSION) != 0)
        return "unknown version";
    const char *code = fr_value(rec, "failed");
    if (code && !exit_code_ok(code))
        return "bad exit code";
    return NULL;
}

int fr_outcome(const struct fr_record *rec)
{
    return fr_get(rec, "no_container") || fr_get(rec, "failed");
}

int fr_parse(const char *data, size_t len, struct fr_record *rec, const char **why)
{
    rec->lines = NULL;
    rec->n = 0;
    *why = NULL;
    if (len == 0 || len > FR_MAX_BYTES || data[len - 1] != '\n') {
        *why = len > FR_MAX_BYTES ? "record too large" : "no final newline";
        return -1;
    }
    size_t nlines = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)data[i];
        if (c == '\n')
            nlines++;
        else if (c != ' ' && (c < 0x21 || c > 0x7e)) {
            *why = "byte outside printable ASCII";
            return -1;
        }
    }
    if (nlines > FR_MAX_LINES) {
        *why = "too many lines";
        return -1;
    }
    rec->lines = calloc(nlines, sizeof(struct fr_line));
    if (!rec->lines) {
        *why = "out of memory";
        return -1;
    }
    size_t start = 0;
    for (size_t i = 0; i < len; i++) {
        if (data[i] != '\n')
            continue;
        *why = parse_line(data + start, i - start, &rec->lines[rec->n]);
        rec->n++;
        if (*why)
            break;
        start = i + 1;
    }
    if (!*why)
        *why = check_counts(rec);
    if (*why) {
        fr_free(rec);
        return -1;
    }
    return 0;
}

const struct fr_line *fr_get(const struct fr_record *rec, const char *name)
{
    for (size_t i = 0; i < rec->n; i++)
        if (strcmp(fr_fields[rec->lines[i].field].name, name) == 0)
            return &rec->lines[i];
    return NULL;
}

const char *fr_value(const struct fr_record *rec, const char *name)
{
    const struct fr_line *line = fr_get(rec, name);
    return line && line->argc > 0 ? line->argv[0] : NULL;
}

static int is(const struct fr_line *line, const char *name)
{
    return strcmp(fr_fields[line->field].name, name) == 0;
}

/* -- the environment ----------------------------------------------------------------- */

/* The value of NAME in ENVP (first match), or NULL. */
const char *fr_getenv(char *const *envp, const char *name)
{
    size_t n = strlen(name);
    for (; envp && *envp; envp++)
        if (strncmp(*envp, name, n) == 0 && (*envp)[n] == '=')
            return *envp + n + 1;
    return NULL;
}

/* -- who am I (launch/rank.py) ------------------------------------------------------- */

/* rank._int for one variable: 1 and *out when it holds an integer; 0 when unset or not
 * a number; -1 when it holds what Python might read differently (non-ASCII, "--5"). */
static int env_int(char *const *envp, const char *name, long *out)
{
    const char *v = fr_getenv(envp, name);
    if (!v)
        return 0;
    const char *ws = " \t\n\r\v\f";
    while (*v && strchr(ws, *v))
        v++;
    size_t len = strlen(v);
    while (len && strchr(ws, v[len - 1]))
        len--;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)v[i] < 0x20 || (unsigned char)v[i] > 0x7e)
            return -1;
    size_t i = 0;
    if (len > 1 && v[0] == '-' && v[1] == '-')
        return -1;
    if (len && v[0] == '-')
        i = 1;
    if (i == len || len - i > 15)
        return len - i > 15 ? -1 : 0;
    for (size_t k = i; k < len; k++)
        if (v[k] < '0' || v[k] > '9')
            return 0;
    *out = strtol(v, NULL, 10);
    return 1;
}

/* The first of NAMES that holds an integer (rank._int). */
static int first_int(char *const *envp, const char *a, const char *b, long *out)
{
    int r = env_int(envp, a, out);
    if (r != 0 || !b)
        return r;
    return env_int(envp, b, out);
}

struct ids {
    const char *job, *step;
};

static struct ids batch_ids(char *const *envp)
{
    struct ids ids = { "", "" };
    const char *slurm = fr_getenv(envp, "SLURM_JOB_ID");
    const char *pbs = fr_getenv(envp, "PBS_JOBID");
    if (slurm && *slurm) {
        const char *step = fr_getenv(envp, "SLURM_STEP_ID");
        ids.job = slurm;
        ids.step = step ? step : "";
    } else if (pbs && *pbs) {
        ids.job = pbs;
    }
    return ids;
}

static int has(char *const *envp, const char *name)
{
    return fr_getenv(envp, name) != NULL;
}

/* The detectors of rank.py, in its order; -1 for doubt. */
static int detect_ids(char *const *envp, struct ids *ids, long *rank, long *size)
{
    long v;
    int r;
    *size = 1;
#define TRY(expr) do { if ((r = (expr)) < 0) return -1; } while (0)
    TRY(env_int(envp, "OMPI_COMM_WORLD_RANK", rank));
    if (r) {
        TRY(env_int(envp, "OMPI_COMM_WORLD_SIZE", &v));
        *size = r && v ? v : 1;
        *ids = batch_ids(envp);
        return 0;
    }
    TRY(env_int(envp, "PMI_RANK", rank));
    if (has(envp, "MPI_LOCALRANKID") && r) {
        TRY(env_int(envp, "PMI_SIZE", &v));
        *size = r && v ? v : 1;
        *ids = batch_ids(envp);
        return 0;
    }
    TRY(env_int(envp, "SLURM_PROCID", rank));
    if (r && (has(envp, "SLURM_STEP_ID") || has(envp, "SLURM_STEPID"))) {
        TRY(first_int(envp, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", &v));
        *size = r && v ? v : 1;
        const char *job = fr_getenv(envp, "SLURM_JOB_ID");
        const char *step = fr_getenv(envp, "SLURM_STEP_ID");
        ids->job = job ? job : (fr_getenv(envp, "SLURM_JOBID") ? fr_getenv(envp, "SLURM_JOBID") : "");
        ids->step = step ? step : (fr_getenv(envp, "SLURM_STEPID") ? fr_getenv(envp, "SLURM_STEPID") : "");
        return 0;
    }
    TRY(env_int(envp, "PMIX_RANK", rank));
    if (r) {
        TRY(env_int(envp, "PMIX_SIZE", &v));
        *size = r && v ? v : 1;
        const char *ns = fr_getenv(envp, "PMIX_NAMESPACE");
        ids->job = ns ? ns : "";
        ids->step = "";
        return 0;
    }
    TRY(env_int(envp, "PALS_RANKID", rank));
    if (r) {
        TRY(first_int(envp, "PALS_SIZE", "PMI_SIZE", &v));
        *size = r && v ? v : 1;
        *ids = batch_ids(envp);
        return 0;
    }
    TRY(env_int(envp, "PMI_RANK", rank));
    if (r) {
        TRY(env_int(envp, "PMI_SIZE", &v));
        *size = r && v ? v : 1;
        *ids = batch_ids(envp);
        return 0;
    }
    if (has(envp, "PBS_JOBID")) {
        TRY(env_int(envp, "PBS_TASKNUM", &v));
        *rank = (r && v ? v : 1) - 1;
        const char *task = fr_getenv(envp, "PBS_TASKNUM");
        ids->job = fr_getenv(envp, "PBS_JOBID");
        ids->step = task ? task : "";
        return 0;
    }
#undef TRY
    *rank = 0;
    *ids = batch_ids(envp);
    return 0;
}

static int ascii_only(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s > 0x7e || (unsigned char)*s < 0x20)
            return 0;
    return 1;
}

int fr_detect(char *const *envp, long ppid, struct fr_rank *out)
{
    struct ids ids = { "", "" };
    if (detect_ids(envp, &ids, &out->rank, &out->size) < 0)
        return -1;
    const char *ns = fr_getenv(envp, "PMIX_NAMESPACE");
    int n;
    if (!ascii_only(ids.job) || !ascii_only(ids.step) || (ns && !ascii_only(ns)))
        return -1;
    if (*ids.job) {
        n = snprintf(out->step_key, sizeof(out->step_key), "%s.%s", ids.job,
                     *ids.step ? ids.step : "x");
    } else if (ns && *ns) {
        char launch[101];
        size_t i;
        for (i = 0; ns[i] && i < 100; i++) {
            char c = ns[i];
            int keep = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                       (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
            launch[i] = keep ? c : '_';
        }
        launch[i] = '\0';
        n = snprintf(out->step_key, sizeof(out->step_key), "ns-%s", launch);
    } else {
        n = snprintf(out->step_key, sizeof(out->step_key), "pid%ld", ppid);
    }
    return n < 0 || (size_t)n >= sizeof(out->step_key) ? -1 : 0;
}

int fr_record_name(const char *key, char *buf, size_t size)
{
    char safe[121];
    size_t i;
    if (!ascii_only(key))
        return -1;
    for (i = 0; key[i] && i < 120; i++) {
        char c = key[i];
        int keep = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                   (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
        safe[i] = keep ? c : '_';
    }
    safe[i] = '\0';
    int n = snprintf(buf, size, "fast-step-%s.rec", safe);
    return n < 0 || (size_t)n >= size ? -1 : 0;
}

/* -- does this rank ask for the recorded container? ---------------------------------- */

/* The names the record's ignore or require lines give, sorted, for a lookup per variable:
 * a request is checked against every variable of the job (a hundred or more under Slurm)
 * and a record has as many lines, so scanning the record for each one made the join of
 * 62 tasks cost ~0.25 s of CPU on two cores in slurmstepd's task_init. */
struct nameset {
    const char **v;
    size_t n;
};

static int by_name(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The first arguments of the FIELD lines of REC; 0, or -1 when out of memory. */
static int nameset_of(const struct fr_record *rec, const char *field, struct nameset *s)
{
    int f = field_index(field, strlen(field));
    s->n = 0;
    s->v = malloc((rec->n + 1) * sizeof(char *));
    if (!s->v)
        return -1;
    for (size_t i = 0; i < rec->n; i++)
        if (rec->lines[i].field == f)
            s->v[s->n++] = rec->lines[i].argv[0];
    qsort(s->v, s->n, sizeof(char *), by_name);
    return 0;
}

/* 1 when S holds the name of ENTRY ("NAME=..." or "NAME"), NAME being its first LEN bytes */
static int nameset_has(const struct nameset *s, const char *entry, size_t name_len)
{
    size_t lo = 0, hi = s->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strncmp(s->v[mid], entry, name_len);
        if (c == 0)
            c = s->v[mid][name_len] != '\0';
        if (c == 0)
            return 1;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

static const char *check_prefix(const struct fr_line *l, const struct nameset *ignore,
                                const struct nameset *require, char *const *envp)
{
    size_t plen = strlen(l->argv[0]);
    for (char *const *e = envp; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq || strncmp(*e, l->argv[0], plen) != 0)
            continue;
        size_t name_len = (size_t)(eq - *e);
        if (!nameset_has(ignore, *e, name_len) && !nameset_has(require, *e, name_len))
            return "a setting the creator did not have is set";
    }
    return NULL;
}

static const char *check_env(const struct fr_record *rec, char *const *envp)
{
    struct nameset ignore = { NULL, 0 }, require = { NULL, 0 };
    const char *why = NULL;
    if (nameset_of(rec, "ignore", &ignore) < 0 || nameset_of(rec, "require", &require) < 0)
        why = "out of memory";
    for (size_t i = 0; i < rec->n && !why; i++) {
        const struct fr_line *l = &rec->lines[i];
        const char *v;
        if (is(l, "require")) {
            v = fr_getenv(envp, l->argv[0]);
            if (!v || strcmp(v, l->argv[1]) != 0)
                why = "a variable that shapes the container differs";
        } else if (is(l, "absent") && fr_getenv(envp, l->argv[0])) {
            why = "a variable that shapes the container is set";
        } else if (is(l, "require_prefix")) {
            why = check_prefix(l, &ignore, &require, envp);
        }
    }
    free(ignore.v);
    free(require.v);
    return why;
}

/* The payload's argv: Entrypoint + (COMMAND, else Cmd). */
static char **compose(const struct fr_record *rec, char *const *cmd, int ncmd, int *n)
{
    size_t count = (size_t)ncmd;
    for (size_t i = 0; i < rec->n; i++)
        count += is(&rec->lines[i], "entrypoint") || (ncmd == 0 && is(&rec->lines[i], "cmd"));
    char **out = calloc(count + 1, sizeof(char *));
    if (!out)
        return NULL;
    size_t k = 0;
    for (size_t i = 0; i < rec->n; i++)
        if (is(&rec->lines[i], "entrypoint"))
            out[k++] = rec->lines[i].argv[0];
    for (int i = 0; i < ncmd; i++)
        out[k++] = cmd[i];
    for (size_t i = 0; ncmd == 0 && i < rec->n; i++)
        if (is(&rec->lines[i], "cmd"))
            out[k++] = rec->lines[i].argv[0];
    *n = (int)k;
    return out;
}

static const char *split_argv(const struct fr_record *rec, int argc, char *const *argv,
                              char *const *envp, int *first)
{
    const char *argv0 = fr_getenv(envp, "UCTR_ARGV0");
    int handover = argv0 && *argv0;
    if (handover != (strcmp(fr_value(rec, "handover"), "1") == 0))
        return "another hand-over";
    if (handover) {
        *first = 0;
        return NULL;
    }
    int k = 0;
    const struct fr_line *last = NULL;
    for (size_t i = 0; i < rec->n; i++) {
        const struct fr_line *l = &rec->lines[i];
        if (!is(l, "opt"))
            continue;
        if (k >= argc || strcmp(argv[k], l->argv[0]) != 0)
            return "other options";
        last = l;
        k++;
    }
    if (k < argc) {
        if (strcmp(fr_value(rec, "opts_complete"), "1") != 0)
            return "the options did not end at the image";
        if (strcmp(argv[k], "--") == 0 && !(last && strcmp(last->argv[0], "--") == 0))
            return "a -- after the image";
    }
    *first = k;
    return NULL;
}

int fr_match(const struct fr_record *rec, int argc, char *const *argv, char *const *envp,
             const char *cwd, unsigned long uid, unsigned long gid, char ***command,
             int *ncommand, const char **why)
{
    char buf[32];
    *command = NULL;
    *why = NULL;
    int outcome = fr_outcome(rec);
    if (outcome)
        ; /* no container: the request alone is compared */
    else if (fr_get(rec, "fallback"))
        *why = "the record asks for the Python launcher";
    else if (strcmp(fr_value(rec, "mode"), "N1") != 0)
        *why = "not mode N1";
    if (!*why) {
        snprintf(buf, sizeof(buf), "%lu", uid);
        if (strcmp(fr_value(rec, "uid"), buf) != 0)
            *why = "another uid";
        snprintf(buf, sizeof(buf), "%lu", gid);
        if (!*why && strcmp(fr_value(rec, "gid"), buf) != 0)
            *why = "another gid";
    }
    if (!*why && (!cwd || strcmp(cwd, fr_value(rec, "host_cwd")) != 0))
        *why = "another working directory";
    if (!*why)
        *why = check_env(rec, envp);
    int first = 0;
    if (!*why)
        *why = split_argv(rec, argc, argv, envp, &first);
    if (*why)
        return -1;
    const char *argv0 = fr_getenv(envp, "UCTR_ARGV0");
    if (argv0 && *argv0) {
        /* the SPANK hand-over: the command is UCTR_ARGV0 and all of our arguments */
        char **cmd = calloc((size_t)argc + 2, sizeof(char *));
        if (!cmd) {
            *why = "out of memory";
            return -1;
        }
        cmd[0] = (char *)argv0;
        for (int i = 0; i < argc; i++)
            cmd[i + 1] = argv[i];
        *command = compose(rec, cmd, argc + 1, ncommand);
        free(cmd);
    } else {
        *command = compose(rec, argv + first, argc - first, ncommand);
    }
    if (!*command || (*ncommand == 0 && !outcome)) {
        *why = *command ? "no command" : "out of memory";
        free(*command);
        *command = NULL;
        return -1;
    }
    return 0;
}

/* -- the environment program (fastrec.run_program) ------------------------------------ */

struct envbuf {
    char **v;
    size_t n, cap;
    int failed;
    struct nameset ignore;  /* the record's ignore names */
    char **host;            /* the host variables' names, NULL where an entry is skipped */
    size_t nhost;           /* (no '=', an empty name, or a later duplicate of a name) */
};

static long env_find(struct envbuf *e, const char *key)
{
    size_t klen = strlen(key);
    for (size_t i = 0; i < e->n; i++)
        if (strncmp(e->v[i], key, klen) == 0 && e->v[i][klen] == '=')
            return (long)i;
    return -1;
}

static const char *env_get(struct envbuf *e, const char *key)
{
    long i = env_find(e, key);
    return i < 0 ? NULL : e->v[i] + strlen(key) + 1;
}

static void env_put(struct envbuf *e, const char *key, size_t klen, const char *value)
{
    size_t vlen = strlen(value);
    char *entry = malloc(klen + vlen + 2);
    if (!entry) {
        e->failed = 1;
        return;
    }
    memcpy(entry, key, klen);
    entry[klen] = '=';
    memcpy(entry + klen + 1, value, vlen + 1);
    for (size_t i = 0; i < e->n; i++) {
        if (strncmp(e->v[i], key, klen) == 0 && e->v[i][klen] == '=') {
            free(e->v[i]);
            e->v[i] = entry;
            return;
        }
    }
    if (e->n + 1 >= e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 64;
        char **v = realloc(e->v, cap * sizeof(char *));
        if (!v) {
            free(entry);
            e->failed = 1;
            return;
        }
        e->v = v;
        e->cap = cap;
    }
    e->v[e->n++] = entry;
    e->v[e->n] = NULL;
}

static void env_set(struct envbuf *e, const char *key, const char *value)
{
    env_put(e, key, strlen(key), value);
}

static void env_unset(struct envbuf *e, const char *key)
{
    long i = env_find(e, key);
    if (i < 0)
        return;
    free(e->v[i]);
    e->v[i] = e->v[--e->n];
    e->v[e->n] = NULL;
}

/* envspec.matches: exact, PREFIX*, else fnmatch ('[' and '\' patterns are never written) */
static int pattern_matches(const char *pattern, const char *name)
{
    return strcmp(pattern, name) == 0 || fnmatch(pattern, name, FNM_NOESCAPE) == 0;
}

struct named {
    const char *name;
    size_t at;
};

static int by_name_then_place(const void *a, const void *b)
{
    const struct named *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    return c ? c : (x->at > y->at) - (x->at < y->at);
}

/* e->host: the name of every host variable, NULL for entries no env_pass line copies: of
 * duplicate names only the first counts, as fr_getenv sees it. Once per fr_run_env. */
static void index_host(struct envbuf *e, char *const *envp)
{
    size_t n = 0;
    for (char *const *h = envp; h && *h; h++)
        n++;
    e->host = calloc(n + 1, sizeof(char *));
    struct named *order = calloc(n + 1, sizeof(struct named));
    size_t k = 0;
    if (!e->host || !order) {
        free(order);
        e->failed = 1;
        return;
    }
    e->nhost = n;
    for (size_t i = 0; i < n; i++) {
        const char *eq = strchr(envp[i], '=');
        if (!eq || eq == envp[i])
            continue;
        if (!(e->host[i] = strndup(envp[i], (size_t)(eq - envp[i])))) {
            e->failed = 1;
            break;
        }
        order[k++] = (struct named){ e->host[i], i };
    }
    qsort(order, k, sizeof(struct named), by_name_then_place);
    for (size_t i = 1; i < k; i++) {
        if (strcmp(order[i].name, order[i - 1].name) == 0) {
            free(e->host[order[i].at]);
            e->host[order[i].at] = NULL;
        }
    }
    free(order);
}

/* Copy the host variables whose names satisfy TEST(arg, name). */
static void pass_host(struct envbuf *e, char *const *envp, const char *arg, int how)
{
    size_t alen = strlen(arg);
    for (size_t i = 0; i < e->nhost && !e->failed; i++) {
        const char *name = e->host[i];
        if (!name)
            continue;
        size_t klen = strlen(name);
        if (nameset_has(&e->ignore, name, klen))
            continue;
        int hit = how == 0 ? pattern_matches(arg, name)
                  : how == 1 ? strncmp(name, arg, alen) == 0
                             : strcmp(name, arg) == 0;
        if (hit)
            env_put(e, name, klen, envp[i] + klen + 1);
    }
}

/* procspec._join_path: the elements first, then REST's non-empty parts not seen yet. */
static void env_join(struct envbuf *e, const struct fr_line *l)
{
    const char *rest = env_get(e, l->argv[0]);
    size_t len = 1;
    for (int i = 1; i < l->argc; i++)
        len += strlen(l->argv[i]) + 1;
    len += rest ? strlen(rest) + 1 : 0;
    char *out = malloc(len), *restcopy = rest ? strdup(rest) : NULL;
    if (!out || (rest && !restcopy)) {
        free(out);
        free(restcopy);
        e->failed = 1;
        return;
    }
    out[0] = '\0';
    /* the parts so far, compared whole (an element may hold ':' itself) */
    const char **parts = calloc(len + (size_t)l->argc, sizeof(char *));
    size_t nparts = 0;
    if (!parts) {
        free(out);
        free(restcopy);
        e->failed = 1;
        return;
    }
    for (int i = 1; i < l->argc; i++)
        parts[nparts++] = l->argv[i];
    for (char *p = restcopy, *save = NULL, *part; p || save; p = NULL) {
        if (!(part = strtok_r(p, ":", &save)))
            break;
        int seen = 0;
        for (size_t k = 0; k < nparts && !seen; k++)
            seen = strcmp(parts[k], part) == 0;
        if (!seen)
            parts[nparts++] = part;
    }
    for (size_t k = 0; k < nparts; k++) {
        if (k)
            strcat(out, ":");
        strcat(out, parts[k]);
    }
    env_set(e, l->argv[0], out);
    free(parts);
    free(out);
    free(restcopy);
}

static void env_append(struct envbuf *e, const char *key, const char *value)
{
    const char *old = env_get(e, key);
    if (!old || !*old) {
        env_set(e, key, value);
        return;
    }
    size_t n = strlen(old) + strlen(value) + 2;
    char *joined = malloc(n);
    if (!joined) {
        e->failed = 1;
        return;
    }
    snprintf(joined, n, "%s:%s", old, value);
    env_set(e, key, joined);
    free(joined);
}

static void run_line(struct envbuf *e, const struct fr_line *l, char *const *envp)
{
    if (is(l, "env_set")) {
        env_set(e, l->argv[0], l->argv[1]);
    } else if (is(l, "env_pass")) {
        pass_host(e, envp, l->argv[0], 0);
    } else if (is(l, "env_pass_prefix")) {
        pass_host(e, envp, l->argv[0], 1);
    } else if (is(l, "env_pass_name")) {
        pass_host(e, envp, l->argv[0], 2);
    } else if (is(l, "env_copy")) {
        const char *v = nameset_has(&e->ignore, l->argv[0], strlen(l->argv[0])) ? NULL
                        : fr_getenv(envp, l->argv[0]);
        if (v)
            env_set(e, l->argv[0], v);
        else
            env_unset(e, l->argv[0]);
    } else if (is(l, "env_unset")) {
        env_unset(e, l->argv[0]);
    } else if (is(l, "env_default")) {
        if (env_find(e, l->argv[0]) < 0)
            env_set(e, l->argv[0], l->argv[1]);
    } else if (is(l, "env_join")) {
        env_join(e, l);
    } else if (is(l, "env_append")) {
        env_append(e, l->argv[0], l->argv[1]);
    }
}

char **fr_run_env(const struct fr_record *rec, char *const *envp)
{
    struct envbuf e = { NULL, 0, 0, 0, { NULL, 0 }, NULL, 0 };
    e.v = calloc(64, sizeof(char *));
    if (!e.v || nameset_of(rec, "ignore", &e.ignore) < 0)
        e.failed = 1;
    else
        index_host(&e, envp);
    e.cap = 64;
    for (size_t i = 0; i < rec->n && !e.failed; i++)
        run_line(&e, &rec->lines[i], envp);
    free(e.ignore.v);
    for (size_t i = 0; i < e.nhost; i++)
        free(e.host[i]);
    free(e.host);
    if (e.failed) {
        fr_free_env(e.v);
        return NULL;
    }
    return e.v;
}

void fr_free_env(char **env)
{
    for (char **p = env; p && *p; p++)
        free(*p);
    free(env);
}
