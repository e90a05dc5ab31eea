"""uctr-exec's command line and UCTR_* settings (the contract with the SPANK plugin and the
PBS hooks, see docs/launcher.md).

    uctr-exec [--mode M] [--mpi PROFILE|auto|none] [--gpu auto|nvidia|amd|none]
              [-v SRC:DST[:ro]]... [-e K=V]... [-w DIR] [--writable] [--verbose]
              [--name NAME[:FLAG]] [--save PATH] [--[no-]remap-root] [--[no-]entrypoint]
              IMAGE [--] CMD...

Options end at IMAGE; everything after it (after an optional --) is the command, never
parsed. When UCTR_ARGV0 is set, the SPANK plugin has replaced argv[0] of the task in place:
the image is UCTR_IMAGE and the command is UCTR_ARGV0 followed by our arguments, untouched.

Environment (flags win): UCTR_IMAGE, UCTR_MODE, UCTR_MPI, UCTR_GPU, UCTR_MOUNTS (pyxis
syntax SRC[:DST[:FLAGS]],... with FLAGS like ro or ro+nosuid), UCTR_WORKDIR,
UCTR_ENV_NAMES (NAME,... copied from the host like -e NAME), UCTR_WRITABLE=1,
UCTR_MOUNT_HOME=0|1, UCTR_VERBOSE=N; the pyxis options (docs/migration.md): UCTR_NAME
(NAME[:FLAG]), UCTR_NAME_SCOPE (job|global), UCTR_SAVE, UCTR_REMAP_ROOT=0|1,
UCTR_ENTRYPOINT=0|1, UCTR_ENTRYPOINT_LOG=0|1. With UCTR_NAME, IMAGE may be left out when the
named container exists.

A hand-written parser: argparse costs milliseconds per rank and cannot stop at IMAGE.
"""

import os

from uctr_batch.errors import UsageError

USAGE = """usage: uctr-exec [--mode M] [--mpi PROFILE|auto|none] [--gpu auto|nvidia|amd|none]
                 [-v SRC[:DST[:ro|rw]]]... [-e K[=V]]... [-w DIR] [--writable] [--verbose]
                 IMAGE [--] CMD [ARG]...

Run CMD as one rank of a parallel job inside IMAGE. Started by srun, mpirun, mpiexec or a
PBS launcher once per rank; the ranks of a job step on a node share one container.

options:
  --mode M          execution mode (N1 R1 P1 P2 F1 S1); default: the site's ladder
  --mpi P           host MPI injection: a policy profile, auto (detect the host MPI) or none
  --gpu V           GPU injection: auto, nvidia, amd or none (default: the site policy)
  -v, --volume SPEC bind-mount a host path, SRC[:DST[:ro|rw]] (repeatable)
  -e, --env K[=V]   set a variable; -e K copies it from the host (repeatable)
  -w, --workdir DIR working directory inside the container
  --writable        do not mount the image read-only (writes persist in the node's copy)
  --no-home         do not bind-mount $HOME
  --name N[:FLAG]   run in the named container N (a writable copy kept for later steps);
                    FLAG: auto, create, exec, no_create, no_exec (as pyxis --container-name)
  --save PATH       when the step ends, save the container as a squashfs image at PATH
  --remap-root      run as uid 0 inside (mapped to you; no privilege on the host)
  --no-remap-root   run as yourself inside (default)
  --entrypoint      run the image's Entrypoint before the command (default)
  --no-entrypoint   run the command without the image's Entrypoint (pyxis's default)
  --entrypoint-log  accepted for pyxis: the Entrypoint's output is the task's, always shown
  --verbose         more diagnostics, with the injection manifest (repeatable)
  -h, --help        this help
environment: UCTR_IMAGE UCTR_MODE UCTR_MPI UCTR_GPU UCTR_MOUNTS UCTR_WORKDIR UCTR_ENV_NAMES
  UCTR_WRITABLE UCTR_MOUNT_HOME UCTR_STAGE_TIMEOUT UCTR_VERBOSE UCTR_NAME UCTR_NAME_SCOPE
  UCTR_SAVE UCTR_REMAP_ROOT UCTR_ENTRYPOINT UCTR_ENTRYPOINT_LOG (see docs/launcher.md)
"""

MPI_WORDS = ("auto", "none")
GPU_WORDS = ("auto", "nvidia", "amd", "none")

