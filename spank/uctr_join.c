/*
 * Remote side, per task, as the job user (task_init): join the step's running container
 * from C, so that slurmstepd execs the payload itself and no uctr-exec process (C front or
 * Python) starts for this task (issue 12, docs/launcher.md "Two paths").
 *
 * The first task of a step on a node has no container to join: it goes through uctr-exec,
 * whose Python launcher creates the step's N1 container and writes the fast-join record
 * (launchers/c/record.md). Tasks that start after that find the record; tasks that start
 * at the same time do not and take uctr-exec too, which joins or waits, as before.
 *
 * The record is read, checked and matched by the C front's own code (launchers/c/fastrec.c,
 * fastjoin.c), against the request uctr-exec would have received (exec_request): before
 * Slurm 23.11 the task's argv with argv[0] replaced and UCTR_ARGV0 in the job environment;
 * from 23.11 `uctr-exec IMAGE --` prepended to the task's argv (spank_prepend_task_argv).
 * Both with the installed front's exports in the environment. Every doubt before the
 * first setns() returns 1 and the task goes through uctr-exec unchanged. Errors after it
 * end the task with uctr-exec's messages and exit codes (nothing is left to hand over).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/slurm_version.h>

#include "uctr.h"
#include "fastjoin.h"
#include "replay.h"

#ifdef UCTR_FRONT_CONFIG
/* The installed front's configuration (uctr slurm install writes it for both). */
#include "front_config.h"
#endif

#define EXIT_USER 1
#define EXIT_MODE 3
#define EXIT_NOT_EXECUTABLE 126
#define EXIT_NOT_FOUND 127

static char **job_env(spank_t sp)
{
    char **env = NULL;
    if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS)
        return NULL;
    return env;
}

/* What the installed uctr-exec sets before it reads the record (uctr_exec.c,
 * apply_front_env): the request must be the one the front would see. */
static int front_env(spank_t sp)
{
#ifdef UCTR_FRONT_ENV
    static const char *const pairs[] = { UCTR_FRONT_ENV NULL };
    for (size_t i = 0; pairs[i] && pairs[i + 1]; i += 2)
        if (spank_setenv(sp, pairs[i], pairs[i + 1], 1) != ESPANK_SUCCESS)
            return -1;
#else
    (void)sp;
#endif
    return 0;
}

/* The first entry of ENV for the variable ENTRY names ("NAME=..."; NAME_LEN bytes), or NULL. */
static const char *first_entry(char **env, const char *entry, size_t name_len)
{
    for (char **p = env; p && *p; p++)
        if (strncmp(*p, entry, name_len) == 0 && (*p)[name_len] == '=')
            return *p;
    return NULL;
}

/* Make the job environment, the one slurmstepd hands to execve, equal to ENV. A variable
 * that already holds its value is left alone: most of a Slurm task's hundred variables pass
 * into the container unchanged, and each spank_setenv costs slurmstepd an allocation of
 * its environment buffer. */
static int replace_env(spank_t sp, char **env)
{
    char **old = job_env(sp);
    size_t n = 0;
    for (char **p = old; p && *p; p++)
        n++;
    char **gone = calloc(n + 1, sizeof(char *));
    if (!gone)
        return -1;
    size_t k = 0;
    for (char **p = old; p && *p; p++) {
        const char *eq = strchr(*p, '=');
        size_t len = eq ? (size_t)(eq - *p) : strlen(*p);
        if (!eq || !first_entry(env, *p, len))
            gone[k++] = strndup(*p, len);
    }
    int rc = 0;
    for (size_t i = 0; i < k; i++) {
        if (!gone[i] || spank_unsetenv(sp, gone[i]) != ESPANK_SUCCESS)
            rc = -1;
        free(gone[i]);
    }
    free(gone);
    for (char **p = env; rc == 0 && *p; p++) {
        const char *eq = strchr(*p, '=');
        const char *now = eq ? first_entry(job_env(sp), *p, (size_t)(eq - *p)) : NULL;
        if (now && strcmp(now, *p) == 0)
            continue;
        char *name = strdup(*p), *cut = name ? strchr(name, '=') : NULL;
        if (!cut || (*cut = '\0', spank_setenv(sp, name, cut + 1, 1) != ESPANK_SUCCESS))
            rc = -1;
        free(name);
    }
    return rc;
}

