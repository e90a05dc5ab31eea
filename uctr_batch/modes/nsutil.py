"""Linux namespace and mount system calls for the namespace modes (N1, and R1's crun wrapper).

os.unshare/os.setns are used where Python has them (3.12+); everything else goes through
ctypes on the C library. Every failure raises ModeError naming the step that failed, so a
user sees "cannot bind-mount /proc onto ...: Permission denied" instead of an errno.

Only stdlib modules that are already loaded at interpreter start are imported at module
level; ctypes is loaded on the first call (it is on the per-rank hot path).
"""

import os

from uctr_batch.errors import ModeError

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MNT_DETACH = 0x2

# statvfs f_flag bits (ST_*) that a bind remount must repeat: in a user namespace the kernel
# locks them on mounts inherited from the host and refuses a remount that would clear them.
_ST_TO_MS = ((0x2, MS_NOSUID), (0x4, MS_NODEV), (0x8, MS_NOEXEC), (0x400, MS_NOATIME),
             (0x800, MS_NODIRATIME), (0x1000, MS_RELATIME))

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "ppc64": 203, "s390x": 217,
                   "riscv64": 41, "loongarch64": 41}
_SYS_SETNS = {"x86_64": 308, "aarch64": 268, "ppc64le": 350, "ppc64": 350, "s390x": 339,
              "riscv64": 268, "loongarch64": 268}

_libc = []  # the loaded C library, once per process


def libc():
    if not _libc:
        import ctypes

        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        _libc.append(lib)
    return _libc[0]


def _fail(step: str, err: int, hint=None):
    raise ModeError("%s: %s" % (step, os.strerror(err)), hint)


def _check(ret: int, step: str, hint=None) -> None:
    if ret != 0:
        import ctypes

        _fail(step, ctypes.get_errno(), hint)


def _b(path):
    return None if path is None else os.fsencode(path)


class UnshareRefused(ModeError):
    """unshare() failed: this process is unchanged (a mode may fall back to another)."""


def unshare(flags: int, step: str = "unshare") -> None:
    if hasattr(os, "unshare"):
        try:
            os.unshare(flags)
        except OSError as e:
            raise UnshareRefused("%s: %s" % (step, os.strerror(e.errno)), USERNS_HINT) from e
        return
    if libc().unshare(flags) != 0:
        import ctypes

        raise UnshareRefused("%s: %s" % (step, os.strerror(ctypes.get_errno())), USERNS_HINT)


def setns(fd: int, nstype: int, step: str) -> None:
    if hasattr(os, "setns"):
        try:
            os.setns(fd, nstype)
        except OSError as e:
            _fail(step, e.errno)
        return
    lib = libc()
    if hasattr(lib, "setns"):
        _check(lib.setns(fd, nstype), step)
    else:  # very old C library without the wrapper
        _check(lib.syscall(_syscall_number(_SYS_SETNS), fd, nstype), step)


def mount(src, dst, fstype=None, flags: int = 0, data=None, step=None) -> None:
    ret = libc().mount(_b(src), _b(dst), _b(fstype), flags, _b(data))
    _check(ret, step or "cannot mount %s on %s" % (src or fstype, dst))


def bind(src: str, dst: str, step=None) -> None:
    mount(src, dst, None, MS_BIND | MS_REC, step=step or "cannot bind-mount %s onto %s" % (src, dst))


def remount_readonly(path: str, step=None) -> None:
    """Make the bind mount at path read-only, keeping the flags the kernel has locked."""
    st_flags = os.statvfs(path).f_flag
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY
    for st, ms in _ST_TO_MS:
        if st_flags & st:
            flags |= ms
    mount(None, path, None, flags, step=step or "cannot make %s read-only" % path)


def make_rprivate(path: str = "/") -> None:
    mount(None, path, None, MS_REC | MS_PRIVATE, step="cannot make mounts private (mount --make-rprivate %s)" % path)


def umount_detach(path: str, step=None) -> None:
    _check(libc().umount2(_b(path), MNT_DETACH), step or "cannot unmount %s" % path)


def pivot_root(new_root: str, put_old: str, step: str = "pivot_root") -> None:
    _check(libc().syscall(_syscall_number(_SYS_PIVOT_ROOT), _b(new_root), _b(put_old)), step)


def _syscall_number(table) -> int:
    machine = os.uname().machine
    if machine not in table:
        raise ModeError("no system call table for this machine: %s" % machine,
                        "use another mode, e.g. --mode P1")
    return table[machine]


USERNS_HINT = ("unprivileged user namespaces are disabled or blocked on this node "
               "(see `uctr doctor`); use another mode, e.g. --mode P1")


def write_id_maps(inside_uid: int, inside_gid: int, host_uid: int, host_gid: int) -> None:
    """Map one uid and one gid into the new user namespace (setgroups must be denied first)."""
    for name, text in (("setgroups", "deny"),
                       ("uid_map", "%d %d 1\n" % (inside_uid, host_uid)),
                       ("gid_map", "%d %d 1\n" % (inside_gid, host_gid))):
        try:
            fd = os.open("/proc/self/" + name, os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as e:
            _fail("cannot write /proc/self/%s" % name, e.errno)


def enter_user_mount_ns(inside_uid: int, inside_gid: int) -> None:
    """unshare(CLONE_NEWUSER|CLONE_NEWNS), map the caller, make every mount private."""
    host_uid, host_gid = os.getuid(), os.getgid()
    unshare(CLONE_NEWUSER | CLONE_NEWNS, "cannot create a user+mount namespace")
    write_id_maps(inside_uid, inside_gid, host_uid, host_gid)
    make_rprivate("/")


def userns_sysctl_problem():
    """Why the sysctls forbid unprivileged user namespaces here, or None (cheap: no fork)."""
    checks = (
        ("/proc/sys/user/max_user_namespaces", lambda v: v == "0",
         "user.max_user_namespaces is 0"),
        ("/proc/sys/kernel/unprivileged_userns_clone", lambda v: v == "0",
         "kernel.unprivileged_userns_clone is 0"),
        ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", lambda v: v == "1",
         "AppArmor restricts unprivileged user namespaces "
         "(kernel.apparmor_restrict_unprivileged_userns=1)"),
    )
    for path, bad, reason in checks:
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if bad(value):
            return reason
    return None


def userns_trial_problem():
    """Try unshare(CLONE_NEWUSER|CLONE_NEWNS) in a forked child: None if it works, else why.

    This catches what the sysctls cannot show (seccomp filters of an outer container, LSMs).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report errno through the pipe, never return into the caller
        code = 0
        try:
            os.close(r)
            try:
                enter_user_mount_ns(os.getuid(), os.getgid())
            except ModeError as e:
                os.write(w, e.message.encode(errors="replace"))
                code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return None
    return message or "the trial child failed (status %d)" % status
