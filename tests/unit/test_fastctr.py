"""The C creator's pieces (launchers/c/fastctr.c) against the Python launcher they replay:

  * fc_digest is recipe.digest / sharedns.ns_key (zlib's CRC-32 and Adler-32);
  * the namespace record fc_write_ns_record writes loads with marshal.loads to exactly the
    dict sharedns.Rendezvous.publish records, with an extras blob from marshal.dumps
    embedded as is (its back-references included), and the Python rendezvous reads it and
    finds the live member it lists;
  * the holder of fc_spawn_holder runs the setup in a grandchild that keeps no inherited
    descriptor, returns the setup's failure, and leaves on sharedns._holder_main's
    conditions (local size reached, idle, no live member, record replaced or never
    written).
The C side is the ASan+UBSan build of launchers/c/fastrec_tool.c (harness.cfront). Waits
for a holder to leave are generous bounds, never a measure of speed."""

import marshal
import os
import signal
import subprocess
import sys
import time
import zlib

import pytest

from tests.harness import cfront
from uctr_batch.launch import recipe, sharedns

needs_cc = pytest.mark.skipif(cfront.compiler() is None, reason="no C compiler")
pytestmark = needs_cc

GONE_WITHIN = 30.0  # a holder that should leave has left by then (it takes 0-2 s)


@pytest.fixture(scope="module")
def tool(tmp_path_factory):
    out = tmp_path_factory.mktemp("cfront")
    return cfront.build(out, ("fastrec-tool",))["fastrec-tool"]


def run_tool(tool, *args):
    # A timeout: a holder that kept our stdout pipe would make this wait for it.
    proc = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True,
                          env=dict(cfront.SAN_ENV), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- the digest ----------------------------------------------------------------------------

def py_digest(data: bytes) -> str:
    return "%08x%08x" % (zlib.crc32(data), zlib.adler32(data))


@pytest.mark.parametrize("text", ["", "a", "hello", "x" * 5551, "y" * 5553, "\x7f" * 70000,
                                  "é ü \u20ac", repr(("a", 1, None, ["b"], {"k": (2.5,)}))])
def test_digest_of_a_string(tool, text):
    assert run_tool(tool, "digest", text).strip() == py_digest(text.encode())


@pytest.mark.parametrize("data", [b"", b"\0", bytes(range(256)) * 3, b"\xff" * 100000,
                                  os.urandom(4096), os.urandom(1), b"\0" * 5552 + b"\xff"])
def test_digest_of_bytes(tool, tmp_path, data):
    path = tmp_path / "data"
    path.write_bytes(data)
    assert run_tool(tool, "digest-file", path).strip() == py_digest(data)


def test_digest_is_recipe_digest_and_ns_key(tool):
    key = ("docker://ubuntu:22.04", "/local/bundles/ab cd/rootfs", (("/home", "/home", False),),
           ("nvidia", None), 3, "é")
    assert run_tool(tool, "digest", repr(key)).strip() == recipe.digest(key)
    parts = ("/rootfs", [("/a", "/b", True)], {"dev": ["/dev/fuse"]}, 1.5)
    assert run_tool(tool, "digest", repr(parts)).strip() == sharedns.ns_key(*parts)


# -- the record ------------------------------------------------------------------------------

EXTRAS = {
    "spec": {"rootfs": "/local/bundles/ab cd/rootfs", "cwd": "/home/u", "user": "u",
             "binds": [["/home/u", "/home/u", False], ["/etc/hosts", "/etc/hosts", True]],
             "env": {"PATH": "/usr/bin", "HOME": "/home/u", "LANG": "C.UTF-8"}},
    # repeated strings and objects: marshal writes them once and refers back to them
    "again": ["/home/u", "/home/u", "PATH", "u", ("/home/u", "/etc/hosts")],
    "nested": [{"PATH": ["/usr/bin", {"u": None}]}, {"PATH": 2 ** 70, "x": -1.25e-300}],
    "text": "é" * 300, "long": "a" * 70000, "empty": "", "n": None, "t": True, "f": False,
    "big": -(2 ** 64), "bytes": b"\0\xff",
}


def expected(**fields):
    record = {"format": sharedns.RECORD_FORMAT, "python": tuple(sys.version_info[:2]),
              "generation": 1, "created": time.time(), "creator": os.getpid(), "holder": None,
              "user": 4026531837, "mnt": 4026531841, "members": [], "extras": EXTRAS}
    record.update(fields)
    return record


def c_record(tool, tmp_path, record, name="rec.ns"):
    """Have the C side write RECORD (the dict Python would publish) into tmp_path/NAME."""
    blob = tmp_path / "extras.marshal"
    blob.write_bytes(marshal.dumps(record["extras"], 4))
    members = [str(x) if x is not None else "-" for m in record["members"] for x in m]
    run_tool(tool, "ns-record", tmp_path / name, *record["python"], record["generation"],
             repr(record["created"]), record["creator"],
             record["holder"] if record["holder"] is not None else 0, record["user"],
             record["mnt"], blob, *members)
    return tmp_path / name