/* slurmstepd execs the task's own argv: join only when the payload's command is exactly
 * that argv (an image without Entrypoint). */
static const char *same_command(const struct fj_join *j, int argc, char **argv)
{
    if (j->ncommand != argc)
        return "the image's Entrypoint changes the command line";
    for (int i = 0; i < argc; i++)
        if (strcmp(j->command[i], argv[i]) != 0)
            return "the image's Entrypoint changes the command line";
    return NULL;
}

/* The tasks of a step start together: without a wait, all of them would find no record
 * and start uctr-exec. Local task 0 goes through uctr-exec and creates the container; the
 * others wait for its record, at most CREATOR_WAIT_MS (cold staging: then they take
 * uctr-exec too, as before). A creator that makes no container says so at once in an
 * outcome record (launchers/c/record.md): they then fail with its error, or take uctr-exec. Only on a warm node, where the user's record
 * directory exists (an earlier step ran N1 here), and not for a mode other than N1: a step
 * that writes no record must not make its tasks wait. */
#define CREATOR_WAIT_MS 10000

static int not_yet(const char *why)
{
    return why && !strcmp(why, "no record for this step");
}

static int waits_for_creator(spank_t sp)
{
    static int answer = -1;
    if (answer >= 0)
        return answer;
    int task = 0;
    uint32_t count = 0;
    char mode[16];
    answer = spank_get_item(sp, S_TASK_ID, &task) == ESPANK_SUCCESS && task > 0
             && spank_get_item(sp, S_JOB_LOCAL_TASK_COUNT, &count) == ESPANK_SUCCESS
             && count > 1
             && (spank_getenv(sp, "UCTR_MODE", mode, sizeof(mode)) != ESPANK_SUCCESS
                 || !mode[0] || !strcmp(mode, "N1"));
    return answer;
}

static long ms_since(const struct timespec *start)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - start->tv_sec) * 1000 + (now.tv_nsec - start->tv_nsec) / 1000000;
}

/* fj_prepare() until the creator's record is there, at most CREATOR_WAIT_MS. The watch is
 * set before the second look, so a record that lands in between still wakes us. */
static const char *wait_for_record(struct fj_join *j, int n, char **request, char **env)
{
    struct timespec start;
    char name[160];
    clock_gettime(CLOCK_MONOTONIC, &start);
    int watch = fj_watch_records(env, name, sizeof(name));
    const char *why = fj_prepare(j, n, request, env);
    for (long waited = 0; not_yet(why) && waited < CREATOR_WAIT_MS; waited = ms_since(&start)) {
        /* and after 100 ms without an event: in case inotify misses one */
        if (fj_wait_records(watch, name, CREATOR_WAIT_MS - waited) != 0)
            why = fj_prepare(j, n, request, env);
    }
    if (watch >= 0)
        close(watch);
    return why;
}

/* The argv uctr-exec would receive (uctr_remote.c, wrap_argv), in a new array of *N
 * borrowed strings; the environment is the job's with the front's exports and, before
 * 23.11, the hand-over's UCTR_ARGV0. */
static char **exec_request(spank_t sp, const struct uctr_config *cfg, const char *image,
                           int argc, char **argv, int *n)
{
    if (front_env(sp))
        return NULL;
#if SLURM_VERSION_NUMBER >= SLURM_VERSION_NUM(23, 11, 0)
    /* uctr-exec IMAGE -- ARGV... (spank_prepend_task_argv) */
    const char *prefix[UCTR_PREFIX_MAX];
    int np = uctr_exec_prefix(cfg, image, prefix);
    char **request = calloc((size_t)(np + argc) + 1, sizeof(char *));
    if (!request)
        return NULL;
    for (int i = 0; i < np; i++)
        request[i] = (char *)prefix[i];
    for (int i = 0; i < argc; i++)
        request[np + i] = argv[i];
    *n = np + argc;
#else
    /* ARGV with argv[0] replaced by uctr-exec, the program in UCTR_ARGV0 */
    (void)image;
    if (spank_setenv(sp, "UCTR_ARGV0", argv[0], 1) != ESPANK_SUCCESS)
        return NULL;
    char **request = calloc((size_t)argc + 1, sizeof(char *));
    if (!request)
        return NULL;
    request[0] = (char *)cfg->uctr_exec;
    for (int i = 1; i < argc; i++)
        request[i] = argv[i];
    *n = argc;
#endif
    return request;
}

