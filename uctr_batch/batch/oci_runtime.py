"""uctr-oci: the runtime that Slurm's oci.conf calls (site-config/slurm/oci.conf.uctr).

With `IgnoreFileConfigJson=true` (Slurm >= 23.02) slurmstepd hands the `--container=` value
verbatim to RunTimeRun (%b), once per task, as the job user, in the job's working directory,
and replaces the task's exec with `/bin/sh -c "<RunTimeRun>"`. It does NOT hand the command
the task's environment: that environment (SLURM_PROCID, PMIx wiring, the user's variables) is
only in the file CreateEnvFile writes (%e). So, per task:

    uctr-oci run --bundle %b --env-file %e --step %s -- %@

  * reads the task's environment from the env file (NUL- or newline-separated, bounded, ours);
  * a normal step: becomes `uctr-exec IMAGE -- ARGV` in this process (no second Python), so
    the node's prolog-staged rootfs, the one-staging-per-node lock and the step's shared
    container on the node are exactly uctr-exec's; the payload replaces this process, so its
    exit status and signals are the task's;
  * the batch (and salloc's interactive) step: runs the script on the host, as the SPANK
    plugin does, with SRUN_CONTAINER=IMAGE so that every `srun` in it runs in the image
    (Slurm does not pass a job's container on to its steps); `--batch-in-container` runs
    the script itself in the image instead;
  * the SPANK plugin configured too: its task_init (which slurmstepd runs before the
    runtime) has already turned the task into `uctr-exec IMAGE -- ...`; that command line is
    run unchanged, so a task never nests two containers and the plugin's options apply.

    uctr-oci kill PID [SIGNAL]      uctr-oci delete PID

RunTimeKill/RunTimeDelete run as root in slurmstepd with %p, which Slurm expands to
4294967295 when it has no task: `kill 4294967295` is kill(-1), every process on the node.
These refuse anything but one real process id.

Standard library only: this runs once per task, before uctr-exec.
"""

import os
import sys

from uctr_batch.errors import EXIT_INTERNAL, ConfigError, UctrError, UsageError

ENV_FILE_MAX = 8 << 20  # bytes; Linux caps a process's environment well below this
BUNDLE_MAX = 4096
PID_MAX = 4194304  # the kernel's ceiling for pid_max (PID_MAX_LIMIT on 64-bit)
BATCH_STEP, INTERACTIVE_STEP = 0xFFFFFFFB, 0xFFFFFFFA  # slurm.h: SLURM_BATCH_SCRIPT, SLURM_INTERACTIVE_STEP
KILL_SIGNALS = {"TERM": 15, "INT": 2, "HUP": 1, "KILL": 9, "USR1": 10, "USR2": 12, "QUIT": 3,
                "CONT": 18, "STOP": 19}

USAGE = """\
usage: uctr-oci run --bundle VALUE --env-file FILE --step ID [--batch-in-container] -- ARGV...
       uctr-oci kill PID [SIGNAL]
       uctr-oci delete PID

The runtime of uctr-batch's oci.conf profile (site-config/slurm/oci.conf.uctr): Slurm runs
it with its %b, %e, %s, %@ and %p patterns; see docs/slurm.md, "Slurm's oci.conf".
"""
PROFILE_HINT = "use the oci.conf that `uctr slurm install --oci` writes (docs/slurm.md)"


class RunArgs:
    def __init__(self, bundle: str, env_file: str, step: int, batch_in_container: bool, argv):
        self.bundle, self.env_file, self.step = bundle, env_file, step
        self.batch_in_container, self.argv = batch_in_container, list(argv)


def parse_run(args) -> RunArgs:
    """The arguments of `run`; UsageError (exit 2) for anything else."""
    values = {"--bundle": None, "--env-file": None, "--step": None}
    batch_in_container = False
    args = list(args)
    while args:
        word = args.pop(0)
        if word == "--":
            break
        if word == "--batch-in-container":
            batch_in_container = True
            continue
        name, eq, value = word.partition("=")
        if name not in values:
            raise UsageError("uctr-oci run: unknown argument %r" % word, PROFILE_HINT)
        if not eq:
            if not args:
                raise UsageError("uctr-oci run: %s needs a value" % name, PROFILE_HINT)
            value = args.pop(0)
        values[name] = value
    else:
        raise UsageError("uctr-oci run: no command: the arguments must end with -- %@",
                         PROFILE_HINT)
    for name, value in values.items():
        if value is None:
            hint = ("set CreateEnvFile=null in oci.conf and pass %e: the task's environment "
                    "(its rank, its PMI wiring) reaches the runtime only through that file"
                    if name == "--env-file" else PROFILE_HINT)
            raise UsageError("uctr-oci run: %s is missing" % name, hint)
    if not args:
        raise UsageError("uctr-oci run: the task has no command", PROFILE_HINT)
    return RunArgs(check_bundle(values["--bundle"]), values["--env-file"],
                   parse_step(values["--step"]), batch_in_container, args)


