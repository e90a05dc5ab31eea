"""inroot (paths resolved inside a rootfs, made safe before any runtime sees them) and
sigstate (the launcher's signal dispositions and mask, restored before exec)."""

import os
import signal

import pytest

from uctr_batch.errors import UctrError
from uctr_batch.modes import inroot, sigstate


@pytest.fixture
def rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "bin" / "sh").write_text("")
    (tmp_path / "host").mkdir()
    return root


def host_tree(tmp_path):
    return sorted(os.listdir(tmp_path / "host"))


@pytest.mark.parametrize("kind", ["absolute", "relative", "dangling", "file", "image-file",
                                  "loop", "chain"])
def test_system_dirs_replace_anything_but_a_directory(rootfs, tmp_path, kind):
    host = tmp_path / "host"
    target = {"absolute": str(host), "relative": "../../../../../../../.." + str(host),
              "dangling": str(host / "missing"), "image-file": "/bin/sh", "loop": "/dev",
              "chain": "/c1"}.get(kind)
    for name in ("dev", "proc", "sys"):
        if kind == "file":
            (rootfs / name).write_text("x")
        else:
            (rootfs / name).symlink_to(target)
    if kind == "chain":
        (rootfs / "c1").symlink_to(str(host))
    inroot.system_dirs(str(rootfs))
    for name in ("dev", "proc", "sys"):
        assert (rootfs / name).is_dir() and not (rootfs / name).is_symlink()
    assert host_tree(tmp_path) == []
    inroot.system_dirs(str(rootfs))  # idempotent


def test_system_dirs_refuse_what_they_cannot_replace(rootfs, tmp_path):
    (rootfs / "dev").symlink_to(str(tmp_path / "host"))
    os.chmod(rootfs, 0o555)
    try:
        if os.access(rootfs, os.W_OK):
            pytest.skip("root ignores directory permissions")
        with pytest.raises(UctrError) as e:
            inroot.system_dirs(str(rootfs))
        assert "/dev" in e.value.message and e.value.hint
    finally:
        os.chmod(rootfs, 0o755)


@pytest.mark.parametrize("link, path, inside", [
    ("/x", "/etc/passwd", "x/passwd"),
    ("../../../../../../x", "/etc/passwd", "x/passwd"),
    ("x", "/etc/passwd", "etc/x/passwd"),
])
def test_mount_points_are_made_inside(rootfs, tmp_path, link, path, inside):
    os.rmdir(rootfs / "etc")
    (rootfs / "etc").symlink_to(link.replace("x", str(tmp_path / "host")) if link == "/x"
                                else link.replace("x", str(tmp_path / "host").lstrip("/"))
                                if link.startswith("..") else link)
    host = inroot.ensure_mountpoint(str(rootfs), path, False)
    assert host.startswith(str(rootfs) + "/") and os.path.isfile(host)
    assert os.path.realpath(host) == host
    assert host_tree(tmp_path) == []


def test_too_many_links_and_loops_are_refused_with_a_hint(rootfs):
    (rootfs / "a").symlink_to("/a")
    with pytest.raises(UctrError) as e:
        inroot.ensure_mountpoint(str(rootfs), "/a/b", True)
    assert "too many levels" in e.value.message and e.value.hint


def test_a_file_where_a_directory_is_needed_is_refused(rootfs):
    (rootfs / "data").symlink_to("/bin/sh")
    for call in (inroot.ensure_mountpoint, inroot.resolved):
        with pytest.raises(UctrError) as e:
            call(str(rootfs), "/data", True)
        assert "/bin/sh" in e.value.message and e.value.hint


def test_check_inside_refuses_a_path_that_leaves(rootfs, tmp_path):
    (rootfs / "out").symlink_to(str(tmp_path / "host"))  # as if swapped in after resolve()
    with pytest.raises(UctrError):
        inroot.check_inside(str(rootfs), str(rootfs / "out"), "/out")


def test_resolved_creates_nothing(rootfs, tmp_path):
    (rootfs / "mnt").symlink_to(str(tmp_path / "host"))
    assert inroot.resolved(str(rootfs), "/mnt/data", True) == str(tmp_path / "host") + "/data"
    assert not (rootfs / str(tmp_path / "host").lstrip("/")).exists()


# --- sigstate -------------------------------------------------------------------------------

def test_parse_trusts_only_its_own_pid_and_well_formed_values():
    assert sigstate.parse("42:1000:800", 42) == (0x1000, 0x800)
    for bad in ("", "41:1000:800", "42:1000", "42:zz:0", "42:1000:800:1", "x:0:0",
                "42:" + "f" * 17 + ":0"):
        assert sigstate.parse(bad, 42) is None, bad


def child_state(env_value=None, ignore=(), block=()):
    """Fork; set up ignore/block like a launcher's parent, restore(), report /proc's masks."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            for s in ignore:
                signal.signal(s, signal.SIG_IGN)
            signal.signal(signal.SIGUSR1, lambda *a: None)  # a handler of "ours"
            signal.pthread_sigmask(signal.SIG_BLOCK, block)
            os.environ.pop(sigstate.ENV, None)
            if env_value is not None:
                os.environ[sigstate.ENV] = env_value.replace("PID", str(os.getpid()))
            exec_env = {sigstate.ENV: "x", "KEEP": "1"}
            sigstate.restore(exec_env)
            assert sigstate.ENV not in exec_env and sigstate.ENV not in os.environ
            with open("/proc/self/status") as f:
                lines = [ln for ln in f if ln.startswith(("SigIgn", "SigBlk"))]
            os.write(w, "".join(lines).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    found = dict(line.split(":\t") for line in text.splitlines())
    return int(found["SigIgn"], 16), int(found["SigBlk"], 16)


def bit(*sigs):
    return sum(1 << (s - 1) for s in sigs)


def test_restore_applies_the_captured_state_exactly():
    ign, blk = bit(signal.SIGUSR1, signal.SIGHUP), bit(signal.SIGUSR2, signal.SIGTERM)
    state = child_state("PID:%x:%x" % (ign, blk), ignore=(signal.SIGQUIT,), block=(signal.SIGINT,))
    assert state == (ign, blk)


def test_without_a_capture_only_what_python_changed_is_undone():
    # Python itself ignores SIGPIPE and SIGXFSZ; the mask and other ignores are the process's
    state = child_state(None, ignore=(signal.SIGHUP,), block=(signal.SIGUSR2,))
    assert state == (bit(signal.SIGHUP), bit(signal.SIGUSR2))


def test_a_foreign_capture_counts_as_none():
    # compared with no capture, not with (0, 0): what the test process inherited stays (under
    # nohup SIGHUP is ignored), and a capture honoured would ignore SIGUSR1
    state = child_state("1:%x:0" % bit(signal.SIGUSR1))
    assert state == child_state(None)
    assert not state[0] & bit(signal.SIGUSR1)


def test_undo_puts_back_this_process_state():
    saved = sigstate.snapshot()
    before = signal.getsignal(signal.SIGPIPE), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    os.environ[sigstate.ENV] = "%d:0:%x" % (os.getpid(), bit(signal.SIGUSR2))
    sigstate.restore({})
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL
    sigstate.undo(saved)
    after = signal.getsignal(signal.SIGPIPE), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert after == before
