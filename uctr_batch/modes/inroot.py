"""Paths inside a root filesystem, resolved the way the kernel would after a chroot.

A container path such as /var/run/x may pass through symlinks of the image (/var/run -> /run,
or an absolute link to /etc/...). Resolving it naively on the host would follow absolute
links out of the rootfs and write to host files. resolve() follows every link relative to
the rootfs and clamps `..` at its top, like openat2(RESOLVE_IN_ROOT).

The rule every mode follows (docs/modes.md, "Paths inside the rootfs"): no path that a mode
or its runtime creates, mounts on or writes to is handed over as the image spells it.
  * ensure_mountpoint() resolves a destination (bind targets, /etc/passwd, /etc/group, the
    working directory) inside the rootfs, creates what is missing there, checks that the
    result is a real, link-free path under the rootfs, and returns it; the runtimes get that
    resolved path (container_path()), never the image's links.
  * system_dirs() makes /dev, /proc and /sys real directories of the rootfs. The namespace
    runtimes open them by name (crun creates /dev/null, /dev/ptmx, ... in whatever "dev" is),
    so a link there (absolute, ../, dangling, to a file) is replaced by an empty directory:
    the rootfs is the caller's own copy, and all three are covered by mounts in every mode.
A path that cannot be made safe is refused with a UctrError before any runtime starts.
The rootfs belongs to the caller: a race that swaps a component for a link after the check
can only redirect the caller's own process to files the caller could write anyway.
"""

import os
import stat

from uctr_batch.errors import UctrError

_MAX_LINKS = 40  # the kernel's MAXSYMLINKS


def resolve(rootfs: str, path: str) -> str:
    """The host path of container path `path` in `rootfs`; the last component need not exist."""
    rootfs = rootfs.rstrip("/") or "/"
    done = []  # resolved components below rootfs
    todo = [p for p in path.split("/") if p and p != "."]
    todo.reverse()
    links = 0
    while todo:
        part = todo.pop()
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(rootfs, *done, part)
        try:
            st = os.lstat(candidate)
        except OSError:
            done.append(part)
            continue
        if not stat.S_ISLNK(st.st_mode):
            done.append(part)
            continue
        links += 1
        if links > _MAX_LINKS:
            raise UctrError("too many levels of symbolic links in %s inside the image" % path,
                            "the image's links loop or chain more than %d deep; fix the image, "
                            "or bind onto another path" % _MAX_LINKS)
        target = os.readlink(candidate)
        if target.startswith("/"):
            done = []
        todo.extend(reversed([p for p in target.split("/") if p and p != "."]))
    return os.path.join(rootfs, *done)


def exists(rootfs: str, path: str) -> bool:
    return os.path.lexists(resolve(rootfs, path))


MAX_READ = 16 << 20  # an image file uctr itself reads (/etc/passwd, /etc/group, ld.so.conf)


