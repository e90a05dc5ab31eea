"""The fast-join record: "a running step container on this node", for the C front.

The rank that creates a step's N1 container (sharedns.Rendezvous.publish) also writes this
record; the C front `uctr-exec` (launchers/c/uctr_exec.c) reads it and, when the request of
the rank at hand is the creator's, joins the container and execs the payload without
starting Python. Anything it does not understand or cannot check sends it to this Python
launcher, unchanged. The format is specified in launchers/c/record.md; FIELDS below and the
C table in launchers/c/fastrec.c are one list (tests/unit/test_fastrec.py compares them and
runs the C parser on records written here).

Where: <UCTR_LOCAL_DIR, else /tmp/uctr-UID>/launch/fast-step-<safe step key>.rec, 0600.
The C front reads no policy, so the directory follows from the environment alone. It is
the step's rendezvous directory (sharedns) whenever the policy's storage.local_dir is that
same base, the usual case: the C front then opens and checks one directory for both, the
record and the lock (launchers/c/fastjoin.c). Otherwise (a storage.local_dir template, or
the fallback root of location.py) the record still goes to <env base>/launch, created
private like any launch directory, and its launch_dir names the other one. The names
never meet the rendezvous files: sharedns's are step-*, ours fast-step-*, and each side's
garbage collection takes only its own. A fast/ directory left by an older version is no
longer read, written or cleaned (a few stale records; remove it at will).

Only the stdlib's start-up set is imported: this runs in the creating rank.
"""

import os

from uctr_batch import envspec
from uctr_batch.launch import procspec, recipe

VERSION = 1
HEADER = "uctr-fast-record"
RECORD_DIR = "launch"  # staged.LAUNCH_DIR, without its imports
RECORD_PREFIX = "fast-"  # never "step-": those are sharedns's rendezvous files
SEEN = RECORD_PREFIX + "seen"  # its mtime: when a record was last written here (C: holds_records)
COLLECTED = RECORD_PREFIX + "collected"  # its mtime: the last garbage collection here
MAX_BYTES = 1 << 20  # the C parser refuses larger records
MAX_LINES = 65536

