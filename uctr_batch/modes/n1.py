"""N1: the native mode. An unprivileged user + mount namespace set up by this process, then
pivot_root and exec: no external binary, no helper process.

Steps (each failure names itself):
  1. unshare(CLONE_NEWUSER|CLONE_NEWNS); setgroups "deny"; map the caller's uid/gid to
     themselves (or to 0 with --root); make every mount private.
  2. bind the rootfs onto itself (pivot_root needs a mount point); rbind the host's /proc
     and /sys (a new procfs/sysfs needs PID/net namespaces we do not create).
  3. /dev: a small tmpfs with the standard nodes, the host's pts/shm/mqueue and the
     policy-selected devices, each bind-mounted from the host (a user namespace cannot mknod).
  4. the synthetic /etc/passwd and /etc/group, then the user and policy binds in order;
     missing mount points are created in the rootfs (it belongs to the caller).
  5. read-only: the rootfs (--read-only / policy) and each ro bind, by bind remount.
  6. pivot_root(".", ".") and detach the old root; chdir; execve.

Joining (for the per-node launcher, issue 4): one process creates the namespaces and stays
alive (spawn_holder), and every rank join()s them with setns() before exec, so all ranks on
a node share one user namespace (CMA / process_vm_readv works between them) and nobody
sets up mounts twice. See docs/modes.md "Sharing one N1 namespace".
"""

import os

from uctr_batch.errors import ModeError, UctrError
from uctr_batch.modes import inroot, nsutil
from uctr_batch.modes.base import (
    DEV_LINKS, Mode, ModeUnavailable, ProbeResult, dev_entries, exec_in_path, register_mode,
)

PR_SET_PDEATHSIG = 1


@register_mode("N1")
class Native(Mode):
    summary = "native user+mount namespace, built in (no external binary)"

    def probe(self, spec=None) -> ProbeResult:
        problem = nsutil.userns_sysctl_problem()
        if problem:
            return ProbeResult(False, problem)
        if spec is None:  # doctor / explain: really try (a seccomp filter hides from sysctls)
            problem = nsutil.userns_trial_problem()
            if problem:
                return ProbeResult(False, problem)
        elif not os.path.isdir(spec.rootfs):
            return ProbeResult(False, "rootfs is not a directory: %s" % spec.rootfs)
        return ProbeResult(True, "unprivileged user namespaces work",
                           "built in (kernel %s)" % os.uname().release)

    def exec(self, spec):
        setup_namespace(spec)
        exec_payload(spec)


def setup_namespace(spec, ops=None) -> None:
    """Make this process live in the container described by spec (everything but exec).

    OPS, a list: every step done is appended to it, as ("op", args...) with host paths (the
    mount points resolved inside the rootfs), in order. The C creator replays such a list
    for the next steps of the same request (launchers/c/replay.c, launch/replay.py); the
    vocabulary is REPLAY_OPS."""
    note = ops.append if ops is not None else (lambda op: None)
    root = os.path.realpath(spec.rootfs)
    if not os.path.isdir(root):
        raise UctrError("rootfs is not a directory: %s" % spec.rootfs,
                        "give the rootfs directory that `uctr create` prints")
    try:
        nsutil.enter_user_mount_ns(spec.uid, spec.gid)
    except nsutil.UnshareRefused as e:
        # unshare() itself failed, nothing has changed yet: the ladder may try the next mode.
        raise ModeUnavailable(e.message, e.hint) from e
    note(("userns", str(spec.uid), str(spec.gid)))
    inroot.system_dirs(root)  # before anything is mounted: /dev, /proc, /sys are real dirs
    _bind(note, root, root, "cannot bind-mount the rootfs %s onto itself" % root)
    for path in ("/proc", "/sys"):
        _bind(note, path, _mountpoint(note, root, path, True))
    _mount_dev(note, root, spec)
    _mount_identity(note, root, spec)
    for src, dst, ro in spec.binds:
        target = _mountpoint(note, root, dst, os.path.isdir(src))
        _bind(note, src, target, "cannot bind-mount %s onto %s" % (src, dst))
        if ro:
            _readonly(note, target, "cannot make the bind of %s read-only" % dst)
    if spec.readonly:
        _readonly(note, root, "cannot make the rootfs read-only")
    _pivot(note, root)


# What setup_namespace records (and launchers/c/replay.c replays), with its arguments:
REPLAY_OPS = {
    "userns": 2,    # INSIDE-UID INSIDE-GID: unshare user+mount, setgroups deny, map us, rprivate /
    "exists": 2,    # PATH dir|file: a mount point in the rootfs (created by the first run)
    "bind": 2,      # SRC DST: MS_BIND|MS_REC
    "ro": 1,        # DST: remount read-only, keeping the flags the kernel locked
    "tmpfs": 3,     # DST FLAGS DATA
    "mkdir": 1,     # PATH on that tmpfs (with parents)
    "touch": 1,     # PATH on that tmpfs (0644)
    "symlink": 2,   # TARGET PATH on that tmpfs
    "pivot": 1,     # ROOT: pivot_root there, detach the old root, chdir /
}


def _bind(note, src: str, dst: str, step=None) -> None:
    nsutil.bind(src, dst, step)
    note(("bind", src, dst))