def test_extras_blob_has_back_references():
    """The blob the tests embed uses marshal's references (version 2 has none)."""
    assert len(marshal.dumps(EXTRAS, 4)) < len(marshal.dumps(EXTRAS, 2))
    assert marshal.loads(marshal.dumps(EXTRAS, 4)) == EXTRAS


@pytest.mark.parametrize("fields", [
    {},
    {"holder": 4194303, "members": [(12, "345"), (4194303, "18446744073709551615")]},
    {"members": [(1, None), (2, "é"), (3, "9" * 300)], "generation": 2 ** 40},
    {"user": 2 ** 31, "mnt": 2 ** 32 - 1, "created": 0.1, "creator": -(2 ** 40)},
    {"user": 2 ** 64 - 1, "mnt": 2 ** 31 - 1, "created": -1.5e-310, "generation": 0},
    {"extras": {}, "members": [(7, "")]},
    {"extras": None},
    {"extras": ["same", "same", ("same", "same")]},
])
def test_record_loads_as_the_python_dict(tool, tmp_path, fields):
    record = expected(**fields)
    path = c_record(tool, tmp_path, record)
    loaded = marshal.loads(path.read_bytes())
    assert loaded == record
    assert list(loaded) == list(record)  # publish's key order
    assert all(type(loaded[k]) is type(record[k]) for k in record)
    assert all(type(m) is tuple for m in loaded["members"])
    assert oct(path.stat().st_mode & 0o777) == oct(0o600 & ~_umask())
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_record_replaces_the_old_one(tool, tmp_path):
    old = c_record(tool, tmp_path, expected(generation=1))
    inode = old.stat().st_ino
    new = c_record(tool, tmp_path, expected(generation=2))
    assert new.stat().st_ino != inode
    assert marshal.loads(new.read_bytes())["generation"] == 2


def test_rendezvous_reads_the_record_and_finds_its_member(tool, tmp_path):
    """What a joining Python rank does with the C creator's record: read it, find a live
    member in the recorded namespaces (here this process, in its own namespaces)."""
    os.chmod(tmp_path, 0o700)
    rdv = sharedns.Rendezvous(str(tmp_path), "77.3", "0123456789abcdef", 5.0)
    me = sharedns.self_identity()
    record = expected(generation=3, members=[me], holder=me[0],
                      user=os.stat("/proc/self/ns/user").st_ino,
                      mnt=os.stat("/proc/self/ns/mnt").st_ino)
    c_record(tool, tmp_path, record, rdv.stem + ".ns")
    try:
        assert rdv.peek() == record
        member = rdv.live_member()
        assert member is not None and member.pid == os.getpid()
        member.close()
        assert rdv.members() == [me]
    finally:
        rdv.release()


def test_record_for_another_python_is_refused_by_the_rendezvous(tool, tmp_path):
    os.chmod(tmp_path, 0o700)
    rdv = sharedns.Rendezvous(str(tmp_path), "77.3", "0123456789abcdef", 5.0)
    c_record(tool, tmp_path, expected(python=(2, 7)), rdv.stem + ".ns")
    try:
        assert rdv.peek() is None
    finally:
        rdv.release()


# -- the holder ------------------------------------------------------------------------------