/* Slurm >= 23.02 with an oci.conf runs a --container step through its OCI runtime: after
 * task_init the task writes the runtime's files under slurmd's spool directory, a host
 * path that a task in the container's mount namespace cannot see, so it must not join.
 * The oci.conf is looked for where slurmstepd's own slurm.conf is (SLURM_CONF in its
 * environment, else Debian's /etc/slurm). */
static const char *slurm_conf(void)
{
    const char *conf = getenv("SLURM_CONF");
    return conf && conf[0] == '/' ? conf : "/etc/slurm/slurm.conf";
}

static int slurm_runs_container(spank_t sp)
{
    char container[16], dir[PATH_MAX];
    spank_err_t rc = spank_getenv(sp, "SLURM_CONTAINER", container, sizeof(container));
    if (rc != ESPANK_SUCCESS && rc != ESPANK_NOSPACE)  /* set: a long value is set too */
        return 0;
    snprintf(dir, sizeof(dir), "%s", slurm_conf());
    char *slash = strrchr(dir, '/');
    snprintf(slash + 1, sizeof(dir) - (size_t)(slash + 1 - dir), "oci.conf");
    return access(dir, F_OK) == 0;
}

/* slurmstepd runs the site's TaskProlog in the task process after task_init: in a joined
 * task that is inside the container, where the script, its interpreter and (from 24.11,
 * which runs scripts through slurmstepd itself) slurmstepd's libraries are missing, and
 * the task fails ("TaskProlog failed status=127", as pyxis users meet it). Through
 * uctr-exec the TaskProlog runs on the host, before the container. */
static int site_task_prolog(void)
{
    return fj_conf_sets(slurm_conf(), "TaskProlog");
}

/* The holder runs the C front (replay.c, exec_holder): is uctr_exec= it (an ELF file)? */
static int front_is_c(const char *path)
{
    char magic[4];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, magic, sizeof(magic)) : -1;
    if (fd >= 0)
        close(fd);
    return n == 4 && memcmp(magic, "\177ELF", 4) == 0;
}

/* Local task 0 of a later step of a request: set the step's container up from the
 * replay template the Python launcher left (launchers/c/replay.c), so that this task too
 * joins it, with no Python. Anything in the way: the task goes through uctr-exec, whose
 * Python launcher sets the container up, as before. */
static void create_from_template(spank_t sp, const struct uctr_config *cfg, int n,
                                 char **request, const char *image)
{
    int task = -1;
    uint32_t count = 0;
    if (spank_get_item(sp, S_TASK_ID, &task) != ESPANK_SUCCESS || task != 0
        || spank_get_item(sp, S_JOB_LOCAL_TASK_COUNT, &count) != ESPANK_SUCCESS)
        return;
    char **env = job_env(sp);
    if (!env)
        return;
    /* the option tokens before the command, as uctr-exec's Python launcher records them:
     * none with UCTR_ARGV0 (before 23.11), else uctr_exec_prefix()'s after argv[0] */
#if SLURM_VERSION_NUMBER >= SLURM_VERSION_NUM(23, 11, 0)
    int nprefix = image[0] ? 2 : 1;
#else
    int nprefix = 0;
    (void)image;
#endif
    struct rp r;
    const char *why = front_is_c(cfg->uctr_exec) ? rp_prepare(&r, n, request, nprefix, env)
                                                 : "uctr_exec is not the C front";
    if (!why)
        why = rp_create(&r, (long)count, env, cfg->uctr_exec);
    if (fr_getenv(env, "UCTR_FAST_DEBUG"))
        fprintf(stderr, "uctr: task_init: %s\n",
                why ? why : "set the step's container up from C (replay template)");
}

