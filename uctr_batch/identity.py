"""Synthetic /etc/passwd and /etc/group, so `id`, `whoami` and `~` work for the caller.

The image's own entries are kept; the caller's user is added (replacing an image entry with
the same name or uid), and the caller's primary group if the image has no group with that
gid. With --root the image's files are used, with a root entry added if they lack one.

The files are written once per distinct content into a per-user state directory (never into
the rootfs, never into the host's /etc) and bind-mounted by N1, R1 and S1, passed with -b to
proot (P1/P2) and copied into the rootfs by F1, whose paths all lead into the rootfs.
"""

import os

from uctr_batch.modes import inroot

ROOT_PASSWD = "root:x:0:0:root:/root:/bin/sh"
ROOT_GROUP = "root:x:0:"


class Identity:
    """Who the payload is: ids inside the container plus the names and home to show."""

    __slots__ = ("uid", "gid", "user", "group", "home")

    def __init__(self, uid: int, gid: int, user: str, group: str, home: str):
        self.uid, self.gid, self.user, self.group, self.home = uid, gid, user, group, home


def caller(root: bool, home: str, env=None) -> Identity:
    """The calling user (or root with --root); home is the payload's final $HOME."""
    if root:
        return Identity(0, 0, "root", "root", home or "/root")
    uid, gid = os.getuid(), os.getgid()
    env = os.environ if env is None else env
    user = group = None
    try:
        import pwd

        user = pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        user = env.get("USER") or "u%d" % uid
    try:
        import grp

        group = grp.getgrgid(gid).gr_name
    except (KeyError, ImportError):
        group = user
    return Identity(uid, gid, user, group, home or "/")


def passwd_text(image_text: str, ident: Identity, shell: str) -> str:
    lines = [ln for ln in image_text.splitlines() if ln.strip()]
    if ident.uid == 0:
        if not any(_field(ln, 2) == "0" for ln in lines):
            lines.insert(0, ROOT_PASSWD)
        return "\n".join(lines) + "\n"
    keep = [ln for ln in lines
            if _field(ln, 0) != ident.user and _field(ln, 2) != str(ident.uid)]
    keep.append("%s:x:%d:%d:%s:%s:%s" % (ident.user, ident.uid, ident.gid, ident.user,
                                         ident.home, shell))
    return "\n".join(keep) + "\n"


def group_text(image_text: str, ident: Identity) -> str:
    lines = [ln for ln in image_text.splitlines() if ln.strip()]
    if any(_field(ln, 2) == str(ident.gid) for ln in lines):
        return "\n".join(lines) + "\n"
    keep = [ln for ln in lines if _field(ln, 0) != ident.group]
    keep.append(ROOT_GROUP if ident.gid == 0 else "%s:x:%d:%s" % (ident.group, ident.gid, ident.user))
    return "\n".join(keep) + "\n"


def _field(line: str, index: int) -> str:
    parts = line.split(":")
    return parts[index] if len(parts) > index and not line.startswith("#") else ""


def _read(rootfs: str, path: str) -> str:
    """The image's file as text, "" when missing or not a regular file (a FIFO would block);
    bounded (inroot.read_file)."""
    data = inroot.read_file(rootfs, path)
    return "" if data is None else data.decode("utf-8", errors="replace")


def login_shell(rootfs: str) -> str:
    return "/bin/bash" if os.path.isfile(inroot.resolve(rootfs, "/bin/bash")) else "/bin/sh"


def synthesise(rootfs: str, ident: Identity):
    """(passwd text, group text) for ident in the image at rootfs."""
    return (passwd_text(_read(rootfs, "/etc/passwd"), ident, login_shell(rootfs)),
            group_text(_read(rootfs, "/etc/group"), ident))


def store(directory: str, name: str, text: str) -> str:
    """Write text to DIRECTORY/NAME-<crc>-<len> unless that file already holds it; its path.

    Content-addressed, so concurrent ranks and later runs reuse one file and nothing needs
    cleaning up after the run (the payload replaces us; there is no 'after').
    """
    import zlib

    data = text.encode()
    path = os.path.join(directory, "%s-%08x-%d" % (name, zlib.crc32(data), len(data)))
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return path
    except OSError:
        pass
    os.makedirs(directory, mode=0o700, exist_ok=True)
    from uctr_batch import fsutil

    fsutil.write_atomic(path, data, 0o644)
    return path


def identity_files(rootfs: str, ident: Identity, directory: str):
    """Host paths of the synthetic (passwd, group) files for ident in rootfs."""
    passwd, group = synthesise(rootfs, ident)
    return store(directory, "passwd", passwd), store(directory, "group", group)