def _readonly(note, path: str, step=None) -> None:
    nsutil.remount_readonly(path, step)
    note(("ro", path))


def _mountpoint(note, root: str, path: str, is_dir: bool) -> str:
    target = inroot.ensure_mountpoint(root, path, is_dir)
    note(("exists", target, "dir" if is_dir else "file"))
    return target


def _mount_dev(note, root: str, spec) -> None:
    dev = _mountpoint(note, root, "/dev", True)
    flags = nsutil.MS_NOSUID | nsutil.MS_NOEXEC
    nsutil.mount("tmpfs", dev, "tmpfs", flags, "mode=0755,size=256k",
                 step="cannot mount a tmpfs on /dev")
    note(("tmpfs", dev, str(flags), "mode=0755,size=256k"))
    for host, is_dir in dev_entries(spec):
        rel = host[len("/dev/"):]
        target = os.path.join(dev, rel)
        os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
        note(("mkdir", target if is_dir else os.path.dirname(target)))
        if not is_dir:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
            note(("touch", target))
        _bind(note, host, target, "cannot bind-mount device %s" % host)
    for name, target in DEV_LINKS:
        os.symlink(target, os.path.join(dev, name))
        note(("symlink", target, os.path.join(dev, name)))


def _mount_identity(note, root: str, spec) -> None:
    for host, path in ((spec.passwd, "/etc/passwd"), (spec.group, "/etc/group")):
        if host:
            target = _mountpoint(note, root, path, False)
            _bind(note, host, target, "cannot bind-mount %s onto %s" % (host, path))
            _readonly(note, target)


def _pivot(note, root: str) -> None:
    # pivot_root(".", "."): the old root ends up stacked on "/", and is detached at once.
    os.chdir(root)
    nsutil.pivot_root(".", ".", "pivot_root into %s" % root)
    nsutil.umount_detach(".", "cannot detach the host's root filesystem")
    os.chdir("/")
    note(("pivot", root))


def exec_payload(spec) -> None:
    """chdir to the spec's cwd and exec the command, inside an already set up namespace."""
    try:
        os.chdir(spec.cwd)
    except OSError as e:
        raise UctrError("cannot change to working directory %s in the container: %s"
                        % (spec.cwd, e.strerror), "check -w / the image's WorkingDir") from e
    exec_in_path(spec.argv, spec.env)


# --- sharing one namespace between processes (the per-node launcher) ---------------------

def join_namespace(pid: int) -> None:
    """setns() into the user and mount namespaces of container process `pid` (same user).

    Afterwards this process sees the container's root, as `pid` does. Must be called while
    single-threaded (a kernel rule for joining a user namespace).
    """
    fds = []
    try:
        for ns in ("user", "mnt"):
            try:
                fds.append(os.open("/proc/%d/ns/%s" % (pid, ns), os.O_RDONLY))
            except OSError as e:
                raise ModeError("cannot open the %s namespace of process %d: %s"
                                % (ns, pid, e.strerror),
                                "the namespace holder has exited; start a new one") from e
        if os.stat("/proc/self/ns/user").st_ino != os.fstat(fds[0]).st_ino:
            nsutil.setns(fds[0], nsutil.CLONE_NEWUSER, "cannot join the user namespace of %d" % pid)
        nsutil.setns(fds[1], nsutil.CLONE_NEWNS, "cannot join the mount namespace of %d" % pid)
    finally:
        for fd in fds:
            os.close(fd)
    os.chdir("/")


def join(pid: int, spec) -> None:
    """Join the namespaces held by `pid` and exec spec's command there; never returns.

    spec.rootfs, binds, devices and ids are not applied again: they are the holder's.
    """
    join_namespace(pid)
    exec_payload(spec)


def spawn_holder(spec, die_with_parent: bool = False) -> int:
    """Fork a process that sets up spec's namespaces and then only waits; return its pid.

    Returns once the namespace is ready (raises ModeError with the holder's error otherwise).
    The holder keeps no inherited file open (stdio goes to /dev/null, other fds are closed),
    so it never holds a job's output pipe or PMI_FD. It exits on SIGTERM/SIGKILL, and with
    die_with_parent when the calling process exits (PR_SET_PDEATHSIG).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _holder_main(spec, r, w, die_with_parent)  # never returns
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode(errors="replace")
    if message != "ok":
        os.waitpid(pid, 0)
        raise ModeError("cannot create the shared N1 namespace: %s" % (message or "holder died"),
                        "run `uctr doctor` to check user namespaces on this node")
    return pid


def _holder_main(spec, r: int, w: int, die_with_parent: bool) -> None:
    code = 0
    try:
        os.close(r)
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(3, w)
        os.closerange(w + 1, 65536)
        if die_with_parent:
            import signal

            nsutil.libc().prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        try:
            setup_namespace(spec)
        except UctrError as e:
            os.write(w, e.message.encode(errors="replace"))
            code = 1
            return
        os.write(w, b"ok")
        os.close(w)
        import signal

        while True:
            signal.pause()
    except BaseException:  # noqa: BLE001 - a forked child must never return into the caller
        code = 1
    finally:
        os._exit(code)
