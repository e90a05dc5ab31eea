"""Directories in shared places: private per-user directories that nobody else can plant or
control, and removal of trees whose modes lock their owner out (a rootfs has 0500 dirs)."""

import errno
import os
import pwd
import shutil
import stat
from pathlib import Path
from typing import Optional

from uctr_batch.errors import NoSpace, StorageError

_O_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def ensure_private_dir(path: Path, what: str, hint: Optional[str] = None) -> None:
    """Create PATH with mode 0700 unless it exists, then insist that it is a real directory
    (not a symlink), owned by the caller and not writable by group or others.

    In a shared /tmp another user can create our directory name first, as a symlink to a
    place they read or as a directory they control; both are refused, never reused.
    The parents of PATH are created if missing (a site or user chose the path)."""
    path = Path(path)
    hint = hint or f"remove {path} if it is yours, or choose another location"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise StorageError(f"cannot create {what}: {path}: {e.strerror}", hint) from e
    try:
        fd = os.open(path, _O_DIR_NOFOLLOW)
    except OSError as e:
        why = e.strerror
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # O_NOFOLLOW|O_DIRECTORY gives either
            why = "it is a symbolic link" if path.is_symlink() else "it is not a directory"
        raise StorageError(f"refusing to use {what}: {path}: {why}", hint) from e
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_uid != os.geteuid():
        raise StorageError(
            f"refusing to use {what}: {path}: it belongs to {_owner_name(st.st_uid)}, not to you",
            hint)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StorageError(
            f"refusing to use {what}: {path}: it is writable by others "
            f"(mode {stat.S_IMODE(st.st_mode):04o})",
            f"chmod go-w {path} if it is yours, or choose another location")


def make_private_subdir(path: Path) -> None:
    """mkdir PATH 0700 inside a directory ensure_private_dir() accepted (only we can write
    there, so a plain check suffices)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise StorageError(f"not a directory: {path}", f"remove {path}")
    except OSError as e:  # e.g. a read-only or pseudo file system (UCTR_LOCAL_DIR=/proc/1)
        raise no_space(e, os.path.dirname(path), None, f"creating {path}") or StorageError(
            f"cannot create {path}: {e.strerror}",
            "set UCTR_LOCAL_DIR (or UCTR_CACHE) to a directory of yours on a writable file system"
        ) from e


def remove_tree(path: Path) -> None:
    """rm -rf PATH, also when directories inside lack u+w or u+x. PATH itself must not be a
    symlink (shutil.rmtree refuses it)."""
    _make_owner_writable(Path(path))
    shutil.rmtree(path)


def _make_owner_writable(top: Path) -> None:
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        if st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
            os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
        with os.scandir(directory) as entries:
            stack.extend(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))


def write_atomic(path, data: bytes, mode: int = 0o600, *, fsync: bool = False,
                 owner: Optional[int] = None) -> None:
    """Replace PATH with DATA so readers see the old file or the new one, never a part.

    The temporary sibling is created with O_EXCL|O_NOFOLLOW (a planted link cannot redirect
    the write) and removed on failure. fsync for data that must survive a crash (cache
    index); OWNER chowns the file when root writes it for a user."""
    path = os.fspath(path)
    tmp = "%s/.%s.%d.%d.tmp" % (os.path.dirname(path) or ".", os.path.basename(path),
                               os.getpid(), id(data))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            _write_all(fd, data)
            os.fchmod(fd, mode)  # the umask must not narrow (or widen) what the caller asked
            if owner is not None:
                os.fchown(fd, owner, -1)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- running out of space -------------------------------------------------------------------
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def no_space(exc: OSError, directory, needed: Optional[int] = None, what: str = "") -> Optional[NoSpace]:
    """The NoSpace error for EXC when it is ENOSPC/EDQUOT, else None.

    Every writer (pull into the shared cache, unpack into the node-local dir, records in the
    run dir) reports a full disk, quota or inode table in this one shape:
        error: no space left on /dev/sda2 (/tmp/uctr-1000): needed ~120.0 MiB, free 3.1 MiB
    NEEDED is the writer's estimate in bytes (None when unknown); WHAT names the operation."""
    if not isinstance(exc, OSError) or exc.errno not in NO_SPACE_ERRNOS:
        return None
    directory = os.fspath(directory)
    free, inodes = _free_space(directory)
    quota = exc.errno == errno.EDQUOT
    parts = []
    if needed is not None:
        parts.append(f"needed ~{human_size(needed)}")
    if free is not None:
        parts.append(f"free {human_size(free)}")
    if inodes == 0:
        parts.append("no free inodes")
    device = _device_of(directory)
    where = f"{device} ({directory})" if device else directory
    detail = f": {', '.join(parts)}" if parts else ""
    prefix = f"cannot {what}: " if what else ""
    kind = "disk quota exceeded on" if quota else "no space left on"
    return NoSpace(f"{prefix}{kind} {where}{detail}",
                   f"free space{' or inodes' if inodes == 0 else ''} in {directory} "
                   "(e.g. 'uctr rm', 'uctr gc', remove old files), or point uctr elsewhere "
                   "(UCTR_LOCAL_DIR / UCTR_CACHE), then run the same command again")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # not reached


def _free_space(directory: str):
    """(bytes available to us, inodes available) of the file system holding DIRECTORY, or
    (None, None) when it cannot be asked (it may itself be gone)."""
    path = directory
    while True:
        try:
            st = os.statvfs(path)
            return st.f_bavail * st.f_frsize, (st.f_favail if st.f_files else None)
        except OSError:
            parent = os.path.dirname(path)
            if not parent or parent == path:
                return None, None
            path = parent


def _device_of(directory: str) -> Optional[str]:
    """The mount source of the longest mount point containing DIRECTORY (e.g. /dev/sda2,
    tmpfs), from /proc/self/mountinfo; None when that cannot be read."""
    real = os.path.realpath(directory)
    best, source = "", None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for raw in f:
                fields = raw.decode("utf-8", "replace").split()
                if len(fields) < 10 or "-" not in fields:
                    continue
                point = fields[4].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, source = point, fields[fields.index("-") + 2]
    except OSError:
        return None
    if source is None:
        return None
    return source if source not in ("none", "") else best or "/"


def read_regular_file(path, limit: int, what: str, hint: str) -> bytes:
    """The bytes of PATH, which must be a regular file of at most LIMIT bytes: opened with
    O_NONBLOCK (a FIFO cannot hang the open), checked with fstat, read at most LIMIT + 1
    bytes (/dev/zero, a growing file). Anything else is a ConfigError naming WHAT."""
    from uctr_batch.errors import ConfigError

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}", hint) from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{what} {path} is not a regular file", hint)
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}", hint) from e
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes", hint)
    return data
