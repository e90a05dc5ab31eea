"""The Mode interface, the registry of modes, and what every mode shares.

A mode is one mechanism that starts a container from a RunSpec (spec.py):

    @register_mode("N1")
    class Native(Mode):
        def probe(self, spec=None) -> ProbeResult: ...   # works here? why not?
        def exec(self, spec) -> NoReturn: ...            # replaces this process

Modes are imported only when asked for (get_mode), so the per-rank path loads one module.
A mode whose binary is missing still registers; its probe() says what is missing.

Shared semantics (docs/modes.md): exec() never returns; no helper process of ours stays
behind; stdin/stdout/stderr and every inheritable fd (PMI_FD) reach the payload untouched;
the exit status is the payload's, because the payload (or the mode's runtime, which reports
it) replaces this process.
"""

import os

from uctr_batch.errors import ModeError, UctrError
from uctr_batch.modes import sigstate

# Canonical order; also the built-in ladder.
MODE_NAMES = ("N1", "R1", "P1", "P2", "F1", "S1")

_MODULES = {
    "N1": "uctr_batch.modes.n1",
    "R1": "uctr_batch.modes.r1",
    "P1": "uctr_batch.modes.proot",
    "P2": "uctr_batch.modes.proot",
    "F1": "uctr_batch.modes.f1",
    "S1": "uctr_batch.modes.s1",
}

_REGISTRY = {}  # name -> Mode subclass, filled by @register_mode when a module is imported

# Device nodes every container gets under /dev, besides policy-selected ones.
STANDARD_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
                    "/dev/tty", "/dev/ptmx")
# Host directories shared under /dev: ptys and POSIX shared memory (intra-node MPI uses it).
STANDARD_DEV_DIRS = ("/dev/pts", "/dev/shm", "/dev/mqueue")
# Links created in a private /dev.
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"))


class ProbeResult:
    """Whether a mode works on this node (for this spec), why not, and its version."""

    __slots__ = ("ok", "reason", "version")

    def __init__(self, ok: bool, reason: str = "", version=None):
        self.ok = bool(ok)
        self.reason = reason
        self.version = version

    def __bool__(self):
        return self.ok

    def __repr__(self):
        return "ProbeResult(ok=%r, reason=%r, version=%r)" % (self.ok, self.reason, self.version)

    def to_dict(self):
        return {"ok": self.ok, "reason": self.reason, "version": self.version}


class ModeUnavailable(ModeError):
    """Raised by exec() before it changed anything in this process, so the fallback ladder
    may still try the next mode (e.g. N1 when unshare() is refused by a seccomp filter)."""


class PayloadNotFound(UctrError):
    """The command does not exist in the container (exit 127, like a shell or docker)."""

    exit_code = 127


class PayloadNotExecutable(UctrError):
    exit_code = 126


class Mode:
    """Base class. Subclasses set `summary` and implement probe() and exec()."""

    name = "?"
    summary = ""

    def probe(self, spec=None) -> ProbeResult:
        """Does this mode work here (and for this spec)? Cheap: no state kept across processes.

        Called with spec=None by `uctr doctor` and `policy explain` (may ask binaries for
        their version); the fallback ladder passes the spec and gets the cheap checks plus
        the spec-specific ones (e.g. F1 refuses static images).
        """
        raise NotImplementedError

    def exec(self, spec):
        """Start the container; never returns (raises ModeError/UctrError before exec)."""
        raise NotImplementedError

    def require(self, spec) -> None:
        """probe(spec) or raise ModeError with its reason."""
        result = self.probe(spec)
        if not result.ok:
            raise ModeError("mode %s is not usable here: %s" % (self.name, result.reason),
                            self.unusable_hint())

    def unusable_hint(self) -> str:
        return "run `uctr doctor` to see which modes work on this node"


