"""Directories in shared places: private per-user directories that nobody else can plant or
control, and removal of trees whose modes lock their owner out (a rootfs has 0500 dirs)."""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import errno
import os
import pwd
import stat

from uctr_batch.errors import NoSpace, StorageError

_O_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def ensure_private_dir(path: str | os.PathLike, what: str, hint: str | None = None) -> None:
    """Create PATH with mode 0700 unless it exists, then insist that it is a real directory
    (not a symlink), owned by the caller and not writable by group or others.

    In a shared /tmp another user can create our directory name first, as a symlink to a
    place they read or as a directory they control; both are refused, never reused.
    The parents of PATH are created if missing (a site or user chose the path)."""
    from pathlib import Path  # here: write_atomic is on every step's creator path, pathlib is not

    path = Path(path)
    hint = hint or f"remove {path} if it is yours, or choose another location"
    if not os.path.lexists(path):
        _check_location(path, what)  # before creating anything in a planted parent
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
    _check_location(path, what)  # a parent another user controls could swap PATH later


def _check_location(path: str | os.PathLike, what: str) -> None:
    """Refuse PATH when a directory or symlink on its way belongs to another user or others
    may write there (batch.location.check, the rule the batch hooks use)."""
    from uctr_batch.batch import location

    problem = location.check(path)
    if problem is not None:
        raise StorageError(f"refusing to use {what}: {path}: {problem[1]}",
                           "choose a location whose parents only root and you can change")


def make_private_subdir(path: str | os.PathLike) -> None:
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