_WITH_VALUE = {"--mode": "mode", "--mpi": "mpi", "--gpu": "gpu", "-v": "volume",
               "--volume": "volume", "-e": "env", "--env": "env", "-w": "workdir",
               "--workdir": "workdir", "--name": "name", "--save": "save"}
_FLAGS = {"--writable": ("writable", True), "--no-home": ("mount_home", False),
          "--remap-root": ("remap_root", True), "--no-remap-root": ("remap_root", False),
          "--entrypoint": ("entrypoint", True), "--no-entrypoint": ("entrypoint", False),
          "--entrypoint-log": ("entrypoint_log", True)}


class Options:
    __slots__ = ("image", "command", "mode", "mpi", "gpu", "volumes", "env", "workdir",
                 "writable", "mount_home", "verbose_flags", "verbosity", "help", "name",
                 "name_scope", "save", "remap_root", "entrypoint", "entrypoint_log")

    def __init__(self):
        self.image = None
        self.command = []
        self.mode = self.mpi = self.gpu = self.workdir = None
        self.volumes = []  # run.parse_volume syntax: SRC[:DST[:ro|rw]]
        self.env = []  # -e items, K=V or K
        self.writable = False
        self.mount_home = True
        self.verbose_flags = 0
        self.verbosity = 0
        self.help = False
        self.name = self.save = None  # pyxis --container-name / --container-save
        self.name_scope = "job"
        self.remap_root = False
        self.entrypoint = True  # docker's rule; the SPANK plugin passes pyxis's (0)
        self.entrypoint_log = False


# Meant for this one process only: the SPANK plugin's hand-over of the task's argv[0]. The
# payload must not inherit it, or a nested `srun uctr-exec IMG CMD` (in a batch script that
# runs in the container) would take IMG and CMD for arguments of the batch script. The other
# UCTR_* settings mean what the flags mean and stay, so a nested uctr-exec behaves the same.
HANDOVER_ONLY = ("UCTR_ARGV0",)


def consume_handover(env) -> None:
    """Remove the hand-over-only variables from env and from this process's environment
    (after parse(): every mode builds the payload's environment from them)."""
    for name in HANDOVER_ONLY:
        env.pop(name, None)
        os.environ.pop(name, None)


def parse(argv, env) -> Options:
    """Options from the command line (argv without argv[0]) and the environment."""
    opts = Options()
    _from_env(opts, env)
    if env.get("UCTR_ARGV0"):
        if not env.get("UCTR_IMAGE") and not opts.name:
            raise UsageError("UCTR_ARGV0 is set but UCTR_IMAGE is not",
                             "the SPANK plugin sets both; check plugstack.conf")
        opts.image = env.get("UCTR_IMAGE") or None
        opts.command = [env["UCTR_ARGV0"]] + list(argv)
        return _checked(opts, env)
    rest = _parse_options(opts, list(argv))
    if opts.help:
        return opts
    if rest and rest[0] == "--" and (env.get("UCTR_IMAGE") or opts.name):
        opts.image, rest = env.get("UCTR_IMAGE") or None, rest[1:]
    elif rest:
        opts.image, rest = rest[0], rest[1:]
        if rest and rest[0] == "--":
            rest = rest[1:]
    elif env.get("UCTR_IMAGE"):
        opts.image = env["UCTR_IMAGE"]
    if not opts.image and not opts.name:
        raise UsageError("no image given", "usage: uctr-exec [OPTIONS] IMAGE [--] CMD...")
    opts.command = rest
    return _checked(opts, env)


def _parse_options(opts: Options, args):
    """Consume options up to the first non-option; return the rest."""
    while args:
        arg = args[0]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            return args
        args.pop(0)
        if arg in ("-h", "--help"):
            opts.help = True
            return []
        if arg == "--verbose":
            opts.verbose_flags += 1
            continue
        if arg in _FLAGS:
            setattr(opts, *_FLAGS[arg])
            continue
        name, value = _split_option(arg, args)
        if name == "volume":
            opts.volumes.append(value)
        elif name == "env":
            opts.env.append(value)
        else:
            setattr(opts, name, value)
    return args


