"""Node-local flock locks of uctr-exec: exclusive, bounded waits that name the holder, freed
by the kernel when a holder is killed, safe against a cleaner removing the file."""

import os
import signal
import time

import pytest

from uctr_batch.errors import StorageError
from uctr_batch.launch.nodelock import LockTimeout, NodeLock, open_private_dir


@pytest.fixture
def dir_fd(tmp_path):
    fd = open_private_dir(str(tmp_path / "locks"))
    yield fd
    os.close(fd)


def _hold_in_child(dir_fd, name):
    """Fork a process that takes the lock and sleeps; returns its pid once it holds it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            lock = NodeLock(dir_fd, name)
            lock.acquire(5)
            os.write(w, b"x")
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    return pid


def test_exclusive_with_a_bounded_wait_naming_the_holder(dir_fd):
    holder = _hold_in_child(dir_fd, "a.lock")
    try:
        lock = NodeLock(dir_fd, "a.lock")
        assert not lock.try_acquire()
        started = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            lock.acquire(0.3)
        assert 0.25 < time.monotonic() - started < 3
        assert info.value.holder == holder
        assert isinstance(info.value, StorageError)
        assert NodeLock(dir_fd, "b.lock").try_acquire()  # other names are independent
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)


def test_a_waiter_gets_the_lock_as_soon_as_the_holder_releases_it(dir_fd):
    r, w = os.pipe()
    holder = os.fork()
    if holder == 0:
        try:
            os.close(r)
            lock = NodeLock(dir_fd, "a.lock")
            lock.acquire(5)
            os.write(w, b"x")
            time.sleep(0.5)
            lock.release()
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        lock = NodeLock(dir_fd, "a.lock")
        started = time.monotonic()
        lock.acquire(10)  # blocks in flock, woken by the release
        assert 0.3 < time.monotonic() - started < 3
        assert lock.holder() == os.getpid()
        other = os.open("a.lock", os.O_RDWR, dir_fd=dir_fd)
        try:  # we hold it, and through one descriptor only
            with pytest.raises(BlockingIOError):
                import fcntl
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
        lock.release()
    finally:
        os.close(r)
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)


def test_a_killed_holder_frees_the_lock_at_once(dir_fd):
    holder = _hold_in_child(dir_fd, "a.lock")
    lock = NodeLock(dir_fd, "a.lock")
    assert not lock.try_acquire()
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)
    lock.acquire(1)  # no staleness to wait for
    assert lock.holder() == os.getpid()
    lock.release()


def test_a_lock_file_removed_under_a_waiter_is_not_trusted(dir_fd):
    """A cleaner may unlink a lock file it holds; whoever locked the old inode must not
    think it holds the lock that newcomers take on the new file."""
    lock = NodeLock(dir_fd, "a.lock")
    fd = os.open("a.lock", os.O_RDWR | os.O_CREAT, 0o600, dir_fd=dir_fd)
    os.unlink("a.lock", dir_fd=dir_fd)
    assert not lock._still_named(fd)
    os.close(fd)
    assert lock.try_acquire()  # a fresh file
    lock.release()


def test_release_and_context(dir_fd):
    with NodeLock(dir_fd, "a.lock") as lock:
        assert lock.try_acquire()
        assert not NodeLock(dir_fd, "a.lock").try_acquire()
    assert NodeLock(dir_fd, "a.lock").try_acquire()


def test_private_dir_checks(tmp_path):
    open_private_dir(str(tmp_path / "new" / "dir"))
    assert (tmp_path / "new" / "dir").stat().st_mode & 0o777 == 0o700
    (tmp_path / "target").mkdir(mode=0o700)
    os.symlink(tmp_path / "target", tmp_path / "link")
    with pytest.raises(StorageError):
        open_private_dir(str(tmp_path / "link"))
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(StorageError) as info:
        open_private_dir(str(tmp_path / "open"))
    assert "others may write" in info.value.message
    if os.geteuid() == 0:
        (tmp_path / "theirs").mkdir(mode=0o700)
        os.chown(tmp_path / "theirs", 12345, 12345)
        with pytest.raises(StorageError):
            open_private_dir(str(tmp_path / "theirs"))
