"""Directories in shared places: private per-user directories that nobody else can plant or
control, and removal of trees whose modes lock their owner out (a rootfs has 0500 dirs)."""

import errno
import os
import pwd
import shutil
import stat
from pathlib import Path
from typing import Optional

from uctr_batch.errors import StorageError

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