def read_file(rootfs: str, path: str, limit: int = MAX_READ):
    """The bytes of container path `path`, resolved inside rootfs; None when it is missing or
    not a regular file. The image is untrusted: a FIFO there would block the open or the read
    forever, and a sparse 1 TiB file would be read into memory, so the open never blocks
    (O_NONBLOCK), a non-regular file counts as absent and more than `limit` bytes is refused."""
    try:
        fd = os.open(resolve(rootfs, path),
                     os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > limit:
            raise UctrError("%s in the image is %d bytes, more than the %d uctr reads"
                            % (path, st.st_size, limit),
                            "the image's %s is not a usable file; fix the image" % path)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # grew while read
            raise UctrError("%s in the image is larger than the %d bytes uctr reads"
                            % (path, limit), "the image's %s is not a usable file; fix the image"
                            % path)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


SYSTEM_DIRS = ("/dev", "/proc", "/sys")  # covered by mounts in N1/R1, opened by name by crun


def system_dirs(rootfs: str) -> None:
    """Make /dev, /proc and /sys real directories of rootfs (see the module docstring).

    Safe against concurrent runs on the same rootfs (ranks of one job): whoever comes second
    finds the directory the first one made."""
    for path in SYSTEM_DIRS:
        host = os.path.join(rootfs, path[1:])
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise _unusable(rootfs, path, e)
        if st is not None and stat.S_ISDIR(st.st_mode):
            continue
        try:
            if st is not None:
                os.unlink(host)  # a link (any target), a file, a fifo: never followed
        except (FileNotFoundError, IsADirectoryError):
            pass  # replaced meanwhile by a concurrent run
        except OSError as e:
            raise _unusable(rootfs, path, e)
        try:
            os.mkdir(host, 0o755)
        except FileExistsError:
            pass
        except OSError as e:
            raise _unusable(rootfs, path, e)
        if not stat.S_ISDIR(os.lstat(host).st_mode):
            raise _unusable(rootfs, path, None)


def _unusable(rootfs: str, path: str, e):
    why = (": " + e.strerror) if e is not None and e.strerror else ""
    return UctrError("%s in the image %s is not a directory and cannot be replaced by one%s"
                     % (path, rootfs, why),
                     "the container mounts over %s, so it must be a directory; make the rootfs "
                     "writable by you, or recreate it with `uctr create`" % path)


def container_path(rootfs: str, host: str) -> str:
    """The container path of host path `host` under rootfs ('/a/b' for ROOTFS/a/b)."""
    rel = os.path.relpath(host, rootfs)
    return "/" if rel == "." else "/" + rel


def check_inside(rootfs: str, host: str, path: str) -> str:
    """host, if it is a real (link-free) path at or below rootfs; else refuse."""
    real = os.path.realpath(host)
    top = rootfs.rstrip("/")
    if real != os.path.normpath(host) or not (real == rootfs or real.startswith(top + "/")):
        raise UctrError("%s inside the container resolves to %s, outside the rootfs %s"
                        % (path, real, rootfs),
                        "the image changed while the container was being set up; run again")
    return host


def ensure_mountpoint(rootfs: str, path: str, is_dir: bool) -> str:
    """Create container path `path` (a directory or an empty file) if missing; its host path,
    resolved inside rootfs and free of links (the path to hand a mount or a runtime).

    Mount points must exist before a bind mount; the rootfs belongs to the caller, so they are
    created in it, like docker creates a missing -v target.
    """
    rootfs = os.path.realpath(rootfs)
    host = _checked_kind(rootfs, path, is_dir)
    if os.path.lexists(host):
        return check_inside(rootfs, host, path)
    try:
        if is_dir:
            os.makedirs(host, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(host), exist_ok=True)
            os.close(os.open(host, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
    except OSError as e:
        raise UctrError("cannot create mount point %s in %s: %s" % (path, rootfs, e.strerror),
                        "the rootfs must be writable by you to add new mount points; bind "
                        "onto a path that exists in the image") from e
    return check_inside(rootfs, host, path)


def resolved(rootfs: str, path: str, is_dir: bool) -> str:
    """Container path `path` with the image's links resolved inside rootfs (nothing created):
    for runtimes that make missing mount points virtually (proot) or themselves (apptainer)."""
    rootfs = os.path.realpath(rootfs)
    host = _checked_kind(rootfs, path, is_dir)
    parent = host
    while not os.path.lexists(parent) and parent != rootfs:  # the part that exists
        parent = os.path.dirname(parent)
    check_inside(rootfs, parent, path)
    return container_path(rootfs, host)


def _checked_kind(rootfs: str, path: str, is_dir: bool) -> str:
    """resolve(), refusing a file where a directory is needed and the other way round."""
    host = resolve(rootfs, path)
    try:
        st = os.stat(host)
    except FileNotFoundError:
        return host
    except OSError as e:
        raise UctrError("cannot use %s inside the container: %s" % (path, e.strerror),
                        "a part of the path is not a directory in the image; choose another path")
    if is_dir != stat.S_ISDIR(st.st_mode):
        found, need = ("a file", "a directory") if is_dir else ("a directory", "a file")
        via = container_path(rootfs, host)
        raise UctrError("%s is %s in the image, where %s is needed%s"
                        % (path, found, need,
                           "" if via == path else " (through the image's links: %s)" % via),
                        "if you chose %s (-v, --workdir), choose another path; if uctr binds it "
                        "itself (/tmp, /etc/hosts, /etc/resolv.conf, $HOME), the image is "
                        "broken there: fix the image" % path)
    return host


def clean(path: str) -> str:
    """Normalise an absolute container path ('/a/./b/' -> '/a/b'); raise if relative."""
    if not path.startswith("/"):
        raise UctrError("container path must be absolute: %s" % path,
                        "give a path that starts with /")
    return os.path.normpath(path).replace("//", "/")