def check_bundle(value: str) -> str:
    """Slurm's --container value, which uctr takes as an image reference."""
    hint = "give an image, e.g. --container=docker.io/library/debian:12"
    if not value:
        raise UsageError("--container is empty", hint)
    if len(value) > BUNDLE_MAX:
        raise UsageError("--container value is longer than %d characters" % BUNDLE_MAX, hint)
    if value.startswith("-") or any(c.isspace() or ord(c) < 32 for c in value):
        raise UsageError("--container=%r is not an image reference" % value[:200], hint)
    return value


def parse_step(value: str) -> int:
    try:
        step = int(value, 10)
    except ValueError:
        step = -1
    if not 0 <= step <= 0xFFFFFFFF:
        raise UsageError("uctr-oci run: --step %r is not a Slurm step id" % value[:40],
                         "pass Slurm's %s pattern: --step %s")
    return step


def read_env_file(path: str, uid: int):
    """The task's environment, from the file CreateEnvFile wrote (NUL-separated with
    CreateEnvFile=null, or one per line with `newline`). Only a plain file of the job
    user's, never through a symlink, and bounded: anything else is a ConfigError."""
    hint = "check CreateEnvFile=null and --env-file %e in oci.conf"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError("cannot open the task's environment file %s: %s"
                          % (path, e.strerror), hint)
    try:
        import stat

        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            raise ConfigError("%s is not a plain file of uid %d" % (path, uid), hint)
        if st.st_size > ENV_FILE_MAX:
            raise ConfigError("%s is larger than %d bytes" % (path, ENV_FILE_MAX), hint)
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > ENV_FILE_MAX:
                raise ConfigError("%s is larger than %d bytes" % (path, ENV_FILE_MAX), hint)
            chunks.append(chunk)
    finally:
        os.close(fd)
    return parse_env(b"".join(chunks), path)


def parse_env(data: bytes, path: str = "the environment file"):
    separator = b"\0" if b"\0" in data else b"\n"
    env = {}
    for entry in data.split(separator):
        if not entry:
            continue
        name, eq, value = entry.partition(b"=")
        if not eq or not name:
            raise ConfigError("%s holds an entry that is not NAME=VALUE: %r"
                              % (path, entry[:60]), "check CreateEnvFile in oci.conf")
        env[os.fsdecode(name)] = os.fsdecode(value)
    if not env:
        raise ConfigError("%s is empty" % path, "check CreateEnvFile=null in oci.conf")
    return env


def spank_wrapped(argv, env) -> bool:
    """True when the SPANK plugin's task_init already made this task `uctr-exec IMAGE -- ...`
    (its UCTR_IMAGE names the same image); then that command line is run as it is."""
    return (len(argv) >= 3 and os.path.basename(argv[0]) == "uctr-exec" and argv[2] == "--"
            and env.get("UCTR_IMAGE") == argv[1])


def host_file(path: str) -> bool:
    """What slurmstepd's PATH search accepts: it exists and is not a directory."""
    import stat

    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def unresolve(argv, env, is_file=host_file):
    """The task's command as the user wrote it, for a lookup in the image.

    slurmstepd looks a bare program name up in the task's PATH on the host before it runs
    the runtime (`sh` arrives as /usr/bin/sh), and the image may keep it elsewhere (/bin/sh).
    An absolute argv[0] that is exactly the host's first PATH hit for its name goes back to
    the bare name; the image's PATH then decides. (Someone who typed that very path gets
    the image's first program of that name: the same file in any usual image.)"""
    program = argv[0]
    name = os.path.basename(program)
    if not program.startswith("/") or not name:
        return argv
    for directory in env.get("PATH", "").split(":"):
        if directory and is_file(os.path.join(directory, name)):
            return [name] + argv[1:] if os.path.join(directory, name) == program else argv
    return argv


