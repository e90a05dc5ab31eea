"""FileLock with real processes: exclusion, stale-lock recovery, heartbeat, timeout."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uctr_batch.errors import StorageError
from uctr_batch.image.lock import FileLock

ROOT = Path(__file__).resolve().parents[2]

# A worker that takes the lock `rounds` times and, inside, checks nobody else is inside
# (O_EXCL marker) and increments a counter non-atomically (read, sleep, write).
WORKER = r"""
import os, sys, time
from uctr_batch.image.lock import FileLock
lock, marker, counter = sys.argv[1:4]
rounds, stale = int(sys.argv[4]), float(sys.argv[5])
for _ in range(rounds):
    with FileLock(lock, timeout=60, stale_after=stale, what="test"):
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # raises if two are inside
        n = int(open(counter).read() or 0)
        time.sleep(0.002)
        open(counter, "w").write(str(n + 1))
        os.close(fd)
        os.unlink(marker)
"""

# Takes the lock, says so on stdout, then holds it for argv[3] seconds.
HOLDER = r"""
import sys, time
from uctr_batch.image.lock import FileLock
lk = FileLock(sys.argv[1], timeout=10, stale_after=float(sys.argv[2]), what="test")
lk.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[3]))
print("lost" if lk.lost else "kept", flush=True)
lk.release()
"""


def _spawn(script, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_held(proc):
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()


def _run_workers(tmp_path, n, rounds, stale=30.0):
    counter = tmp_path / "counter"
    counter.write_text("0")
    procs = [_spawn(WORKER, tmp_path / "l.lock", tmp_path / "inside", counter, rounds, stale)
             for _ in range(n)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    return int(counter.read_text())


def _foreign_lock(path: Path, age: float, token="deadbeef"):
    path.write_text(json.dumps({"host": "some-other-node", "pid": 1, "boot_id": "x",
                                "token": token, "since": time.time() - age}))
    os.utime(path, (time.time() - age, time.time() - age))


def test_mutual_exclusion_under_contention(tmp_path):
    assert _run_workers(tmp_path, n=6, rounds=25) == 150
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter"]  # no lock or temp left


def test_breakers_of_one_stale_lock_never_both_win(tmp_path):
    _foreign_lock(tmp_path / "l.lock", age=3600)
    assert _run_workers(tmp_path, n=6, rounds=5) == 30


def test_lock_of_sigkilled_holder_on_this_host_is_taken_at_once(tmp_path):
    lock = tmp_path / "l.lock"
    holder = _spawn(HOLDER, lock, 60, 600)
    _wait_held(holder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.exists()
    start = time.monotonic()
    with FileLock(lock, timeout=10, stale_after=60):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert time.monotonic() - start < 5  # did not wait for stale_after
    assert not lock.exists()


def test_foreign_lock_without_heartbeat_is_broken_after_stale_after(tmp_path):
    lock = tmp_path / "l.lock"
    _foreign_lock(lock, age=0)
    start = time.monotonic()
    with FileLock(lock, timeout=10, stale_after=1.0):
        pass
    assert time.monotonic() - start >= 1.0


def test_long_abandoned_foreign_lock_is_broken_at_first_sight(tmp_path):
    lock = tmp_path / "l.lock"
    _foreign_lock(lock, age=3600)
    start = time.monotonic()
    with FileLock(lock, timeout=10, stale_after=60):
        pass
    assert time.monotonic() - start < 2


def test_heartbeat_keeps_a_slow_holders_lock(tmp_path):
    lock = tmp_path / "l.lock"
    holder = _spawn(HOLDER, lock, 0.4, 2.5)  # holds for 6x stale_after
    _wait_held(holder)
    with pytest.raises(StorageError):
        FileLock(lock, timeout=1.5, stale_after=0.4).acquire()
    out, err = holder.communicate(timeout=30)
    assert out.strip() == "kept", err
    with FileLock(lock, timeout=5, stale_after=0.4):
        pass


def test_timeout_names_holder_and_gives_hint(tmp_path):
    lock = tmp_path / "l.lock"
    holder = _spawn(HOLDER, lock, 30, 30)
    _wait_held(holder)
    try:
        with pytest.raises(StorageError) as exc:
            FileLock(lock, timeout=0.3, stale_after=30, what="blob sha256:abc").acquire()
    finally:
        holder.kill()
        holder.wait()
    msg = str(exc.value)
    assert "blob sha256:abc" in msg and str(lock) in msg
    assert f"pid {holder.pid}" in msg and os.uname().nodename in msg
    assert exc.value.hint and "30 s" in exc.value.hint


def test_holder_notices_a_broken_lock(tmp_path):
    lock = tmp_path / "l.lock"
    lk = FileLock(lock, timeout=1, stale_after=0.2)
    lk.acquire()
    _foreign_lock(lock, age=0, token="intruder")  # someone replaced it
    time.sleep(0.3)
    assert lk.lost
    lk.release()
    assert json.loads(lock.read_text())["token"] == "intruder"  # release left theirs alone


def test_breaker_with_an_outdated_verdict_leaves_the_new_lock_alone(tmp_path):
    # B judged token "old" stale, but meanwhile A broke it and took the lock.
    lock = tmp_path / "l.lock"
    with FileLock(lock, timeout=1, stale_after=30) as a:
        late_breaker = FileLock(lock, timeout=1, stale_after=30)
        assert late_breaker._break("old") is False
        assert json.loads(lock.read_text())["token"] == a.token
        assert not a.lost
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_filesystem_without_hard_links_falls_back_to_o_excl(tmp_path, monkeypatch):
    import errno

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # as on a filesystem without hard links
    lock = tmp_path / "l.lock"
    with FileLock(lock, timeout=1, stale_after=30) as first:
        assert json.loads(lock.read_text())["token"] == first.token
        with pytest.raises(StorageError):
            FileLock(lock, timeout=0.2, stale_after=30).acquire()
    assert not lock.exists() and list(tmp_path.iterdir()) == []
