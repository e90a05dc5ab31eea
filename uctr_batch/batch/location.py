"""Whether a user's node-local directory can be trusted, and where it goes when it cannot.

The node-local directory (/tmp/uctr-$UID, or the policy's storage.local_dir) sits in a place
every user can write. Another user can create its name first (a directory of their own, a
symlink, a file), plant a parent of a policy path, or the owner can break it (chmod 000).
None of that is a fault of the node, so none of it may drain or offline one:

    check(path)            None, or (USER|NODE, why): NODE only when the root-owned part of
                           the path is at fault (read-only file system, a root-owned parent
                           the user cannot create in): something only an admin can cause
    usable_local_dir(p)    P when check(P) is None, else the user's fallback directory on
                           this node when root prepared one, else P (whose use then fails
                           with the reason, for the job only)
    prepare_fallback(...)  root (prolog, PBS stager): the fallback for a user, under a
                           root-owned directory of this node:

        <trusted base>/uctr-fallback.XXXXXXXX/      root, 0711, made with mkdtemp
                                       <uid>/       the user's, 0700
        <run dir>/fallback/<base key>               root, 0644: the path above

The trusted base is the deepest directory of the path that root controls (/tmp for
/tmp/uctr-$UID): the fallback stays on the file system the site chose. Nobody but root can
create anything in uctr-fallback.*, so its per-user directories cannot be planted, and
every process of the user on the node (prolog child, each uctr-exec rank, the epilog) finds
the same one through the root-owned record, job or no job.

Standard library only (not even typing), a few system calls: uctr-exec calls
usable_local_dir() on every rank.
"""

import os
import stat

USER, NODE = "user", "node"  # stage.USER / stage.NODE
FALLBACK_RECORDS = "fallback"  # under the run dir
FALLBACK_PREFIX = "uctr-fallback."
_MAX_LINKS = 8


def _owner(uid):
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return "uid %d" % uid


def _safe_dir_mode(st):
    """Nobody but its owner can add, remove or rename entries (or: sticky, like /tmp)."""
    return not (st.st_mode & 0o022) or bool(st.st_mode & stat.S_ISVTX)


def _read_only(path):
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check(path, uid=None):
    """None when PATH is, or can be made, UID's private directory (default: the caller).

    Otherwise (kind, why). Every directory on the way must be root's or UID's and closed to
    others (or sticky), every symlink on the way root's or UID's, PATH itself a real
    directory of UID's that only UID can write. Run as UID: creatability is os.access()."""
    uid = os.geteuid() if uid is None else uid
    path = os.path.abspath(os.fspath(path))
    # symlinks on the way are followed by everyone who uses the path: only root's or ours
    prefix = "/"
    for name in path.split("/")[1:-1]:
        prefix = os.path.join(prefix, name)
        try:
            st = os.lstat(prefix)
        except FileNotFoundError:
            break
        except OSError as e:
            return USER, "cannot look at %s: %s" % (prefix, e.strerror)
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, uid):
            return USER, "%s is a symbolic link that belongs to %s" % (prefix, _owner(st.st_uid))
    parent = os.path.realpath(os.path.dirname(path))
    final = os.path.join(parent, os.path.basename(path))
    current, current_st = "/", None
    for name in [""] + [n for n in parent.split("/") if n]:
        here = os.path.join(current, name) if name else "/"
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            return _creatable(current, current_st, uid)
        except OSError as e:
            kind = NODE if current_st is not None and current_st.st_uid == 0 else USER
            return kind, "cannot look at %s: %s" % (here, e.strerror)
        if not stat.S_ISDIR(st.st_mode):
            kind = NODE if st.st_uid == 0 else USER
            return kind, "%s is not a directory (it belongs to %s)" % (here, _owner(st.st_uid))
        if st.st_uid not in (0, uid):
            return USER, "%s belongs to %s" % (here, _owner(st.st_uid))
        # the user's own directories may be group-writable (user private groups, umask 002)
        closed = _safe_dir_mode(st) or (st.st_uid == uid != 0 and not st.st_mode & 0o002)
        if not closed:
            kind = NODE if st.st_uid == 0 else USER
            return kind, "%s is writable by others (mode %04o)" % (here, stat.S_IMODE(st.st_mode))
        current, current_st = here, st
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return _creatable(parent, current_st, uid)
    except OSError as e:
        return USER, "cannot look at %s: %s" % (final, e.strerror)
    who = _owner(st.st_uid)
    if stat.S_ISLNK(st.st_mode):
        return USER, "%s is a symbolic link that belongs to %s" % (final, who)
    if not stat.S_ISDIR(st.st_mode):
        return USER, "%s is not a directory (it belongs to %s)" % (final, who)
    if st.st_uid != uid:
        return USER, "%s belongs to %s" % (final, who)
    if st.st_mode & 0o022:
        return USER, "%s is writable by others (mode %04o)" % (final, stat.S_IMODE(st.st_mode))
    # read-only: the node's fault only when it is the file system of the root-owned parent;
    # a read-only mount on the directory itself (FUSE) is the user's own doing
    own_mount = current_st is None or st.st_dev != current_st.st_dev
    if _read_only(final):
        if own_mount or current_st.st_uid != 0:
            return USER, "%s is a read-only mount" % final
        return NODE, "%s is on a read-only file system" % final
    if st.st_mode & 0o700 != 0o700:
        return USER, "%s lacks owner permissions (mode %04o)" % (final, stat.S_IMODE(st.st_mode))
    return None