/* Before the first setns: NULL when the task can join, else why not (j released). */
static const char *prepare(spank_t sp, const struct uctr_config *cfg, const char *image,
                           struct fj_join *j, char *started, size_t size)
{
    int argc = 0, n = 0;
    char **argv = NULL;
    if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1)
        return "cannot read the task's command line";
    /* srun --multi-prog: the step's argv is the configuration file and its text, not this
     * task's command line, which the plugin cannot read here */
    if (argc == 2 && strchr(argv[1], '\n'))
        return "srun --multi-prog: each task runs its own program";
    if (site_task_prolog())
        return "the site's TaskProlog runs on the host (slurm.conf)";
    if (slurm_runs_container(sp))
        return "Slurm's OCI runtime runs this step (oci.conf)";
    char **request = exec_request(sp, cfg, image, argc, argv, &n);
    if (!request)
        return "cannot build uctr-exec's request";
    create_from_template(sp, cfg, n, request, image);
    const char *why = fj_prepare(j, n, request, job_env(sp));
    if (not_yet(why) && waits_for_creator(sp))
        why = wait_for_record(j, n, request, job_env(sp));
    free(request);
    if (why == fj_failed)
        return why;  /* j kept for fj_fail_as_recorded */
    if (!why)
        why = same_command(j, argc, argv);
    if (!why && fj_start_time("self", started, size) < 0)
        why = "cannot read /proc/self/stat";
    if (why)
        fj_release(j);
    return why;
}

static void payload_found(char **env, const char *command)
{
    int denied = 0;
    const char *path = fr_getenv(env, "PATH");
    char hint[8300];
    if (command[0] == '/') {  /* base.check_command: it must be a file in the container */
        struct stat st;
        if (stat(command, &st) == 0 && S_ISREG(st.st_mode))
            return;
        snprintf(hint, sizeof(hint), "check the image has it on its PATH (PATH=%s)",
                 path ? path : "");
        fj_die(EXIT_NOT_FOUND, hint, "command not found in the container: %s", command);
    }
    if (strchr(command, '/'))
        return;  /* relative to the working directory: slurmstepd's execve reports it */
    if (fj_resolve(command, path ? path : "/usr/local/bin:/usr/bin:/bin", &denied))
        return;
    if (denied)
        fj_die(EXIT_NOT_EXECUTABLE, FJ_HINT_CHMOD, "cannot execute %s: permission denied",
               command);
    snprintf(hint, sizeof(hint), "check the image has it on its PATH (PATH=%s)",
             path ? path : "");
    fj_die(EXIT_NOT_FOUND, hint, "command not found in the container: %s", command);
}

int uctr_join_task(spank_t sp, const struct uctr_config *cfg, const char *image)
{
    struct fj_join j = FJ_JOIN_INIT;
    char started[32];
    char **env = job_env(sp);
    int debug = env && fr_getenv(env, "UCTR_FAST_DEBUG");
    const char *why = prepare(sp, cfg, image, &j, started, sizeof(started));
    if (why == fj_failed) {
        /* as local task 0 failed, with its message and exit code (record.md, "Outcome
         * records"): not after a wait for nothing, nor through Python to the same error */
        if (debug)
            fprintf(stderr, "uctr: task_init: failing as the step's first rank did\n");
        fj_fail_as_recorded(&j);
    }
    if (!why) {
        const char *inuse = fr_value(&j.rec, "inuse_dir");
        if (inuse)
            fj_mark_in_use(inuse);  /* a host path: before setns */
        if (fj_setns_user(j.ns[0]) < 0) {
            fj_release(&j);
            why = "cannot join the user namespace";
        }
    }
    if (why) {
        if (debug)
            fprintf(stderr, "uctr: task_init: uctr-exec path: %s\n", why);
        return 1;
    }
    if (j.me.size > 1)
        fj_name_rank(j.me.rank);
    if (setns(j.ns[1], CLONE_NEWNS) < 0)
        fj_die(EXIT_MODE, "the step's container is gone; start the step again",
               "cannot join the mount namespace of the step's container: %s",
               strerror(errno));
    fj_add_member(&j, started);
    const char *cwd = fr_value(&j.rec, "cwd");
    if (chdir(cwd) < 0)
        fj_die(EXIT_USER, "check -w / the image's WorkingDir",
               "cannot change to working directory %s in the container: %s", cwd,
               strerror(errno));
    payload_found(j.env, j.command[0]);
    if (replace_env(sp, j.env) < 0)
        fj_die(EXIT_USER, "the node may be out of memory; run the step again",
               "cannot set the task's environment in the container");
    if (debug)
        fprintf(stderr, "uctr: task_init: joined the step's container from C\n");
    fj_release(&j);
    return 0;
}
