"""Readiness records: the prolog -> uctr-exec / SPANK task_init hand-over (no root needed)."""

import os
import stat

import pytest

from uctr_batch.batch import readiness


@pytest.fixture
def env(tmp_path):
    return {"UCTR_RUN_DIR": str(tmp_path / "run")}


def test_ok_record_round_trip(env):
    uid = os.getuid()
    fields = {"status": "ok", "image": "debian:12", "rootfs": "/tmp/uctr-1/b/rootfs",
              "manifest_digest": "sha256:" + "a" * 64}
    path = readiness.write_readiness("42", uid, fields, env)
    record = readiness.read_readiness("42", uid, env)
    assert record == dict(fields, version=readiness.VERSION, job="42", uid=str(uid))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path == readiness.record_path("42", env)


def test_error_record_keeps_one_value_per_line(env):
    """task_init (C) reads message= and hint= line by line: newlines must not split them."""
    uid = os.getuid()
    readiness.write_readiness("7", uid, {"status": "error", "image": "x",
                                         "message": "line one\nline two", "hint": "fix\r\nit"}, env)
    text = readiness.record_path("7", env).read_text()
    assert "message=line one line two\n" in text
    assert readiness.read_readiness("7", uid, env)["hint"] == "fix  it"


def test_record_of_another_user_or_job_is_ignored(env):
    uid = os.getuid()
    readiness.write_readiness("5", uid, {"status": "ok"}, env)
    assert readiness.read_readiness("5", uid + 1, env) is None
    path = readiness.record_path("5", env)
    path.write_text(path.read_text().replace("job=5", "job=6"))
    assert readiness.read_readiness("5", uid, env) is None


def test_missing_record_and_bad_job_ids(env):
    assert readiness.read_readiness("999", os.getuid(), env) is None
    assert readiness.remove_readiness("999", env) is False
    for bad in ("", "../x", ".hidden", "a/b"):
        assert readiness.read_readiness(bad, os.getuid(), env) is None
        with pytest.raises(ValueError):
            readiness.record_path(bad, env)


def test_rewrite_and_remove(env):
    uid = os.getuid()
    readiness.write_readiness("8", uid, {"status": "error", "message": "m"}, env)
    readiness.write_readiness("8", uid, {"status": "ok", "rootfs": "/r"}, env)
    record = readiness.read_readiness("8", uid, env)
    assert record["status"] == "ok" and "message" not in record
    assert readiness.remove_readiness("8", env) is True
    assert readiness.read_readiness("8", uid, env) is None
    assert os.listdir(readiness.record_path("8", env).parent) == []  # no temp files left


def test_refuses_a_readiness_dir_others_can_write(env):
    directory = readiness.record_path("1", env).parent
    directory.mkdir(parents=True)
    directory.chmod(0o777)
    with pytest.raises(PermissionError):
        readiness.write_readiness("1", os.getuid(), {"status": "ok"}, env)


def test_default_run_dir_is_node_local_run():
    assert str(readiness.run_dir({})) == "/run/uctr"


def test_reader_imports_only_the_standard_library():
    """uctr-exec reads readiness on every rank: no yaml/requests/jsonschema on that path."""
    import subprocess
    import sys

    code = ("import sys; import uctr_batch.batch.readiness; "
            "bad = [m for m in ('yaml', 'requests', 'jsonschema') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == ""
