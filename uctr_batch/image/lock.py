"""Locks that work on node-local disks and on shared NFS/Lustre/GPFS caches.

    with FileLock(path, timeout=600.0, stale_after=60.0, what="blob sha256:…"):
        ...

- Exclusive across processes, threads and hosts sharing the filesystem. ``flock`` is not
  enough there (NFS emulates it through lockd, Lustre only with ``-o flock``), so acquisition
  is the classic NFS-safe recipe: write a unique temp file, ``link()`` it to the lock name,
  and trust ``st_nlink == 2`` on the temp file rather than link()'s return value (a lost NFS
  reply can report failure for a link that was made). Filesystems without hard links fall
  back to ``O_CREAT|O_EXCL``.
- The lock file holds JSON: host, pid, boot id, pid namespace, process start time and a
  random token. A heartbeat thread refreshes its mtime every ``stale_after/4`` seconds.
- A lock is stale when its holder is on this host (same boot and pid namespace) and its
  process is gone, or when its mtime has not moved for ``stale_after`` seconds as seen by
  the waiter (a monotonic clock, so immune to clock skew between nodes), or at first sight
  when its mtime is more than ``2*stale_after`` old by wall clock (a lock left from long ago).
- Breakers are serialised by a short-lived second lock (``PATH.break``); under it the
  breaker renames the lock to a unique name and re-checks the token it judged stale, and
  puts a live lock back, so two breakers never both win and a fresh lock is never removed.
- On timeout raise errors.StorageError naming ``what``, the lock path and the holder.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import errno
import json
import os
import stat
import threading
import time

from uctr_batch import log
from uctr_batch.errors import StorageError

_log = log.get("lock")

_BREAK_LOCK_STALE = 30.0  # a breaker holds PATH.break for milliseconds; older = crashed breaker
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)
_MAX_POLL = 2.0  # cap on the polling interval: many nodes polling one NFS file must stay cheap


_MAX_LOCK_FILE = 65536  # a lock file holds ~300 bytes; anything longer was planted


# uuid and random are imported only when a lock is taken or waited for: a complete bundle is
# reused without either (the Slurm prolog and epilog on a warm node start for every job).
def _token() -> str:
    import uuid

    return uuid.uuid4().hex


def _jitter() -> float:
    import random

    return random.uniform(0.8, 1.2)


def _read_lock_file(path: str):
    """(stat, text) of a lock file, text "" when it is not a regular file: a FIFO, device,
    directory or symlink planted in a shared locks/ directory is never waited on or read
    without end (opened non-blocking, not followed, at most _MAX_LOCK_FILE bytes read).
    FileNotFoundError when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        return os.lstat(path), ""  # a symlink
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return st, ""
        data = os.read(fd, _MAX_LOCK_FILE)
        return st, data.decode("utf-8", "replace")
    finally:
        os.close(fd)


def _read_text(path: str) -> str:
    try:
        return _read_lock_file(path)[1].strip()
    except OSError:
        return ""