def _creatable(directory, st, uid):
    """Can UID create the missing rest of a path in DIRECTORY (the deepest existing one)?"""
    root_owned = st is None or st.st_uid == 0
    if _read_only(directory):
        return (NODE if root_owned else USER), "%s is on a read-only file system" % directory
    if uid == os.geteuid() and not os.access(directory, os.W_OK | os.X_OK):
        return (NODE if root_owned else USER), "cannot create directories in %s" % directory
    return None


def trusted_base(path):
    """The deepest existing directory of PATH's real parent chain that root owns and only
    root can change (or is sticky, like /tmp): where root may put a fallback."""
    parent = os.path.realpath(os.path.dirname(os.path.abspath(os.fspath(path))))
    base, current = None, "/"
    for name in [""] + [n for n in parent.split("/") if n]:
        current = os.path.join(current, name) if name else "/"
        try:
            st = os.lstat(current)
        except OSError:
            break
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or not _safe_dir_mode(st):
            break
        base = current
    return base


# -- the fallback ---------------------------------------------------------------------------
def _run_dir(env):
    env = os.environ if env is None else env
    return env.get("UCTR_RUN_DIR") or "/run/uctr"


def record_path(base, env=None):
    key = base.strip("/").replace("%", "%25").replace("/", "%2F") or "%2F"
    return os.path.join(_run_dir(env), FALLBACK_RECORDS, key)


def _root_dir_ok(path, base):
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022
            and os.path.dirname(path) == base
            and os.path.basename(path).startswith(FALLBACK_PREFIX))


def _recorded(base, env):
    try:
        fd = os.open(record_path(base, env), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_uid != 0:
            return None
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)
    return text if _root_dir_ok(text, base) else None


def fallback_for(path, env=None,
                 uid=None):
    """The fallback directory root prepared for UID on this node for PATH, or None."""
    uid = os.geteuid() if uid is None else uid
    base = trusted_base(path)
    top = _recorded(base, env) if base else None
    if top is None:
        return None
    mine = os.path.join(top, str(uid))
    try:
        st = os.lstat(mine)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        return None
    return mine


def usable_local_dir(preferred, env=None):
    """PREFERRED unless it cannot be trusted and root prepared a fallback for us here."""
    preferred = os.fspath(preferred)
    if check(preferred) is None:
        return preferred
    return fallback_for(preferred, env) or preferred


def _make_top(base, env):
    """Create and record BASE's uctr-fallback.* directory, once: two prologs (two users'
    first jobs on the node) racing here would each record their own, and the first one's
    user would then find no directory of theirs under the recorded one."""
    import fcntl
    import tempfile

    from uctr_batch import fsutil
    from uctr_batch.batch import readiness

    records = os.path.dirname(record_path(base, env))
    readiness.ensure_root_dir(records)
    lock = os.open(os.path.join(records, "%lock"),  # no base key looks like this
                   os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # root's, held for a mkdir and a small write
        top = _recorded(base, env)
        if top is None:
            top = tempfile.mkdtemp(prefix=FALLBACK_PREFIX, dir=base)  # 0700, root's, new
            os.chmod(top, 0o711)  # users may pass through to their own directory, not list
            fsutil.write_atomic(record_path(base, env), (top + "\n").encode(), 0o644)
        return top
    finally:
        os.close(lock)


def prepare_fallback(base, uid, gid, env=None):
    """As root: make (or find) UID's fallback directory under BASE and record it. Raises
    OSError (or ValueError for a BASE root does not control)."""
    if os.geteuid() != 0:
        raise PermissionError("only root can prepare a fallback directory")
    base = os.path.abspath(base)
    if not base or trusted_base(os.path.join(base, "x")) != base:
        raise ValueError("%s is not a directory that only root controls" % base)
    top = _recorded(base, env)
    if top is None:
        top = _make_top(base, env)
    mine = os.path.join(top, str(uid))
    try:
        os.mkdir(mine, 0o700)
    except FileExistsError:
        pass
    fd = os.open(mine, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != uid:
            os.fchown(fd, uid, gid)
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return mine