def proc_state(pid):
    """The holder's state letter, None when it is gone (a zombie of init counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0].decode()
    except OSError:
        return None
    return None if state in ("Z", "X") else state


def gone_within(pid, seconds=GONE_WITHIN):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc_state(pid) is None:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def holders():
    """Spawned holders, killed at the end if a failing test left one running."""
    started = []
    yield started
    for pid, start in started:
        if sharedns.start_time(pid) == start:
            os.kill(pid, signal.SIGKILL)


def spawn(tool, holders, directory, setup, local_size=3, limit=120, record="r.ns",
          members="r.g1.members"):
    out = run_tool(tool, "holder", directory, record, members, local_size, limit,
                   setup).splitlines()
    if out[0].startswith("error: "):
        return out[0][len("error: "):]
    assert out[0].startswith("pid ") and out[1:] == ["grandchild"], out
    pid = int(out[0].split()[1])
    holders.append((pid, sharedns.start_time(pid)))
    return pid


def write_record(directory, name="r.ns", data=b"record"):
    """A new file renamed over NAME, as a record is published (a new inode)."""
    tmp = directory / (name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, directory / name)


def add_member(directory, line, name="r.g1.members"):
    with open(directory / name, "ab") as f:
        f.write(line.encode())


def me_line(newline=True):
    pid, start = sharedns.self_identity()
    return "%d %s%s" % (pid, start, "\n" if newline else "")


def test_holder_keeps_only_its_directory_and_leaves_at_local_size(tool, tmp_path, holders):
    write_record(tmp_path, data=b"the previous generation")
    pid = spawn(tool, holders, tmp_path, "publish", local_size=2)
    assert (tmp_path / "setup-ran").read_text() == "%d\n" % pid  # the setup ran in it
    fds = {int(fd): os.readlink("/proc/%d/fd/%s" % (pid, fd))
           for fd in os.listdir("/proc/%d/fd" % pid)}
    assert [fds.pop(fd) for fd in (0, 1, 2)] == ["/dev/null"] * 3
    assert list(fds.values()) == [str(tmp_path)]
    # Lines that are no "PID START" do not count; the last line needs no newline.
    add_member(tmp_path, "junk\n1 2 3\nx1 5\n\n" + me_line())
    time.sleep(0.5)
    assert proc_state(pid) is not None, "left with 1 of 2 members"
    add_member(tmp_path, "  " + me_line(newline=False).replace(" ", " \t "))
    assert gone_within(pid)


def test_holder_adopts_the_record_written_after_it_started(tool, tmp_path, holders):
    """The creator's order: setup in the holder, then the record (with the holder's pid).
    The holder gives it 1 s: on a machine that stalls us longer than that, try again."""
    for _ in range(3):
        write_record(tmp_path, data=b"the previous generation")
        pid = spawn(tool, holders, tmp_path, "ok", local_size=2)
        t0 = time.monotonic()
        write_record(tmp_path)
        if time.monotonic() - t0 < 0.3:
            break
    time.sleep(1.5)
    assert proc_state(pid) is not None, "left although its record came"
    add_member(tmp_path, me_line() + me_line())
    assert gone_within(pid)


@pytest.mark.parametrize("message", ["cannot unshare the user namespace: Operation not "
                                     "permitted", "é\ttab"])
def test_holder_setup_failure_is_returned(tool, tmp_path, holders, message):
    assert spawn(tool, holders, tmp_path, "fail:" + message) == message
    assert not (tmp_path / "setup-ran").exists()


def test_holder_setup_failure_without_message(tool, tmp_path, holders):
    assert spawn(tool, holders, tmp_path, "fail:") == "the namespace setup failed"


def test_holder_setup_that_hangs_is_bounded_by_the_limit(tool, tmp_path, holders):
    assert spawn(tool, holders, tmp_path, "hang", limit=1) == \
        "the namespace setup of this job step did not finish within 1 s"


@pytest.mark.parametrize("how", ["replaced", "removed"])
def test_holder_leaves_when_its_record_is_replaced(tool, tmp_path, holders, how):
    pid = spawn(tool, holders, tmp_path, "publish", local_size=5)
    add_member(tmp_path, me_line())
    time.sleep(0.3)
    assert proc_state(pid) is not None
    if how == "replaced":
        write_record(tmp_path, data=b"a new generation")
    else:
        os.unlink(tmp_path / "r.ns")
    assert gone_within(pid)


@pytest.mark.parametrize("old", [False, True])
def test_holder_leaves_when_no_record_comes(tool, tmp_path, holders, old):
    """Never published: no record, or the previous generation's stays."""
    if old:
        write_record(tmp_path, data=b"the previous generation")
    pid = spawn(tool, holders, tmp_path, "ok", local_size=5)
    add_member(tmp_path, me_line())
    assert gone_within(pid)


def test_holder_with_unknown_local_size_leaves_when_idle(tool, tmp_path, holders):
    pid = spawn(tool, holders, tmp_path, "publish", local_size=0)
    add_member(tmp_path, me_line())
    assert gone_within(pid)


def test_holder_leaves_after_the_limit(tool, tmp_path, holders):
    pid = spawn(tool, holders, tmp_path, "publish", local_size=5, limit=0.5)
    add_member(tmp_path, me_line())
    assert gone_within(pid)


def test_holder_stays_while_a_member_lives_and_leaves_when_none_does(tool, tmp_path, holders):
    pid = spawn(tool, holders, tmp_path, "publish", local_size=5)
    add_member(tmp_path, me_line())
    time.sleep(3.0)  # past HOLDER_IDLE_UNKNOWN: a live member keeps it (60 s when known)
    assert proc_state(pid) is not None
    dead = subprocess.Popen(["sleep", "60"])
    dead_line = "%d %s\n" % (dead.pid, sharedns.start_time(dead.pid))
    dead.kill()
    dead.wait()
    pid = spawn(tool, holders, tmp_path, "publish", local_size=5, members="r.g2.members")
    # and pid 1 with a start time it does not have
    add_member(tmp_path, dead_line + "1 99999999999999\n", name="r.g2.members")
    assert gone_within(pid)