def _remove_aside(path: str) -> None:
    """Remove a broken lock set aside: a planted directory too."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            from uctr_batch import fsutil

            fsutil.remove_tree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"cannot remove a stale lock {path}: {e.strerror}",
                           "remove it by hand or ask the cache's owner to") from e


def _boot_id() -> str:
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """Process start time in clock ticks since boot (field 22 of /proc/PID/stat), or ''.

    Guards the dead-pid rule against pid reuse."""
    stat = _read_text(f"/proc/{pid}/stat")
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def pid_alive(pid: int, start_time: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start_time:
        now = _start_time(pid)
        return not now or now == start_time
    return True


class Holder:
    """The parsed content of a lock file (all fields optional: the file may be empty or
    half-written under the O_EXCL fallback)."""

    def __init__(self, data: dict):
        self.host = str(data.get("host", "?"))[:256]
        self.pid = _number(data.get("pid"), int)
        self.boot_id = str(data.get("boot_id", ""))[:64]
        self.pidns = str(data.get("pidns", ""))[:64]
        self.start_time = str(data.get("start_time", ""))[:64]
        self.token = str(data.get("token", ""))[:64]
        self.since = _number(data.get("since"), float)

    @classmethod
    def parse(cls, text: str) -> "Holder":
        """The holder a lock file names; fields that are missing, mistyped or absurd (a
        half-written or planted file) read as unknown, never as an error."""
        try:
            data = json.loads(text) if text else {}
        except (ValueError, RecursionError):
            data = {}
        return cls(data if isinstance(data, dict) else {})

    def describe(self) -> str:
        since = "?"
        if self.since:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on host {self.host} since {since}"


def _number(value, kind):
    """VALUE as a non-negative finite KIND (int or float), else 0."""
    if type(value) not in (int, float) or not 0 <= value < 2 ** 63:
        return kind(0)
    return kind(value)


def _identity() -> dict:
    pid = os.getpid()
    return {
        "host": os.uname().nodename,  # socket.gethostname()
        "pid": pid,
        "boot_id": _boot_id(),
        "pidns": _pid_namespace(),
        "start_time": _start_time(pid),
    }


class _Observation:
    """What a waiter last saw of the lock file, for the no-heartbeat staleness rule."""

    def __init__(self):
        self.key = None
        self.since = 0.0

    def unchanged_for(self, key) -> float:
        now = time.monotonic()
        if key != self.key:
            self.key, self.since = key, now
        return now - self.since


class FileLock:
    """Exclusive lock on ``path``; see the module docstring."""

    def __init__(self, path, timeout: float = 600.0, stale_after: float = 60.0,
                 what: str | None = None):
        self.path = os.fspath(path)
        self.timeout = float(timeout)
        self.stale_after = float(stale_after)
        self.what = what or self.path
        self.token = ""
        self.lost = False  # set by the heartbeat if someone broke the lock while we held it
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- public API -------------------------------------------------------------------
    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        seen = _Observation()
        delay = 0.01
        while True:
            if self.try_acquire(seen):
                return
            if time.monotonic() >= deadline:
                raise self._timeout_error()
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            cap = min(_MAX_POLL, max(self.stale_after / 8, 0.05))
            delay = min(delay * 2, cap) * _jitter()

    def try_acquire(self, seen: _Observation | None = None) -> bool:
        """One attempt: take the lock, or break it if stale and take it. No waiting."""
        token = _token()
        if self._create(token):
            self._won(token)
            return True
        holder, key = self._inspect()
        if key is None:  # vanished between our attempt and the look: just try again
            return False
        if self._is_stale(holder, key, seen or _Observation()) and self._break(holder.token):
            if self._create(token):
                self._won(token)
                return True
        return False

    def release(self) -> None:
        if not self.token:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self._holds():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        else:
            _log.warning("lock on %s was broken while held: %s", self.what, self.path)
        self.token = ""

    def holder(self) -> Holder | None:
        """Who holds the lock now, or None if it is free."""
        holder, key = self._inspect()
        return holder if key is not None else None

    # -- acquisition ------------------------------------------------------------------
    def _content(self, token: str) -> bytes:
        data = _identity()
        data.update(token=token, since=time.time(), what=self.what)
        return json.dumps(data).encode()

    def _create(self, token: str) -> bool:
        directory, name = os.path.split(self.path)
        tmp = os.path.join(directory or ".", f".{name}.{_token()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            self._raise_no_space(e, directory)
            raise
        try:
            try:
                content = self._content(token)
                if os.write(fd, content) != len(content):  # a short write: the disk is full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:
            os.unlink(tmp)  # a half-written lock file must not stay behind
            if isinstance(e, OSError):
                self._raise_no_space(e, directory)
            raise
        try:
            try:
                os.link(tmp, self.path)
            except OSError as e:
                if e.errno in _NO_HARD_LINKS:
                    return self._create_exclusive(token)
                if e.errno != errno.EEXIST:
                    self._raise_no_space(e, directory)  # tmpfs: a link takes an inode too
                    raise
            # NFS: link() may fail on a lost reply after succeeding; the link count is the truth
            return os.stat(tmp).st_nlink == 2
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _create_exclusive(self, token: str) -> bool:
        """Fallback for filesystems without hard links (NFSv3+ honours O_EXCL)."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            try:
                os.write(fd, self._content(token))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            os.unlink(self.path)  # ours (O_EXCL): an empty lock file would look held
            self._raise_no_space(e, os.path.dirname(self.path))
            raise
        return True

    def _raise_no_space(self, exc: OSError, directory: str) -> None:
        from uctr_batch.fsutil import no_space

        full = no_space(exc, directory or ".", None, f"take the lock on {self.what}")
        if full is not None:
            raise full from exc

    def _won(self, token: str) -> None:
        self.token = token
        self.lost = False
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="uctr-lock-heartbeat",
                                           daemon=True)
        self._heartbeat.start()

    # -- heartbeat --------------------------------------------------------------------
    def _beat(self) -> None:
        interval = max(self.stale_after / 4, 0.05)
        while not self._stop.wait(interval):
            if not self._holds():
                self.lost = True
                _log.warning("lock on %s was taken over by another process: %s",
                             self.what, self.path)
                return
            try:
                os.utime(self.path)
            except OSError as e:  # keep trying: a transient NFS error must not drop the lock
                _log.debug("heartbeat on %s failed: %s", self.path, e)

    def _holds(self) -> bool:
        return bool(self.token) and Holder.parse(_read_text(self.path)).token == self.token

    # -- staleness and breaking -------------------------------------------------------
    def _inspect(self):
        """(Holder, observation key) of the current lock file, key None if there is none.

        Opening the file (not just stat) makes NFS revalidate its attributes
        (close-to-open consistency), so the mtime we see is fresh."""
        try:
            st, text = _read_lock_file(self.path)
        except FileNotFoundError:
            return None, None
        except OSError as e:
            raise StorageError(f"cannot read the lock file {self.path}: {e.strerror}",
                               "check the cache's locks directory and its permissions") from e
        holder = Holder.parse(text.strip())
        return holder, (st.st_ino, holder.token, st.st_mtime_ns)

    def _is_stale(self, holder: Holder, key, seen: _Observation) -> bool:
        me = _identity()
        if (holder.pid and holder.host == me["host"] and holder.boot_id == me["boot_id"]
                and holder.pidns == me["pidns"] and not pid_alive(holder.pid, holder.start_time)):
            _log.debug("lock %s: holder pid %d is gone", self.path, holder.pid)
            return True
        if seen.unchanged_for(key) >= self.stale_after:
            _log.debug("lock %s: no heartbeat for %.0f s", self.path, self.stale_after)
            return True
        age = time.time() - key[2] / 1e9
        return age > 2 * self.stale_after

    def _break(self, stale_token: str) -> bool:
        """Remove the lock file iff it still carries ``stale_token``. True if removed."""
        guard = FileLock(self.path + ".break", timeout=0, stale_after=_BREAK_LOCK_STALE,
                         what=f"breaking {self.what}")
        if not guard._try_guard():
            return False
        try:
            holder, key = self._inspect()
            if key is None:
                return True  # released meanwhile: free now
            if holder.token != stale_token:
                return False  # another breaker already replaced it with a live lock
            aside = f"{self.path}.stale.{_token()}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return True
            if Holder.parse(_read_text(aside)).token != stale_token:
                self._put_back(aside)
                return False
            _remove_aside(aside)
            log.verbose("broke stale lock on %s (was held by %s)", self.what, holder.describe())
            return True
        finally:
            guard.release()

    def _put_back(self, aside: str) -> None:
        """The lock changed hands between judging and renaming: restore it without
        overwriting a lock taken meanwhile (link fails if the name exists)."""
        try:
            os.link(aside, self.path)
        except FileExistsError:
            _log.warning("lock %s changed hands while being broken", self.path)
        finally:
            os.unlink(aside)

    def _try_guard(self) -> bool:
        """Take the breaker's guard lock once, without heartbeat (held for milliseconds)."""
        token = _token()
        if self._create(token):
            self.token = token
            return True
        holder, key = self._inspect()
        if key is not None and time.time() - key[2] / 1e9 > self.stale_after:
            try:  # a breaker died holding the guard: no live breaker holds it this long
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        return False

    # -- errors -----------------------------------------------------------------------
    def _timeout_error(self) -> StorageError:
        holder = self.holder()
        who = holder.describe() if holder else "a process that just released it"
        return StorageError(
            f"timed out after {self.timeout:.0f} s waiting for the lock on {self.what}: "
            f"{self.path} (held by {who})",
            f"another uctr process is working on it; wait and retry. If that process is gone, "
            f"the lock is broken automatically {self.stale_after:.0f} s after its last "
            f"heartbeat (or delete {self.path}).",
        )