def register_mode(name: str):
    """Class decorator: make a Mode subclass available as `name`."""
    def decorate(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return decorate


def get_mode(name: str) -> Mode:
    """An instance of mode `name`, importing only its module."""
    if name not in _MODULES:
        raise ModeError("unknown mode: %s" % name, "modes are " + ", ".join(MODE_NAMES))
    if name not in _REGISTRY:
        __import__(_MODULES[name])  # registers the class; importlib itself costs 0.4 ms
    return _REGISTRY[name]()


def available_modes():
    """Every registered mode name, in canonical order (imports every mode module)."""
    for name in MODE_NAMES:
        get_mode(name)
    return tuple(n for n in MODE_NAMES if n in _REGISTRY)


# --- helpers shared by the modes --------------------------------------------------------

def find_program(name: str, path=None):
    """Absolute path of an executable on PATH (host side), or None. shutil.which, lighter."""
    if "/" in name:
        return name if os.access(name, os.X_OK) else None
    for d in (path if path is not None else os.environ.get("PATH", os.defpath)).split(":"):
        candidate = os.path.join(d or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def program_version(argv, first_line_only: bool = True):
    """`tool --version` output's first line, or None; only for doctor/explain (spawns)."""
    import subprocess

    try:
        cp = subprocess.run(list(argv), capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (cp.stdout or cp.stderr).decode(errors="replace").strip()
    if not text:
        return None
    return text.splitlines()[0].strip() if first_line_only else text


def execve(path: str, argv, env) -> None:
    """os.execve with errors a user can act on (exit 127/126 for the payload's own command).

    Every mode execs through here: the launcher's signal dispositions and mask are put back
    first (sigstate), and this process's own are put back if the exec fails."""
    env = dict(env)
    saved = sigstate.snapshot()
    sigstate.restore(env)
    try:
        os.execve(path, list(argv), env)
    except OSError as e:
        sigstate.undo(saved)
        if isinstance(e, FileNotFoundError):
            raise PayloadNotFound("command not found: %s" % path,
                                  "check the command exists in the image and is on its PATH")
        if isinstance(e, PermissionError):
            raise PayloadNotExecutable("cannot execute %s: permission denied" % path,
                                       "make it executable in the image (chmod +x), or run it "
                                       "through its interpreter, e.g. sh FILE")
        raise PayloadNotExecutable("cannot execute %s: %s" % (path, e.strerror),
                                   "check that it is a program for this architecture, or run "
                                   "it through its interpreter")


def exec_in_path(argv, env, root: str = "/") -> None:
    """execvpe() that reads PATH from the container env and needs no module import.

    os.execvpe imports `warnings` lazily, which fails once the host's Python library has
    been pivoted away (N1). `root` prefixes each candidate (F1 looks up inside a rootfs).
    """
    path = resolve_command(argv[0], env, root)
    execve(path, argv, env)


def resolve_command(command: str, env, root: str = "/") -> str:
    """Where `command` is, in the container's PATH (host path when root != '/')."""
    prefix = "" if root == "/" else root.rstrip("/")
    if "/" in command:
        if prefix and command.startswith("/"):  # the image's links resolved inside root
            from uctr_batch.modes import inroot

            return inroot.resolve(root, command)
        return prefix + command if command.startswith("/") else command
    denied = None
    for d in env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":"):
        if not d.startswith("/"):
            continue
        if prefix:
            from uctr_batch.modes import inroot

            candidate = inroot.resolve(root, d + "/" + command)
        else:
            candidate = d + "/" + command
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = denied or candidate
    if denied:
        raise PayloadNotExecutable("cannot execute %s: permission denied" % command,
                                   "make it executable in the image (chmod +x), or run it "
                                   "through its interpreter, e.g. sh FILE")
    raise PayloadNotFound("command not found in the container: %s" % command,
                          "check the image has it on its PATH (PATH=%s)" % env.get("PATH", ""))


def container_to_host(spec, path: str) -> str:
    """Host path of container path `path`: through the bind that covers it, else the rootfs."""
    best = None
    for src, dst, _ro in spec.binds:
        if path == dst or path.startswith(dst.rstrip("/") + "/"):
            if best is None or len(dst) > len(best[1]):
                best = (src, dst)
    if best:
        return best[0] + path[len(best[1]):]
    from uctr_batch.modes import inroot

    return inroot.resolve(spec.rootfs, path)


def check_command(spec) -> None:
    """Raise PayloadNotFound (exit 127) unless argv[0] exists in the container, before any
    mode runs: otherwise each runtime reports a missing command in its own way and with its
    own exit status (crun and proot exit 1)."""
    check_exec_size(spec)
    if os.path.isfile(spec.rootfs):
        return  # an image file (SIF, mode S1): only apptainer can look inside
    command = spec.argv[0]
    if "/" in command and not command.startswith("/"):
        return  # relative to the working directory: left to the mode
    dirs = [""] if "/" in command else [d for d in spec.env.get("PATH", "").split(":") if d.startswith("/")]
    for d in dirs:
        host = container_to_host(spec, (d.rstrip("/") + "/" + command) if d else command)
        if os.path.isfile(host):
            return
    raise PayloadNotFound("command not found in the container: %s" % command,
                          "check the image has it on its PATH (PATH=%s)" % spec.env.get("PATH", ""))


MAX_ARG_STRLEN = 32 * 4096  # the kernel's limit on one argument or environment string


def check_exec_size(spec) -> None:
    """Raise PayloadNotExecutable (exit 126, as execve's E2BIG would in N1 or P1) when the
    payload's argv and environment cannot pass execve: one string over MAX_ARG_STRLEN or all
    of them over ARG_MAX. Checked before any mode starts, because a runtime reports it in its
    own way (crun: exit 1 and no hint, after minutes of parsing a 100k-entry Env)."""
    try:
        limit = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        limit = 2 << 20
    total, longest = 0, 0
    for text in list(spec.argv) + ["%s=%s" % kv for kv in spec.env.items()]:
        size = len(text.encode("utf-8", "surrogateescape")) + 1
        total += size + 8  # the string and its pointer
        longest = max(longest, size)
    if longest > MAX_ARG_STRLEN or total > limit:
        why = ("one string is %d bytes, over the kernel's %d" % (longest, MAX_ARG_STRLEN)
               if longest > MAX_ARG_STRLEN else
               "they are %d bytes, over the kernel's %d (ARG_MAX)" % (total, limit))
        raise PayloadNotExecutable(
            "cannot execute %s: its arguments and environment are too large (%s)"
            % (spec.argv[0], why),
            "shorten the command line, or the environment (the image's Env, -e, the policy)")


def inherited_fds():
    """Open file descriptors above 2 that survive exec (no FD_CLOEXEC): PMI_FD and friends."""
    import fcntl

    fds = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return fds
    for name in names:
        fd = int(name)
        if fd <= 2:
            continue
        try:
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                fds.append(fd)
        except OSError:  # the fd listdir itself used, now closed
            continue
    return sorted(fds)


def dev_entries(spec):
    """(host_path, is_dir) for what a private /dev shows: the standard nodes, the shared
    pts/shm/mqueue directories and the spec's devices; missing host paths are skipped
    (device lists are per node class, not every node has every device)."""
    seen = set()
    entries = []
    for path in STANDARD_DEVICES + STANDARD_DEV_DIRS + tuple(spec.devices):
        if path in seen or not path.startswith("/dev/"):
            continue
        seen.add(path)
        try:
            is_dir = os.path.isdir(path)
            os.stat(path)
        except OSError:
            continue
        entries.append((path, is_dir))
    return entries


def writable_ro_sources(spec):
    """Read-only requests in spec that only a mount namespace can enforce: ro binds whose
    host source the caller could write, and a read-only rootfs the caller owns."""
    found = [src for src, _dst, ro in spec.binds if ro and os.access(src, os.W_OK)]
    if spec.readonly and os.access(spec.rootfs, os.W_OK):
        found.append(spec.rootfs + " (--read-only rootfs)")
    return found


def state_subdir(spec, name: str) -> str:
    """A private (0700) directory under spec.state_dir for a mode's own files."""
    base = spec.state_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "uctr-%d" % os.getuid())
    path = os.path.join(base, name)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise UctrError("cannot create state directory %s: %s" % (path, e.strerror),
                        "set UCTR_LOCAL_DIR to a writable node-local directory") from e
    return path