# (name, least args, most args, how often). "once": exactly once; "opt": at most once;
# "many": any number of times; "cont": exactly once in a container record, never in an
# outcome record (no_container or failed: the first rank made no container to join).
# Order of lines matters only for the env_* program and the repeated list fields (opt,
# entrypoint, cmd, member).
FIELDS = (
    (HEADER, 1, 1, "once"),      # format version
    ("step", 1, 1, "once"),      # the step key (rank.RankContext.step_key)
    ("uid", 1, 1, "once"),       # the caller's uid and gid: the C front's must be equal
    ("gid", 1, 1, "once"),
    ("mode", 1, 1, "cont"),      # N1 (the only mode whose ranks share a container)
    ("fallback", 1, 1, "opt"),   # a reason: the C front must hand over to Python
    ("no_container", 1, 1, "opt"),  # outcome: a reason; no container comes, ranks go to Python
    ("failed", 2, 2, "opt"),     # outcome: EXIT-CODE MESSAGE of the first rank's error
    ("failed_hint", 1, 1, "opt"),
    ("failed_command", 1, 1, "opt"),  # the error is about this command only
    ("parent", 2, 2, "opt"),     # PID START-TIME of the writer's parent (an outcome's launch)
    ("launch_dir", 1, 1, "cont"),  # the rendezvous directory (host path, private)
    ("stem", 1, 1, "cont"),      # step-...: STEM.lock, STEM.gN.members
    ("generation", 1, 1, "cont"),
    ("user_ns", 1, 1, "cont"),   # namespace inodes a member must have
    ("mnt_ns", 1, 1, "cont"),
    ("member", 2, 2, "many"),    # PID START-TIME: creator and holder
    ("inuse_dir", 1, 1, "opt"),  # where a rank marks the bundle in use (pid-PID)
    ("rootfs", 1, 1, "cont"),    # informational: applied already
    ("bind", 3, 3, "many"),      # SRC DST ro|rw, informational: applied already
    ("host_cwd", 1, 1, "once"),  # the creator's cwd: a rank elsewhere goes to Python
    ("cwd", 1, 1, "cont"),       # the working directory inside for such a rank
    ("handover", 1, 1, "once"),  # 1: SPANK's UCTR_ARGV0 hand-over, command = ARGV0 + argv
    ("opt", 1, 1, "many"),       # the option tokens before the command, in order
    ("opts_complete", 1, 1, "once"),  # 1: any token after the opts is the command
    ("entrypoint", 1, 1, "many"),
    ("cmd", 1, 1, "many"),       # the image's Cmd (used when no command is given)
    ("require", 2, 2, "many"),   # NAME VALUE: the host env must have NAME=VALUE
    ("absent", 1, 1, "many"),    # NAME: the host env must not have NAME
    ("require_prefix", 1, 1, "many"),  # PREFIX: host NAMEs with it are exactly the required
    ("ignore", 1, 1, "many"),    # NAME: exempt from require_prefix (per-process variables)
    ("env_set", 2, 2, "many"),   # the environment program, in order (see run_program)
    ("env_pass", 1, 1, "many"),
    ("env_pass_prefix", 1, 1, "many"),
    ("env_pass_name", 1, 1, "many"),
    ("env_copy", 1, 1, "many"),
    ("env_unset", 1, 1, "many"),
    ("env_default", 2, 2, "many"),
    ("env_join", 2, 256, "many"),
    ("env_append", 2, 2, "many"),
    # replay templates only (launch.replay): what the C creator needs for the next step
    ("replay_key", 1, 1, "opt"),      # the template's name part (replay.key)
    ("replay_until", 1, 1, "opt"),    # epoch seconds: the recipe expires
    ("replay_limit", 1, 1, "opt"),    # seconds: the holder's limit (the staging timeout)
    ("replay_python", 2, 2, "opt"),   # MAJOR MINOR of the rendezvous record's readers
    ("replay_stat", 1, 5, "many"),    # PATH [MTIME CTIME SIZE INODE]: unchanged, or absent
    ("replay_marker", 2, 2, "many"),  # FILE TEXT: the bundle is still complete
    ("replay_vary", 1, 1, "many"),    # NAME: a required variable whose value may differ
    ("replay_absent_dir", 1, 1, "many"),  # PATH with the ids stood in: must not exist
    ("replay_op", 2, 4, "many"),      # OP ARGS: the setup, in order (n1.REPLAY_OPS)
    ("replay_nskey", 1, 1, "opt"),    # repr of the namespace key's inputs, ids stood in
    ("replay_extras", 1, 1, "opt"),   # hex of marshal(extras) for the rendezvous record
    ("replay_manifest", 2, 2, "opt"),  # PATH HEX: the injection manifest's bytes
    ("replay_warning", 1, 1, "many"),  # printed by the creating task, as Python does
    ("replay_command", 1, 1, "opt"),  # the program (the recipe's MPI plan reads its ELF)
    ("end", 0, 0, "once"),       # last line: a truncated record is refused
)
FIELD_NAMES = tuple(f[0] for f in FIELDS)
OUTCOMES = ("no_container", "failed")  # a record with one of them describes no container
ENV_OPS = tuple(n for n in FIELD_NAMES if n.startswith("env_"))

# Variables that differ per process and never shape the container.
IGNORED = ("UCTR_SIGSTATE", "UCTR_ARGV0", "UCTR_FAST_DEBUG")
REQUIRED_PREFIXES = recipe.STEP_ENV_PREFIXES + ("UCTR_",)


class Unsupported(Exception):
    """The C front cannot reproduce this rank exactly; the record says fallback."""


# -- encoding -------------------------------------------------------------------------------

def encode(value) -> str:
    """One token: bytes outside '!'..'~' and '%' as %XX; the empty string as %-."""
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if not data:
        return "%-"
    return "".join(chr(b) if 0x21 <= b <= 0x7e and b != 0x25 else "%%%02X" % b for b in data)


def decode(token: str) -> str:
    """encode()'s inverse; ValueError for anything encode() cannot have written."""
    if token == "%-":
        return ""
    raw = token.encode("ascii")
    if not raw:
        raise ValueError("empty token")
    out = bytearray()
    i = 0
    while i < len(raw):
        b = raw[i]
        if b == 0x25:
            pair = raw[i + 1:i + 3]
            if len(pair) != 2 or any(c not in _HEX for c in pair):
                raise ValueError("bad escape")
            out.append(int(pair, 16))
            i += 3
        elif 0x21 <= b <= 0x7e:
            out.append(b)
            i += 1
        else:
            raise ValueError("raw byte %d" % b)
    if 0 in out:
        raise ValueError("NUL in a token")
    return out.decode("utf-8", "surrogateescape")