def _split_option(arg: str, args):
    if arg.startswith("--") and "=" in arg:
        flag, value = arg.split("=", 1)
    elif arg[:2] in ("-v", "-e", "-w") and len(arg) > 2 and not arg.startswith("--"):
        flag, value = arg[:2], arg[2:]
    else:
        flag, value = arg, None
    if flag not in _WITH_VALUE:
        raise UsageError("unknown option: %s" % arg, "see 'uctr-exec --help'")
    if value is None:
        if not args:
            raise UsageError("option %s needs a value" % flag, "see 'uctr-exec --help'")
        value = args.pop(0)
    return _WITH_VALUE[flag], value


def _from_env(opts: Options, env) -> None:
    opts.mode = env.get("UCTR_MODE") or None
    opts.mpi = env.get("UCTR_MPI") or None
    opts.gpu = env.get("UCTR_GPU") or None
    opts.workdir = env.get("UCTR_WORKDIR") or None
    opts.writable = env.get("UCTR_WRITABLE", "") == "1"
    opts.mount_home = env.get("UCTR_MOUNT_HOME", "1") != "0"
    opts.volumes = [pyxis_mount(m) for m in env.get("UCTR_MOUNTS", "").split(",") if m.strip()]
    opts.env = [n.strip() for n in env.get("UCTR_ENV_NAMES", "").split(",") if n.strip()]
    opts.name = env.get("UCTR_NAME") or None
    opts.name_scope = env.get("UCTR_NAME_SCOPE") or "job"
    opts.save = env.get("UCTR_SAVE") or None
    opts.remap_root = env.get("UCTR_REMAP_ROOT", "") == "1"
    opts.entrypoint = env.get("UCTR_ENTRYPOINT", "1") != "0"
    opts.entrypoint_log = env.get("UCTR_ENTRYPOINT_LOG", "") == "1"


def pyxis_mount(item: str) -> str:
    """pyxis/enroot SRC[:DST[:FLAGS]] (FLAGS joined with '+') -> SRC:DST:ro|rw."""
    parts = item.strip().split(":")
    if len(parts) > 3 or not parts[0]:
        raise UsageError("bad mount in UCTR_MOUNTS: %s" % item, "use SRC[:DST[:ro]],...")
    src = parts[0]
    dst = parts[1] if len(parts) > 1 and parts[1] else src
    flags = [f for f in parts[2].split("+") if f] if len(parts) > 2 else []
    unknown = [f for f in flags if f not in MOUNT_FLAGS]
    if unknown or src in ("tmpfs", "umount"):
        what = "mount flag %s" % unknown[0] if unknown else "mount source %s" % src
        raise UsageError("--container-mounts=%s: %s is not supported by uctr" % (item, what),
                         "uctr takes the flags %s; see docs/migration.md" % ", ".join(MOUNT_FLAGS))
    return "%s:%s:%s" % (src, dst, "ro" if "ro" in flags else "rw")


# pyxis/enroot mount flags uctr honours: ro/rw; its binds are recursive and private, their
# mount points are created, and nosuid/nodev hold anyway for an unprivileged container (no
# uid or device of the host gains anything in it). Others (noexec, slave...) are refused.
MOUNT_FLAGS = ("ro", "rw", "rbind", "bind", "rprivate", "private", "nosuid", "nodev",
               "x-create=auto", "x-create=dir", "x-create=file")


def _checked(opts: Options, env) -> Options:
    try:
        opts.verbosity = opts.verbose_flags + int(env.get("UCTR_VERBOSE") or 0)
    except ValueError:
        opts.verbosity = opts.verbose_flags
    if opts.gpu is not None and opts.gpu not in GPU_WORDS:
        raise UsageError("unknown --gpu value: %s" % opts.gpu, "use auto, nvidia, amd or none")
    if opts.name is not None:
        from uctr_batch.launch.named import SCOPES, parse_name

        parse_name(opts.name)
        if opts.name_scope not in SCOPES:
            raise UsageError("unknown container scope: %s" % opts.name_scope,
                             "UCTR_NAME_SCOPE (plugstack.conf container_scope=) is job or global")
    if opts.save is not None and (not opts.save or opts.save.endswith("/")):
        raise UsageError("--container-save=%s: target is a directory" % opts.save,
                         "give the path of the squashfs file to write, e.g. ~/saved.sqsh")
    if opts.workdir is not None and not opts.workdir.startswith("/"):
        raise UsageError("working directory must be absolute: %s" % opts.workdir,
                         "give a path inside the container that starts with /, e.g. -w /work "
                         "(or UCTR_WORKDIR=/work)")
    return opts
