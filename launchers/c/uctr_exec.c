/* uctr-exec, the C front: join the running N1 container of this job step on this node and
 * exec the payload, without starting Python (docs/launcher.md, "Two paths").
 *
 * Only one case is handled here: a fast-join record (record.md) exists for this step,
 * belongs to the caller, was checked on every path component we open, and describes exactly
 * what this rank asks for. Then: lock the step's rendezvous, find a live member, setns()
 * into its user and mount namespaces, record ourselves as a member, chdir, exec. Every
 * other case, and every doubt before the first setns(), execs the Python launcher
 * (UCTR_PY_LAUNCHER, or the Python it runs: UCTR_PY_PYTHON) with our argv unchanged: it
 * does everything, slowly but completely.
 *
 * Runs as the calling user and never needs privilege: it refuses to run set-uid/set-gid.
 * Nothing is written to stdout; errors after the namespaces were joined (nothing to hand
 * over then) print uctr's "error:" and "hint:" lines and use the Python launcher's codes. */
#define _GNU_SOURCE
#include "fastjoin.h"
#include "replay.h"

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
/* UCTR_PY_PYTHON and UCTR_PY_PACKAGE (both or neither): the Python and the directory that
 * holds the uctr_batch package of a checkout, which is what UCTR_PY_LAUNCHER ends up
 * running (launchers/uctr-exec, with UCTR_PYTHON): the hand-over execs that Python
 * directly, with the shim's arguments, PYTHONPATH and signal capture, and skips two sh. */

#define EXIT_USER 1
#define EXIT_MODE 3
#define EXIT_NOT_EXECUTABLE 126
#define EXIT_NOT_FOUND 127

extern char **environ;

static char **g_argv;
static int g_argc;
static int g_debug;

#ifdef UCTR_PY_PYTHON
#include <signal.h>
#include <stdint.h>
#include <sys/syscall.h>

/* What launchers/uctr-exec exports for uctr_batch.modes.sigstate: UCTR_SIGSTATE=PID:IGN:BLK,
 * this process's pid (exec keeps it) and its ignored and blocked signals as /proc prints
 * SigIgn and SigBlk (hex, bit N-1 for signal N), queried from the kernel: no /proc read. */
static void export_sigstate(void)
{
    uint64_t ignored = 0, blocked = 0;
    char value[64];
    for (int n = 1; n <= 64; n++) {
        struct sigaction sa;
        /* glibc refuses its reserved signals (32, 33): nobody can have ignored them */
        if (sigaction(n, NULL, &sa) == 0 && !(sa.sa_flags & SA_SIGINFO)
            && sa.sa_handler == SIG_IGN)
            ignored |= (uint64_t)1 << (n - 1);
    }
    /* the kernel's mask as it is, 64 bits (libc's sigset_t is larger and hides its own) */
    if (syscall(SYS_rt_sigprocmask, SIG_BLOCK, NULL, &blocked, sizeof(blocked)) < 0)
        return; /* no capture: the Python launcher undoes only what Python changed */
    snprintf(value, sizeof(value), "%ld:%016llx:%016llx", (long)getpid(),
             (unsigned long long)ignored, (unsigned long long)blocked);
    setenv("UCTR_SIGSTATE", value, 1);
}

/* Exec the Python launcher as launchers/uctr-exec would in a checkout: python -S -c ...
 * with the package first on PYTHONPATH. Returns when the Python cannot be exec'd. */
static void exec_python(void)
{
    static const char code[] = "from uctr_batch.launch.main import main; "
                               "raise SystemExit(main())";
    /* a checkout moved since the install: the wrapper says so, Python would print a traceback */
    if (access(UCTR_PY_PACKAGE "/uctr_batch/launch/main.py", R_OK) < 0)
        return;
    char **argv = calloc((size_t)g_argc + 4, sizeof(*argv));
    const char *old = getenv("PYTHONPATH");
    char *saved = old ? strdup(old) : NULL, *path;
    if (!argv || (old && !saved))
        return;
    if (asprintf(&path, "%s%s%s", UCTR_PY_PACKAGE, old && *old ? ":" : "",
                 old && *old ? old : "") < 0)
        return;
    argv[0] = (char *)UCTR_PY_PYTHON;
    argv[1] = (char *)"-S";
    argv[2] = (char *)"-c";
    argv[3] = (char *)code;
    for (int i = 1; i < g_argc; i++)
        argv[3 + i] = g_argv[i];
    setenv("PYTHONPATH", path, 1);
    export_sigstate();
    execv(UCTR_PY_PYTHON, argv);
    if (g_debug)
        fprintf(stderr, "uctr-exec: cannot exec %s: %s; trying %s\n", UCTR_PY_PYTHON,
                strerror(errno), UCTR_PY_LAUNCHER);
    /* UCTR_SIGSTATE stays: it names this process, whose signal state is still that */
    if (saved)
        setenv("PYTHONPATH", saved, 1);
    else
        unsetenv("PYTHONPATH");
    free(saved);
    free(path);
    free(argv);
}
#endif

/* Hand everything to the Python launcher: same argv, same environment. */
static void fallback(const char *why)
{
    if (g_debug)
        fprintf(stderr, "uctr-exec: python path: %s\n", why);
#ifdef UCTR_PY_PYTHON
    exec_python();
#endif
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
    if (argc > 1 && strcmp(argv[1], RP_HOLDER_FLAG) == 0)
        rp_holder_main(argc, argv);  /* a step's holder, started by the SPANK plugin */
    struct fj_join j = FJ_JOIN_INIT;
    char started[32];
    g_argv = argv;
    g_argc = argc;
    apply_front_env();
    g_debug = getenv("UCTR_FAST_DEBUG") != NULL;
    const char *why = fj_prepare(&j, argc, argv, environ);
    if (why == fj_failed)
        fj_fail_as_recorded(&j);
    if (why)
        fallback(why); /* the kernel drops our lock and descriptors at exec (O_CLOEXEC) */
    if (j.me.size > 1)
        fj_name_rank(j.me.rank);
    if (fj_start_time("self", started, sizeof(started)) < 0)
        fallback("cannot read /proc/self/stat");
    const char *inuse = fr_value(&j.rec, "inuse_dir");
    if (inuse)
        fj_mark_in_use(inuse); /* before setns: the host path is out of sight afterwards */
    /* in that user namespace already: uctr-exec run inside the container */
    if (fj_setns_user(j.ns[0]) < 0)
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