_HEX = b"0123456789abcdefABCDEF"


def dumps(lines) -> bytes:
    """[(name, arg, ...)] -> the record's bytes."""
    return "".join(" ".join((name,) + tuple(encode(a) for a in args)) + "\n"
                   for name, *args in lines).encode("ascii")


def parse(data: bytes):
    """The record's lines as [(name, [args])]; ValueError when it breaks a rule of FIELDS
    (the reference for the C parser: both must accept and refuse the same records)."""
    if len(data) > MAX_BYTES:
        raise ValueError("record too large")
    text = data.decode("ascii")
    if not text.endswith("\n"):
        raise ValueError("no final newline")
    if text.count("\n") > MAX_LINES:
        raise ValueError("too many lines")
    table = {f[0]: f for f in FIELDS}
    seen = {}
    out = []
    for line in text[:-1].split("\n"):
        name, *tokens = line.split(" ")
        spec = table.get(name)
        if spec is None:
            raise ValueError("unknown field %r" % name)
        if "end" in seen:
            raise ValueError("line after end")
        if not out and name != HEADER:
            raise ValueError("no header")
        if not spec[1] <= len(tokens) <= spec[2]:
            raise ValueError("%s: %d arguments" % (name, len(tokens)))
        seen[name] = seen.get(name, 0) + 1
        if spec[3] != "many" and seen[name] > 1:
            raise ValueError("%s repeated" % name)
        out.append((name, [decode(t) for t in tokens]))
    outcome = [name for name in OUTCOMES if name in seen]
    if len(outcome) > 1:
        raise ValueError("two outcomes")
    if "failed" not in seen and any(name in seen for name in ("failed_hint", "failed_command")):
        raise ValueError("failed_* without failed")
    for name, _lo, _hi, how in FIELDS:
        if how == "cont" and outcome and name in seen:
            raise ValueError("%s in an outcome record" % name)
        if (how == "once" or how == "cont" and not outcome) and name not in seen:
            raise ValueError("%s missing" % name)
    code = next((args[0] for name, args in out if name == "failed"), None)
    if code is not None and not exit_code(code):
        raise ValueError("bad exit code")
    if out[0][1] != [str(VERSION)]:
        raise ValueError("unknown version")
    return out


def exit_code(token: str) -> bool:
    """An outcome's exit code: 1 to 255 in decimal, no sign, no leading zero."""
    return token.isdigit() and token.isascii() and token[0] != "0" and int(token) <= 255


# -- where ----------------------------------------------------------------------------------

def fast_dir(env) -> str:
    """The record's directory, <UCTR_LOCAL_DIR, else /tmp/uctr-UID>/launch: the launch
    directory itself when the policy's local dir is that base (the C front then compares
    the record's launch_dir with this path, string-equal, and opens one directory)."""
    base = env.get("UCTR_LOCAL_DIR") or "/tmp/uctr-%d" % os.getuid()
    return os.path.join(base, RECORD_DIR)


def open_dir(env) -> int:
    """fast_dir(env), private (nodelock.open_private_dir), in a base that is private too: a
    /tmp/uctr-UID that another user made first (before the rank's own staging moved to a
    fallback directory, location.py) holds no records. Its owner could swap our launch/
    for another of our directories: no record of theirs, but waits for nothing. The C
    readers do not check the base (a rank's calls are counted), so no record goes there."""
    from uctr_batch.launch.nodelock import open_private_dir

    path = fast_dir(env)
    os.close(open_private_dir(os.path.dirname(path)))
    return open_private_dir(path)


def record_name(step_key: str) -> str:
    from uctr_batch.launch.sharedns import safe_name

    return "%sstep-%s.rec" % (RECORD_PREFIX, safe_name(step_key))


# -- the environment program ----------------------------------------------------------------