def plan_run(args: RunArgs, env, is_file=host_file):
    """("exec", argv, env) to exec on the host, or ("uctr-exec", argv, env) for uctr-exec's
    main in this process. No exec; the file system only through IS_FILE (unresolve)."""
    env = dict(env)
    if spank_wrapped(args.argv, env):
        return "exec", args.argv, env
    env.pop("UCTR_ARGV0", None)  # a handover from a 22.05 plugin means nothing here
    if args.step in (BATCH_STEP, INTERACTIVE_STEP) and not args.batch_in_container:
        env.setdefault("SRUN_CONTAINER", args.bundle)  # every srun in the script: the image
        return "exec", args.argv, env
    if args.step == BATCH_STEP:  # the script lives in slurmd's spool dir: bind it
        script = args.argv[0]
        mounts = env.get("UCTR_MOUNTS")
        env["UCTR_MOUNTS"] = (mounts + "," if mounts else "") + "%s:%s:ro" % (script, script)
        return "uctr-exec", [args.bundle, "--"] + args.argv, env
    return "uctr-exec", [args.bundle, "--"] + unresolve(args.argv, env, is_file), env


def run(words) -> int:
    args = parse_run(words)
    env = read_env_file(args.env_file, os.geteuid())
    site_policy = os.environ.get("UCTR_POLICY")  # set by the root-installed wrapper
    if site_policy:  # the site's, as the plugin's policy= is: not the job's own choice
        env["UCTR_POLICY"] = site_policy
    kind, argv, env = plan_run(args, env)
    state = os.environ.get("UCTR_SIGSTATE")  # the shim's capture: this process's own
    os.environ.clear()
    os.environ.update(env)
    if state:
        os.environ["UCTR_SIGSTATE"] = state
    if kind == "uctr-exec":
        from uctr_batch.launch.main import main as uctr_exec

        return uctr_exec(argv)
    from uctr_batch.modes import sigstate

    sigstate.restore(env)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise ConfigError("cannot run %s: %s" % (argv[0], e.strerror),
                          "check the command of the job or step")
    return EXIT_INTERNAL  # not reached: exec or raise


def parse_pid(value: str) -> int:
    """One real process id: Slurm passes 4294967295 for %p when there is no task."""
    try:
        pid = int(value, 10)
    except ValueError:
        pid = 0
    if not 1 < pid <= PID_MAX:
        raise UsageError("uctr-oci: %r is not a process id" % value[:40],
                         "Slurm passes the task's pid as %p; 4294967295 means no task")
    return pid


def kill(words, default: str = "TERM") -> int:
    if not 1 <= len(words) <= 2:
        raise UsageError("uctr-oci kill: expected PID [SIGNAL]", PROFILE_HINT)
    pid = parse_pid(words[0])
    name = (words[1] if len(words) == 2 else default).upper()
    name = name[3:] if name.startswith("SIG") else name
    signum = KILL_SIGNALS.get(name)
    if signum is None:
        raise UsageError("uctr-oci kill: unknown signal %r" % words[1][:20],
                         "one of: %s" % " ".join(sorted(KILL_SIGNALS)))
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return 0  # already gone: what the caller wanted
    except PermissionError:
        raise ConfigError("uctr-oci: not allowed to signal pid %d" % pid,
                          "RunTimeKill/RunTimeDelete run as root in slurmstepd")
    return 0


def main(argv=None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        if words and words[0] in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        if not words:
            raise UsageError("uctr-oci: no action", "one of: run, kill, delete "
                             "(see `uctr-oci --help`)")
        action, rest = words[0], words[1:]
        if action == "run":
            return run(rest)
        if action == "kill":
            return kill(rest)
        if action == "delete":
            if len(rest) != 1:
                raise UsageError("uctr-oci delete: expected PID", PROFILE_HINT)
            return kill(rest + ["KILL"])
        raise UsageError("uctr-oci: unknown action %r" % action[:40],
                         "one of: run, kill, delete (see `uctr-oci --help`)")
    except UctrError as e:
        sys.stderr.write("uctr: error: %s\nuctr: hint: %s\n" % (e.message, e.hint)
                         if e.hint else "uctr: error: %s\n" % e.message)
        return e.exit_code
