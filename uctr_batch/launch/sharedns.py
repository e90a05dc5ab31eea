"""One container user+mount namespace per node and job step, shared by its ranks (N1).

Ranks on a node must be in one user namespace: the kernel refuses process_vm_readv (CMA,
the single-copy transport of Open MPI, MPICH and UCX) between processes of two sibling user
namespaces, even of the same user. So, like `ch-run --join` and pyxis, the first rank of a
step sets the container up and the others setns() into it.

Protocol, in <local dir>/launch/ (node-local, private to the user):

    step-<step key>-<ns key>.lock   flock; held while a rank sets up or joins
    step-<step key>-<ns key>.ns     marshal record: generation, the user and mount namespace
                                    inodes, creator and holder (pid, start time), the extras
    step-<step key>-<ns key>.gN.members   the ranks that joined generation N, one
                                    "pid start-time" line each (O_APPEND)
    fast-step-<step key>.rec        the C front's fast-join record (launch.fastrec), not ours:
                                    written and collected by fastrec

The ns key is a hash of everything that shapes the namespace (rootfs, binds, devices...),
so ranks of one step that asked for different containers never share one. Under the lock:

  * if a recorded member is alive (same pid and process start time, which defeats pid
    reuse) and its /proc/PID/ns/{user,mnt} have the recorded inodes, the rank opens those
    two files first (an open namespace file keeps the namespace alive), checks again, then
    setns()es into both, adds itself to the members and releases the lock;
  * otherwise it is the creator of a new generation: it unshares, mounts and pivot_roots
    (modes.n1.setup_namespace), then writes the record through the directory descriptor it
    opened before pivot_root (the host path is gone by then), and releases the lock.
Every rank then execs its payload: no process of ours stays per rank.

The holder (at most one per node and step): a namespace lives as long as any process in
it, and a late rank joins through *any* live member, not only the creator. With MPI the
creator's payload waits in MPI_Init until every rank arrived, so it anchors the namespace
by itself; but a short command (`srun -n 32 uctr-exec IMG true`) may exit before the last
local rank joins, and that rank would then start a second generation. So the creator also
forks one small holder into the namespace; it exits as soon as the step's local ranks are
all members (local size from the launcher), after a while without a new member, or after
the staging timeout, and the kernel frees the namespace with its last process. A new
generation is created only when no member is alive, and a member is recorded only once it
is in the namespace: at every moment all live ranks of a step on a node share one.

Nothing leaks when ranks crash or are SIGKILLed: the kernel drops the flock and frees the
namespace with its last process (the holder gives up on missing ranks by itself); what
remains is a small record, removed a day later by the next creator on the node.
"""

import marshal
import os
import sys
import time
import zlib

from uctr_batch.errors import ModeError
from uctr_batch.launch.nodelock import (LockTimeout, NodeLock, due, open_private_dir,
                                        read_marshal, write_marshal)

RECORD_FORMAT = 1
GC_AGE = 86400.0  # step records untouched this long belong to finished steps
GC_EVERY = 3600.0  # a creator collects them at most this often per directory (nodelock.due)
GC_MARKER = "step-collected"  # its mtime: the last collection (no .lock: never a step's)


def ns_key(*parts) -> str:
    """A short stable hash of what shapes the namespace."""
    data = repr(parts).encode()
    return "%08x%08x" % (zlib.crc32(data), zlib.adler32(data))


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120]