def env_program(config, policy, user_env, extras):
    """The payload's environment as a program over the host environment: what
    procspec.finish_env(procspec.base_env(...), ...) computes, with everything that does not
    depend on the host's variables folded into env_set lines."""
    rules = procspec.Rules(policy.get("env"))
    base = envspec.parse_image_env(config.get("Env") or [])
    base.setdefault("PATH", envspec.DEFAULT_PATH)
    base = envspec.apply_rules(base, rules)
    prog = [("env_set", k, v) for k, v in base.items()]
    for pattern in rules.passthrough:
        if "[" in pattern or "\\" in pattern:
            raise Unsupported("passthrough pattern %s" % pattern)  # fnmatch dialects differ
        prog.append(("env_pass", pattern))
    user = _user_ops(user_env)
    prog += user
    prog += [("env_pass_prefix", p) for p in extras.get("passthrough_prefixes") or ()]
    prog += [("env_pass_name", n) for n in extras.get("passthrough_names") or ()]
    ops = extras.get("ops") or {}
    prog += [("env_unset", k) for k in ops.get("env_unset") or ()]
    prog += [("env_default", k, v) for k, v in (ops.get("env_defaults") or {}).items()]
    prog += [("env_set", k, v) for k, v in (ops.get("env") or {}).items()]
    prog += [("env_join", k, v) for k, v in (ops.get("env_prepend") or {}).items()]
    prog += [("env_append", k, v) for k, v in (ops.get("env_append") or {}).items()]
    if ops.get("ld_library_path"):
        prog.append(("env_join", "LD_LIBRARY_PATH") + tuple(ops["ld_library_path"]))
    if ops.get("path_prefix"):
        prog.append(("env_join", "PATH") + tuple(ops["path_prefix"]))
    if extras.get("gpu_vendor"):
        raise Unsupported("per-rank GPU visibility")
    return prog + user


def _user_ops(user_env):
    out = []
    for item in user_env or ():
        key, sep, value = item.partition("=")
        if not key:
            raise Unsupported("bad -e")
        out.append(("env_set", key, value) if sep else ("env_copy", key))
    return out


def run_program(program, host_env) -> dict:
    """The reference interpreter (launchers/c/fastrec.c run_env has the same rules)."""
    env = {}
    for name, *args in program:
        if name == "env_set":
            env[args[0]] = args[1]
        elif name == "env_pass":
            env.update(envspec.passthrough(host_env, (args[0],)))
        elif name == "env_pass_prefix":
            env.update({k: v for k, v in host_env.items() if k.startswith(args[0])})
        elif name == "env_pass_name":
            if args[0] in host_env:
                env[args[0]] = host_env[args[0]]
        elif name == "env_copy":
            if args[0] in host_env:
                env[args[0]] = host_env[args[0]]
            else:
                env.pop(args[0], None)
        elif name == "env_unset":
            env.pop(args[0], None)
        elif name == "env_default":
            env.setdefault(args[0], args[1])
        elif name == "env_join":
            env[args[0]] = procspec._join_path(args[1:], env.get(args[0]))
        elif name == "env_append":
            env[args[0]] = args[1] if not env.get(args[0]) else env[args[0]] + ":" + args[1]
    return env


# -- the record -----------------------------------------------------------------------------

