/* uctr-exec, the C front: join the running N1 container of this job step on this node and
 * exec the payload, without starting Python (docs/launcher.md, "Two paths").
 *
 * Only one case is handled here: a fast-join record (record.md) exists for this step,
 * belongs to the caller, was checked on every path component we open, and describes exactly
 * what this rank asks for. Then: lock the step's rendezvous, find a live member, setns()
 * into its user and mount namespaces, record ourselves as a member, chdir, exec. Every
 * other case, and every doubt before the first setns(), execs the Python launcher
 * (UCTR_PY_LAUNCHER) with our argv unchanged: it does everything, slowly but completely.
 *
 * Runs as the calling user and never needs privilege: it refuses to run set-uid/set-gid.
 * Nothing is written to stdout; errors after the namespaces were joined (nothing to hand
 * over then) print uctr's "error:" and "hint:" lines and use the Python launcher's codes. */
#define _GNU_SOURCE
#include "fastjoin.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#ifdef UCTR_FRONT_CONFIG
/* Written by `uctr slurm install` / `uctr pbs install`: UCTR_PY_LAUNCHER and UCTR_FRONT_ENV,
 * the variables the installed Python launcher's wrapper exports (UCTR_POLICY...). */
#include "front_config.h"
#endif
#ifndef UCTR_PY_LAUNCHER
#define UCTR_PY_LAUNCHER "/usr/local/lib/uctr/uctr-exec.py"
#endif

#define EXIT_USER 1
#define EXIT_MODE 3
#define EXIT_NOT_EXECUTABLE 126
#define EXIT_NOT_FOUND 127

extern char **environ;

static char **g_argv;
static int g_debug;

/* Hand everything to the Python launcher: same argv, same environment. */
static void fallback(const char *why)
{
    if (g_debug)
        fprintf(stderr, "uctr-exec: python path: %s\n", why);
    execv(UCTR_PY_LAUNCHER, g_argv);
    fprintf(stderr, "uctr: error: cannot start the uctr-exec launcher %s: %s\n"
            "uctr: hint: reinstall uctr-batch on this node (uctr slurm install, or pip)\n",
            UCTR_PY_LAUNCHER, strerror(errno));
    _exit(70);
}

/* -- exec ------------------------------------------------------------------------------ */

#define HINT_CHMOD FJ_HINT_CHMOD

/* base.exec_in_path and base.execve, with their messages and exit codes. */
static void exec_payload(char **argv, char **env)
{
    const char *command = argv[0], *file = command;
    if (!strchr(command, '/')) {
        const char *path = fr_getenv(env, "PATH");
        int denied;
        char hint[8300];
        file = fj_resolve(command, path ? path : "/usr/local/bin:/usr/bin:/bin", &denied);
        if (!file && denied)
            fj_die(EXIT_NOT_EXECUTABLE, HINT_CHMOD, "cannot execute %s: permission denied",
                   command);
        snprintf(hint, sizeof(hint), "check the image has it on its PATH (PATH=%s)",
                 path ? path : "");
        if (!file)
            fj_die(EXIT_NOT_FOUND, hint, "command not found in the container: %s", command);
    }
    execve(file, argv, env);
    if (errno == ENOENT)
        fj_die(EXIT_NOT_FOUND, "check the command exists in the image and is on its PATH",
               "command not found: %s", file);
    if (errno == EACCES)
        fj_die(EXIT_NOT_EXECUTABLE, HINT_CHMOD, "cannot execute %s: permission denied", file);
    fj_die(EXIT_NOT_EXECUTABLE, "check that it is a program for this architecture, or run it "
           "through its interpreter", "cannot execute %s: %s", file, strerror(errno));
}

/* -- main ------------------------------------------------------------------------------ */

/* What the Python launcher's installed wrapper exports, set here first: the record's
 * checks must see the environment the Python launcher sees, and so must the fallback. */
static void apply_front_env(void)
{
#ifdef UCTR_FRONT_ENV
    static const char *const pairs[] = { UCTR_FRONT_ENV NULL };
    for (size_t i = 0; pairs[i] && pairs[i + 1]; i += 2)
        setenv(pairs[i], pairs[i + 1], 1);
#endif
}

int main(int argc, char **argv)
{
    struct fj_join j = FJ_JOIN_INIT;
    char started[32];
    g_argv = argv;
    apply_front_env();
    g_debug = getenv("UCTR_FAST_DEBUG") != NULL;
    const char *why = fj_prepare(&j, argc, argv, environ);
    if (why)
        fallback(why); /* the kernel drops our lock and descriptors at exec (O_CLOEXEC) */
    if (j.me.size > 1)
        fj_name_rank(j.me.rank);
    if (fj_start_time("self", started, sizeof(started)) < 0)
        fallback("cannot read /proc/self/stat");
    const char *inuse = fr_value(&j.rec, "inuse_dir");
    if (inuse)
        fj_mark_in_use(inuse); /* before setns: the host path is out of sight afterwards */
    /* EINVAL: we are in that user namespace already (uctr-exec run inside the container) */
    if (setns(j.ns[0], CLONE_NEWUSER) < 0 && errno != EINVAL)
        fallback("cannot join the user namespace");
    if (setns(j.ns[1], CLONE_NEWNS) < 0)
        fj_die(EXIT_MODE, "the step's container is gone; start the step again",
               "cannot join the mount namespace of the step's container: %s", strerror(errno));
    close(j.ns[0]);
    close(j.ns[1]);
    fj_add_member(&j, started);
    const char *cwd = fr_value(&j.rec, "cwd");
    if (chdir(cwd) < 0)
        fj_die(EXIT_USER, "check -w / the image's WorkingDir",
               "cannot change to working directory %s in the container: %s", cwd, strerror(errno));
    exec_payload(j.command, j.env);
    return 70;
}
