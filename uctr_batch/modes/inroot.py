"""Paths inside a root filesystem, resolved the way the kernel would after a chroot.

A container path such as /var/run/x may pass through symlinks of the image (/var/run -> /run,
or an absolute link to /etc/...). Resolving it naively on the host would follow absolute
links out of the rootfs and write to host files. resolve() follows every link relative to
the rootfs and clamps `..` at its top, like openat2(RESOLVE_IN_ROOT).
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
            raise UctrError("too many levels of symbolic links in %s" % path,
                            "the image has a symbolic link loop there: use another path")
        target = os.readlink(candidate)
        if target.startswith("/"):
            done = []
        todo.extend(reversed([p for p in target.split("/") if p and p != "."]))
    return os.path.join(rootfs, *done)


def exists(rootfs: str, path: str) -> bool:
    return os.path.lexists(resolve(rootfs, path))


def ensure_mountpoint(rootfs: str, path: str, is_dir: bool) -> str:
    """Create container path `path` (a directory or an empty file) if missing; its host path.

    Mount points must exist before a bind mount; the rootfs belongs to the caller, so they are
    created in it, like docker creates a missing -v target.
    """
    host = resolve(rootfs, path)
    try:
        st = os.stat(host)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UctrError("cannot use %s inside the container: %s" % (path, e.strerror),
                        "use another path in the container, or fix the image")
    if st is not None:
        if is_dir and not stat.S_ISDIR(st.st_mode):
            raise UctrError("cannot bind a directory onto %s: it is a file in the image" % path,
                            "choose another destination path")
        if not is_dir and stat.S_ISDIR(st.st_mode):
            raise UctrError("cannot bind a file onto %s: it is a directory in the image" % path,
                            "choose another destination path")
        return host
    try:
        if is_dir:
            os.makedirs(host, exist_ok=True)
        else:
            parent = resolve(rootfs, os.path.dirname(path.rstrip("/")) or "/")
            os.makedirs(parent, exist_ok=True)
            os.close(os.open(host, os.O_WRONLY | os.O_CREAT, 0o644))
    except OSError as e:
        raise UctrError("cannot create mount point %s in %s: %s" % (path, rootfs, e.strerror),
                        "the rootfs must be writable by you to add new mount points; bind "
                        "onto a path that exists in the image") from e
    return host


def clean(path: str) -> str:
    """Normalise an absolute container path ('/a/./b/' -> '/a/b'); raise if relative."""
    if not path.startswith("/"):
        raise UctrError("container path must be absolute: %s" % path,
                        "give a path that starts with /")
    return os.path.normpath(path).replace("//", "/")