def remove_tree(path) -> None:
    """rm -rf PATH, also when directories inside lack u+w or u+x, at any depth, with a
    bounded number of open files and without ever following a symlink (PATH itself must
    not be one). FileNotFoundError when PATH is missing."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if not name:
        raise OSError(errno.EBUSY, "refusing to remove /", path)
    parent_fd = os.open(parent, _O_DIR_NOFOLLOW if parent != "/" else os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.lstat(name, dir_fd=parent_fd)
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "refusing to remove a symbolic link as a tree", path)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent_fd)
            return
        remove_tree_at(parent_fd, name)
    finally:
        os.close(parent_fd)


def remove_tree_at(parent_fd: int, name: str) -> None:
    """rm -rf NAME in the directory PARENT_FD: no recursion, no symlink followed, and at most
    three open files whatever the depth (see walk_at). Directories without u+rwx are
    chmodded first (through an O_PATH fd)."""
    def empty_files(fd):
        subdirs = []
        with os.scandir(fd) as listing:
            for child in listing:
                if child.is_dir(follow_symlinks=False):
                    subdirs.append(child.name)
                else:
                    _unlink_at(fd, child.name)
        return subdirs

    def open_child(fd, child):
        try:
            return _open_dir_for_removal(fd, child)
        except FileNotFoundError:
            return None
        except NotADirectoryError:  # replaced by a file meanwhile
            _unlink_at(fd, child)
            return None

    walk_at(parent_fd, name, empty_files, open_child,
            leave=lambda up_fd, entry: os.rmdir(entry, dir_fd=up_fd),
            top_fd=_open_dir_for_removal(parent_fd, name))


def disk_usage(path) -> int:
    """Bytes allocated under directory PATH (du -s), at any depth, with bounded open files;
    symlinks are not followed and entries that vanish meanwhile are skipped."""
    total = 0

    def add_entries(fd):
        nonlocal total
        subdirs = []
        with os.scandir(fd) as listing:
            for child in listing:
                try:
                    total += child.stat(follow_symlinks=False).st_blocks * 512
                except OSError:
                    continue
                if child.is_dir(follow_symlinks=False):
                    subdirs.append(child.name)
        return subdirs

    def open_child(fd, child):
        try:
            return os.open(child, _O_DIR_NOFOLLOW, dir_fd=fd)
        except OSError:
            return None

    path = os.path.abspath(os.fspath(path))
    parent_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        walk_at(parent_fd, os.path.basename(path), add_entries, open_child,
                top_fd=os.open(os.path.basename(path), _O_DIR_NOFOLLOW, dir_fd=parent_fd))
    finally:
        os.close(parent_fd)
    return total


def walk_at(parent_fd: int, name: str, visit, open_child, leave=None, *, top_fd: int) -> None:
    """Depth-first walk of directory NAME in PARENT_FD (already opened as TOP_FD, which the
    walk closes) without recursion and with at most three open files at any depth.

    VISIT(fd) lists the subdirectory names to enter; OPEN_CHILD(fd, name) opens one (None:
    skip it); LEAVE(up_fd, name), if given, runs once a directory is done. The walk goes
    back up through '..', checked to be the directory it came from, so a tree moved
    meanwhile stops the walk (ESTALE) instead of redirecting it."""
    base_fd = os.dup(parent_fd)
    fd = top_fd
    # one frame per level: (name in parent, (dev, ino) of parent, subdirectories left)
    frames = [(name, _identity(os.fstat(base_fd)), None)]
    try:
        while frames:
            entry, parent_id, todo = frames[-1]
            if todo is None:
                todo = visit(fd)
                frames[-1] = (entry, parent_id, todo)
            if todo:
                child = todo.pop()
                child_fd = open_child(fd, child)
                if child_fd is None:
                    continue
                here = _identity(os.fstat(fd))
                os.close(fd)
                fd = child_fd
                frames.append((child, here, None))
                continue
            frames.pop()
            up = base_fd if not frames else os.open("..", _O_DIR_NOFOLLOW, dir_fd=fd)
            if up != base_fd and _identity(os.fstat(up)) != parent_id:
                os.close(up)
                raise OSError(errno.ESTALE, "directory moved during the walk", entry)
            os.close(fd)
            fd = up if frames else -1
            if leave is not None:
                leave(up, entry)
    finally:
        if fd not in (-1, base_fd):
            os.close(fd)
        os.close(base_fd)


def _identity(st: os.stat_result):
    return st.st_dev, st.st_ino


def _unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _open_dir_for_removal(parent_fd: int, name: str) -> int:
    """Open directory NAME (no symlink followed), first giving it u+rwx if it lacks them."""
    path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC,
                      dir_fd=parent_fd)
    try:
        mode = os.fstat(path_fd).st_mode
        if mode & stat.S_IRWXU != stat.S_IRWXU:  # the magic link names exactly this inode
            try:
                os.chmod(f"/proc/self/fd/{path_fd}", stat.S_IMODE(mode) | stat.S_IRWXU)
            except FileNotFoundError:  # no /proc: by name (checked above to be a directory)
                os.chmod(name, stat.S_IMODE(mode) | stat.S_IRWXU, dir_fd=parent_fd)
        return os.open(".", _O_DIR_NOFOLLOW, dir_fd=path_fd)
    finally:
        os.close(path_fd)


def write_atomic(path, data: bytes, mode: int = 0o600, *, fsync: bool = False,
                 owner: int | None = None) -> None:
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
# Below this many free inodes the inode table is the likely cause (tmpfs keeps one back, so
# "0 free" is not what a full table shows).
_FEW_INODES = 64


def no_space(exc: OSError, directory, needed: int | None = None, what: str = "") -> NoSpace | None:
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
    few_inodes = inodes is not None and inodes < _FEW_INODES
    if few_inodes:
        parts.append(f"{inodes} free inodes")
    device = _device_of(directory)
    where = f"{device} ({directory})" if device else directory
    detail = f": {', '.join(parts)}" if parts else ""
    prefix = f"cannot {what}: " if what else ""
    kind = "disk quota exceeded on" if quota else "no space left on"
    return NoSpace(f"{prefix}{kind} {where}{detail}",
                   f"free space{' or inodes (files)' if few_inodes else ''} in {directory} "
                   "(e.g. 'uctr rm', 'uctr gc', remove old files), or set another place "
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


def _device_of(directory: str) -> str | None:
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
        data = read_at_most(fd, limit + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}", hint) from e
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes", hint)
    return data


def read_at_most(fd: int, limit: int) -> bytes:
    """At most LIMIT bytes from FD (to its end if sooner): how every bounded reader reads."""
    chunks, left = [], limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