def start_time(pid: int):
    """Field 22 of /proc/PID/stat (start time in clock ticks), or None if there is no PID."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rpartition(b")")[2].split()
    return fields[19].decode() if len(fields) > 19 else None


def self_identity():
    return (os.getpid(), start_time(os.getpid()))


class Member:
    """A live member of the recorded namespace, with its namespace files open."""

    def __init__(self, pid, user_fd, mnt_fd):
        self.pid, self.user_fd, self.mnt_fd = pid, user_fd, mnt_fd

    def close(self):
        for fd in (self.user_fd, self.mnt_fd):
            if fd >= 0:
                os.close(fd)
        self.user_fd = self.mnt_fd = -1


class Rendezvous:
    """The step's rendezvous for one namespace configuration on this node.

        rdv = Rendezvous(launch_dir, step_key, key, timeout)
        rdv.lock()
        member = rdv.live_member()
        if member: rdv.join(member)            # now inside
        else: setup_namespace(spec); rdv.publish(extras)
        rdv.release()
    """

    def __init__(self, directory: str, step_key: str, key: str, timeout: float):
        self.directory = directory
        self.stem = "step-%s-%s" % (safe_name(step_key), key)
        self.timeout = timeout
        self.dir_fd = -1
        self.record = None
        self._lock = None

    # -- locking ----------------------------------------------------------------------
    def lock(self) -> None:
        if self.dir_fd < 0:
            self.dir_fd = open_private_dir(self.directory)
        self._lock = NodeLock(self.dir_fd, self.stem + ".lock")
        try:
            self._lock.acquire(self.timeout)
        except LockTimeout as e:
            holder = " held by pid %d" % e.holder if e.holder else ""
            raise ModeError(
                "timed out after %.0f s waiting for the shared namespace of this job step "
                "(lock %s/%s.lock%s)" % (self.timeout, self.directory, self.stem, holder),
                "a rank of this step on this node is stuck setting up the container; raise "
                "UCTR_STAGE_TIMEOUT, or kill that process") from None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    # -- the record -------------------------------------------------------------------
    def peek(self):
        """The current record without taking the lock (it may change before we lock)."""
        if self.dir_fd < 0:
            self.dir_fd = open_private_dir(self.directory)
        return self.read_record()

    def read_record(self):
        record = read_marshal(self.dir_fd, self.stem + ".ns")
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT \
                or record.get("python") != tuple(sys.version_info[:2]):
            return None
        return record

    def _write_record(self, record: dict) -> None:
        write_marshal(self.dir_fd, self.stem + ".ns", record)

    def members_name(self, generation: int) -> str:
        return "%s.g%d.members" % (self.stem, generation)

    def members(self):
        """(pid, start time) of every member of the recorded generation, oldest first: the
        creator and holder from the record, then the joined ranks from the members file."""
        if self.record is None:
            return []
        return list(self.record["members"]) + _read_members(
            self.dir_fd, self.members_name(self.record["generation"]))

    # -- joining ----------------------------------------------------------------------
    def live_member(self):
        """A live member of the recorded namespace (newest first), or None."""
        self.record = self.read_record()
        if self.record is None:
            return None
        for pid, started in reversed(self.members()):
            member = _open_member(pid, started, self.record["user"], self.record["mnt"])
            if member is not None:
                return member
        return None

    def join(self, member: Member) -> dict:
        """Enter member's namespaces, record this rank; returns the creator's extras."""
        from uctr_batch.modes import nsutil

        try:
            if os.stat("/proc/self/ns/user").st_ino != self.record["user"]:
                nsutil.setns(member.user_fd, nsutil.CLONE_NEWUSER,
                             "cannot join the user namespace of rank process %d" % member.pid)
            nsutil.setns(member.mnt_fd, nsutil.CLONE_NEWNS,
                         "cannot join the mount namespace of rank process %d" % member.pid)
        finally:
            member.close()
        os.chdir("/")
        # One small O_APPEND write, not a rewrite of the record: the lock is held briefly.
        pid, started = self_identity()
        fd = os.open(self.members_name(self.record["generation"]),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.dir_fd)
        try:
            os.write(fd, b"%d %s\n" % (pid, (started or "0").encode()))
        finally:
            os.close(fd)
        return self.record["extras"]

    # -- creating ---------------------------------------------------------------------
    def publish(self, extras: dict, local_size=None) -> dict:
        """After this process set up the namespace (and pivot_root'ed): record it, with a
        holder when more local ranks are expected (see spawn_holder)."""
        generation = (self.record or {}).get("generation", 0) + 1
        members = [self_identity()]
        holder = None
        if local_size is None or local_size > 1:
            holder = spawn_holder(self.dir_fd, self.stem + ".ns", local_size, self.timeout)
            members.append((holder, start_time(holder)))
        self.record = {
            "format": RECORD_FORMAT, "python": tuple(sys.version_info[:2]),
            "generation": generation, "created": time.time(), "creator": os.getpid(),
            "holder": holder, "user": os.stat("/proc/self/ns/user").st_ino,
            "mnt": os.stat("/proc/self/ns/mnt").st_ino, "members": members, "extras": extras,
        }
        self._write_record(self.record)
        try:
            os.unlink(self.members_name(generation - 1), dir_fd=self.dir_fd)
        except OSError:
            pass
        if due(self.dir_fd, GC_MARKER, GC_EVERY):
            self._collect_garbage()
        return self.record

    def _collect_garbage(self) -> None:
        """Remove records and locks of steps idle for GC_AGE (never one somebody holds).
        Only step-* names: fastrec's fast-step-* records in this directory are its own."""
        now = time.time()
        try:
            names = os.listdir(self.dir_fd)
        except OSError:
            return
        for name in names:
            if not name.startswith("step-") or not name.endswith(".lock") \
                    or name == self.stem + ".lock":
                continue
            stem = name[:-len(".lock")]
            try:
                age = now - os.stat(stem + ".ns", dir_fd=self.dir_fd).st_mtime
            except OSError:
                age = now - _mtime(self.dir_fd, name)
            if age < GC_AGE:
                continue
            lock = NodeLock(self.dir_fd, name)
            if not lock.try_acquire():
                continue
            try:
                victims = [n for n in names if n.startswith(stem + ".g") and n.endswith(".members")]
                for victim in victims + [stem + ".ns", name]:
                    try:
                        os.unlink(victim, dir_fd=self.dir_fd)
                    except OSError:
                        pass
            finally:
                lock.release()


# -- the holder ---------------------------------------------------------------------------

HOLDER_IDLE_KNOWN = 60.0  # local size known: give up on missing ranks after this long idle
HOLDER_IDLE_UNKNOWN = 2.0  # local size unknown: ranks of a step arrive within this of each other
HOLDER_POLL = 0.01


def spawn_holder(dir_fd: int, record_name: str, local_size, limit: float) -> int:
    """Start the step's holder; return its pid. Called by the creator inside the new
    namespace, before it publishes the record (the holder is a member from the start).

    The holder keeps the namespace alive for ranks that have not joined yet, in case the
    creator's payload exits first (short commands). It exits as soon as local_size ranks
    are members; after HOLDER_IDLE_* seconds without a new member; HOLDER_IDLE_UNKNOWN
    seconds after the last join when every member but itself is gone (ranks killed before
    the others came); or after `limit`.
    It is a grandchild (double fork): re-parented at once, it is never a child of a
    payload that waits for its own children. It keeps no inherited descriptor open: not
    the lock (flock belongs to the open file), not stdio pipes, not PMI_FD.
    """
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # intermediate: fork the holder, report its pid, vanish
        code = 1
        try:
            os.close(r)
            holder = os.fork()
            if holder == 0:
                os.close(w)
                _holder_main(dir_fd, record_name, local_size, limit)  # never returns
            os.write(w, b"%d" % holder)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = os.read(r, 32)
    finally:
        os.close(r)
        os.waitpid(child, 0)
    if not data.isdigit():
        raise ModeError("cannot start the namespace holder of this job step", None)
    return int(data)


def _holder_main(dir_fd: int, record_name: str, local_size, limit: float) -> None:
    code = 0
    try:
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        for fd in _open_fds():
            if fd > 2 and fd != dir_fd:
                try:
                    os.close(fd)
                except OSError:
                    pass
        idle_limit = HOLDER_IDLE_KNOWN if local_size else HOLDER_IDLE_UNKNOWN
        started = last_change = time.monotonic()
        seen = 0
        me = os.getpid()
        while True:
            time.sleep(HOLDER_POLL)
            now = time.monotonic()
            record = _read_record_at(dir_fd, record_name)
            if record is None or record.get("holder") != me:
                if now - started > 1.0:  # never published, or replaced: not ours any more
                    break
                continue
            others = [(pid, st) for pid, st in record["members"] if pid != me]
            others += _read_members(dir_fd, "%s.g%d.members" % (record_name[:-len(".ns")],
                                                               record["generation"]))
            if local_size and len(others) >= local_size:
                break
            if len(others) != seen:
                seen, last_change = len(others), now
            idle = now - last_change
            if idle > idle_limit or now - started > limit:
                break
            if idle > HOLDER_IDLE_UNKNOWN and not any(start_time(p) == st for p, st in others):
                break  # every rank that joined is gone (killed?) and nobody new came
    except BaseException:  # noqa: BLE001 - a forked child must never return into the caller
        code = 1
    finally:
        os._exit(code)


def _read_members(dir_fd: int, name: str):
    """(pid, start time) lines of a members file; a line being written is skipped."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return []
    try:
        data = os.read(fd, 1 << 20)
    finally:
        os.close(fd)
    out = []
    for line in data.split(b"\n"):
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            out.append((int(parts[0]), parts[1].decode()))
    return out


def _open_fds():
    try:
        return [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))


def _read_record_at(dir_fd: int, name: str):
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        data = os.read(fd, 1 << 20)
        return marshal.loads(data)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    finally:
        os.close(fd)


def _mtime(dir_fd: int, name: str) -> float:
    try:
        return os.stat(name, dir_fd=dir_fd).st_mtime
    except OSError:
        return time.time()


def _open_member(pid: int, started, user_ino: int, mnt_ino: int):
    """Open /proc/PID/ns/{user,mnt} if PID is still the recorded process and still in the
    recorded namespaces; the open files keep them alive from then on."""
    if start_time(pid) != started:
        return None
    fds = []
    try:
        for ns, ino in (("user", user_ino), ("mnt", mnt_ino)):
            fd = os.open("/proc/%d/ns/%s" % (pid, ns), os.O_RDONLY | os.O_CLOEXEC)
            fds.append(fd)
            if os.fstat(fd).st_ino != ino:
                raise OSError("not the recorded namespace")
        if start_time(pid) != started:  # the pid was reused while we opened
            raise OSError("pid reused")
    except OSError:
        for fd in fds:
            os.close(fd)
        return None
    return Member(pid, fds[0], fds[1])
