"""Node-local locks for the ranks of one node: flock(2) on a file, with a bounded wait.

flock is right here and image.lock.FileLock is not: every waiter is on the same node, the
kernel drops the lock the moment its holder dies (a SIGKILLed rank leaves nothing stale),
and taking it costs two system calls instead of a heartbeat thread and a JSON file.

Waiting blocks in flock (the kernel hands the lock over at once) under a SIGALRM timer for
the bound.
A lock file may be removed by a cleaner that holds it; a waiter that then gets the lock on
the unlinked inode notices (the name no longer points at its inode) and starts over.
"""

import errno
import fcntl
import marshal
import os
import time

from uctr_batch.errors import StorageError



class _Expired(Exception):
    pass


def _expired(signum, frame):
    raise _Expired()


def _signal_module():
    try:
        import _signal  # built in and loaded at start-up: free

        return _signal
    except ImportError:  # another Python implementation
        import signal

        return signal


class LockTimeout(StorageError):
    """The wait for a node-local lock ran out; .holder is the pid that held it, or None."""

    def __init__(self, message, hint=None, holder=None):
        super().__init__(message, hint)
        self.holder = holder


class NodeLock:
    """Exclusive lock on file NAME in directory DIR_FD (an open directory descriptor).

        lock = NodeLock(dir_fd, "x.lock")
        lock.acquire(timeout=600.0)   # LockTimeout after 600 s
        ...
        lock.release()                # or let the process exit / exec

    The file descriptor is close-on-exec: exec'ing the payload drops the lock.
    """

    def __init__(self, dir_fd: int, name: str):
        self.dir_fd = dir_fd
        self.name = name
        self.fd = -1

    def acquire(self, timeout: float) -> None:
        deadline = time.monotonic() + max(0.0, timeout)
        if self.try_acquire():
            return
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeout("timed out after %.0f s waiting for %s" % (timeout, self.name),
                                  None, self.holder())
            if self._wait(remaining):
                return

    def _wait(self, seconds: float) -> bool:
        """Block in flock until the lock is ours (True), or until SECONDS have passed or the
        file was replaced meanwhile (False: acquire() decides whether to wait again).

        A blocking flock is woken by the kernel the moment the holder lets go, so the ranks
        queued on a lock follow each other without gaps (polling would leave up to a sleep
        interval between them). The timeout is a SIGALRM timer, through the built-in _signal
        module: `import signal` would load enum on every rank."""
        fd = os.open(self.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.dir_fd)
        alarm = _signal_module()
        previous = alarm.signal(alarm.SIGALRM, _expired)
        try:
            alarm.setitimer(alarm.ITIMER_REAL, seconds)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            finally:
                alarm.setitimer(alarm.ITIMER_REAL, 0)
        except _Expired:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        finally:
            alarm.signal(alarm.SIGALRM, previous)
        if not self._still_named(fd):
            os.close(fd)  # removed by a cleaner while we waited: acquire() tries the new file
            return self.try_acquire()
        self._own(fd)
        return True

    def try_acquire(self) -> bool:
        """One attempt without waiting; True when the lock is ours."""
        fd = os.open(self.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                return False
            raise
        if not self._still_named(fd):
            os.close(fd)  # removed by a cleaner between our open and our flock
            return False
        self._own(fd)
        return True

    def _own(self, fd: int) -> None:
        self.fd = fd
        os.pwrite(fd, b"%10d\n" % os.getpid(), 0)  # fixed width: no truncate needed

    def _still_named(self, fd: int) -> bool:
        try:
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def holder(self):
        """The pid written by the current holder, or None."""
        try:
            fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except OSError:
            return None
        try:
            text = os.read(fd, 32).decode(errors="replace").strip()
        finally:
            os.close(fd)
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def open_private_dir(path: str, create: bool = True) -> int:
    """An O_DIRECTORY descriptor of PATH, a directory of ours nobody else can write.

    Created 0700 (with missing parents) when absent. Refuses a symlink, another owner, or
    group/other write permission: the rendezvous and index files in it steer which
    namespace and which rootfs a rank uses.
    """
    if create:
        try:
            os.makedirs(path, 0o700, exist_ok=True)
        except OSError as e:
            raise StorageError("cannot create %s: %s" % (path, e.strerror),
                               "set UCTR_LOCAL_DIR to a writable node-local directory") from e
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise StorageError("cannot use %s: %s" % (path, e.strerror),
                           "set UCTR_LOCAL_DIR to a directory of your own") from e
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise StorageError("refusing to use %s: it belongs to uid %d or others may write to it "
                           "(mode %04o)" % (path, st.st_uid, st.st_mode & 0o7777),
                           "remove it if it is yours, or set UCTR_LOCAL_DIR to a directory of "
                           "your own")
    return fd


def touch(dir_fd: int, name: str) -> None:
    """Set NAME's mtime (an empty file, 0600, created when missing) to now; never raises."""
    try:
        os.utime(name, dir_fd=dir_fd, follow_symlinks=False)
        return
    except FileNotFoundError:
        pass
    except OSError:
        return
    try:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd))
    except OSError:
        pass


def due(dir_fd: int, marker: str, every: float) -> bool:
    """True at most once per EVERY seconds for MARKER's directory: when MARKER is missing or
    older than that (it is then touched, and the caller does its periodic work). Garbage
    collection that lists the whole directory runs this way: a node that ran thousands of
    steps in a day would otherwise list and stat them all in every step's creator."""
    try:
        if time.time() - os.stat(marker, dir_fd=dir_fd, follow_symlinks=False).st_mtime < every:
            return False
    except OSError:
        pass
    touch(dir_fd, marker)
    return True


# -- small records in a private directory -------------------------------------------------
# marshal, not json: it is in the interpreter's start-up set, so reading costs no import.

def read_marshal(dir_fd: int, name: str):
    """The value in NAME under DIR_FD, or None when it is missing or unreadable."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return marshal.load(f)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    finally:
        os.close(fd)


def write_marshal(dir_fd: int, name: str, value) -> None:
    """Replace NAME under DIR_FD with VALUE (0600); readers see the old or the new one."""
    tmp = "%s.%d.tmp" % (name, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        os.write(fd, marshal.dumps(value))
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