def requirements(env):
    """What a rank's environment must hold to ask for the creator's container: the
    variables the namespace key reads (recipe.image_inputs, recipe.inputs), and every UCTR_*
    setting."""
    names = recipe.IMAGE_ENV + recipe.STEP_ENV
    if not (env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS")):
        names += recipe.RANK_GPU_VARS
    lines = []
    for name in names:
        lines.append(("require", name, env[name]) if name in env else ("absent", name))
    for prefix in REQUIRED_PREFIXES:
        lines.append(("require_prefix", prefix))
        lines += [("require", k, v) for k, v in sorted(env.items())
                  if k.startswith(prefix) and k not in names and k not in IGNORED]
    lines += [("ignore", n) for n in IGNORED]
    return lines


def build(*, step_key, prefix, complete, handover, config, policy, user_env, extras, env, host_cwd,
          cwd, launch_dir, stem, record, inuse, spec, verbosity):
    """The record's lines (without the header and end), for Rendezvous record `record`."""
    lines = [("step", step_key), ("uid", str(os.getuid())), ("gid", str(os.getgid())),
             ("mode", "N1")]
    reason = None
    try:
        program = env_program(config, policy, user_env, extras)
    except Unsupported as e:
        program, reason = [], str(e)
    if verbosity >= 2:
        reason = reason or "--verbose diagnostics"
    if host_cwd is None:
        reason = reason or "no working directory on the host"
    if reason:
        lines.append(("fallback", reason))
    lines += [("launch_dir", launch_dir), ("stem", stem),
              ("generation", str(record["generation"])), ("user_ns", str(record["user"])),
              ("mnt_ns", str(record["mnt"]))]
    lines += [("member", str(pid), str(started or "0")) for pid, started in record["members"]]
    if inuse:
        lines.append(("inuse_dir", inuse))
    lines.append(("rootfs", spec.rootfs))
    lines += [("bind", src, dst, "ro" if ro else "rw") for src, dst, ro in spec.binds]
    lines.append(("cwd", cwd))
    lines += request(prefix, complete, handover, host_cwd)
    lines += [("entrypoint", a) for a in config.get("Entrypoint") or ()]
    lines += [("cmd", a) for a in config.get("Cmd") or ()]
    lines += requirements(env)
    return lines + program


def request(prefix, complete, handover, host_cwd):
    """The lines a rank's command line and working directory must match."""
    lines = [("host_cwd", host_cwd or "/"), ("handover", "1" if handover else "0")]
    lines += [("opt", token) for token in prefix]
    return lines + [("opts_complete", "1" if complete else "0")]


def outcome(*, step_key, prefix, complete, handover, env, host_cwd, parent, reason=None,
            error=None, command=None):
    """An outcome record's lines: the request, as build() writes it, and what the rank that
    was to make the step's container did instead. `reason`: it made none (another mode
    runs one container per rank); the other ranks go to the Python launcher at once.
    `error` (a UctrError): it failed; ranks asking the same, and running `command` when it
    is given, fail with the same message and exit code. `parent`: (pid, start time) of
    the writer's parent, the launcher of this run of the step (a requeued job's steps have
    the same keys)."""
    lines = [("step", step_key), ("uid", str(os.getuid())), ("gid", str(os.getgid()))]
    if error is None:
        lines.append(("no_container", reason))
    else:
        lines.append(("failed", str(error.exit_code), error.message))
        if error.hint:
            lines.append(("failed_hint", error.hint))
        if command is not None:
            lines.append(("failed_command", command))
    lines.append(("parent", str(parent[0]), str(parent[1] or "0")))
    return lines + request(prefix, complete, handover, host_cwd) + requirements(env)


def write(dir_fd: int, name: str, lines) -> None:
    """Replace NAME (0600, through a temporary file and rename: readers see whole records)."""
    data = dumps([(HEADER, str(VERSION))] + list(lines) + [("end",)])
    if len(data) > MAX_BYTES:
        data = dumps([(HEADER, str(VERSION))] + [ln for ln in lines if ln[0] in (
            "step", "uid", "gid", "mode", "launch_dir", "stem", "generation", "user_ns",
            "mnt_ns", "rootfs", "host_cwd", "cwd", "handover", "opts_complete")]
            + [("fallback", "record too large"), ("end",)])
    tmp = _write_temporary(dir_fd, name, data)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    from uctr_batch.launch import nodelock, sharedns

    nodelock.touch(dir_fd, SEEN)
    if nodelock.due(dir_fd, COLLECTED, sharedns.GC_EVERY):
        _collect_garbage(dir_fd, name)


def write_outcome(dir_fd: int, name: str, lines) -> bool:
    """Publish an outcome record as NAME unless a record is there already: a container
    record, or another rank's outcome, is never replaced (link() fails). Readers see whole
    records: the temporary file is complete before it is linked."""
    data = dumps([(HEADER, str(VERSION))] + list(lines) + [("end",)])
    if len(data) > MAX_BYTES:
        return False
    tmp = _write_temporary(dir_fd, name, data)
    try:
        os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp, dir_fd=dir_fd)
    return True


def _write_temporary(dir_fd: int, name: str, data: bytes) -> str:
    """DATA in a new private file NAME.PID.tmp; returns its name."""
    tmp = "%s.%d.tmp" % (name, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    return tmp


def _collect_garbage(dir_fd: int, keep: str) -> None:
    """Remove the records (and temporary files left by a killed writer) of steps untouched
    for sharedns.GC_AGE (finished steps). Only fast-step-* names: the directory is also the
    rendezvous directory, whose step-* files sharedns collects under their locks."""
    import time

    from uctr_batch.launch.sharedns import GC_AGE

    now = time.time()
    try:
        names = os.listdir(dir_fd)
    except OSError:
        return
    for other in names:
        if other == keep or not other.startswith((RECORD_PREFIX + "step-",
                                                  RECORD_PREFIX + "replay-")):
            continue
        try:
            if now - os.stat(other, dir_fd=dir_fd, follow_symlinks=False).st_mtime > GC_AGE:
                os.unlink(other, dir_fd=dir_fd)
        except OSError:
            pass
