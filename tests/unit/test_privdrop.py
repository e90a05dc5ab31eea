"""privdrop.run_as: the prolog's way of touching user data only as the job user.

These tests switch users for real, so they need root (the CI runs the suite as root).
"""

import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from uctr_batch import errors
from uctr_batch.batch import privdrop

TEST_USER = "uctrtest"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture(scope="module")
def who():
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.skip(f"no user {TEST_USER}")
    return privdrop.Identity.of(entry.pw_uid)


def identity_now():
    return {"resuid": list(os.getresuid()), "resgid": list(os.getresgid()),
            "groups": sorted(os.getgroups()), "home": os.environ.get("HOME"),
            "user": os.environ.get("USER"), "cwd": os.getcwd(),
            "secret": os.environ.get("ROOT_SECRET")}


def test_child_runs_as_the_user_with_only_its_groups_and_a_clean_env(who, monkeypatch):
    monkeypatch.setenv("ROOT_SECRET", "s3cret")
    got = privdrop.run_as(who, identity_now, env={"EXTRA": "1"})
    expected_groups = sorted(set(os.getgrouplist(who.name, who.gid)))
    assert got["resuid"] == [who.uid] * 3
    assert got["resgid"] == [who.gid] * 3
    assert got["groups"] == expected_groups
    assert got["home"] == who.home and got["user"] == TEST_USER
    assert got["cwd"] == who.home
    assert got["secret"] is None
    assert os.geteuid() == 0  # the parent keeps its privileges


def try_to_become_root():
    for attempt in (lambda: os.setuid(0), lambda: os.seteuid(0), lambda: os.setresuid(0, 0, 0)):
        try:
            attempt()
            return "regained"
        except PermissionError:
            pass
    return "denied"


def test_root_cannot_be_regained(who):
    assert privdrop.run_as(who, try_to_become_root) == "denied"


def read_file(path):
    with open(path) as f:
        return f.read()


def test_root_only_files_are_out_of_reach(who, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    tmp_path.chmod(0o755)
    with pytest.raises(errors.InternalError, match="PermissionError"):
        privdrop.run_as(who, read_file, str(secret))


def raise_auth_error():
    raise errors.AuthError("cannot pull x: unauthorized", "run uctr login")


def test_uctr_errors_come_back_with_class_message_and_hint(who):
    with pytest.raises(errors.AuthError) as info:
        privdrop.run_as(who, raise_auth_error)
    assert info.value.message == "cannot pull x: unauthorized"
    assert info.value.hint == "run uctr login"


def not_json():
    return object()


def test_a_result_that_is_not_json_is_an_internal_error(who):
    with pytest.raises(errors.InternalError, match="JSON"):
        privdrop.run_as(who, not_json)


def sleep_then_report(pid_file):
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
    return "woke up"


@pytest.fixture
def shared_dir():
    """A directory the test user can write (pytest's tmp_path root is 0700 root)."""
    path = tempfile.mkdtemp(prefix="uctr-privdrop-")
    os.chmod(path, 0o777)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_timeout_kills_the_child(who, shared_dir):
    pid_file = shared_dir / "pid"
    started = time.monotonic()
    with pytest.raises(errors.UctrError, match="gave up after"):
        privdrop.run_as(who, sleep_then_report, str(pid_file), timeout=1.0)
    assert time.monotonic() - started < 10
    pid = int(pid_file.read_text())
    assert not os.path.exists(f"/proc/{pid}")


def test_unknown_uid_needs_a_gid():
    free_uid = 4_000_000
    with pytest.raises(errors.ConfigError):
        privdrop.Identity.of(free_uid)
    who = privdrop.Identity.of(free_uid, 4_000_000)
    assert who.name is None and who.home == "/"
    got = privdrop.run_as(who, identity_now)
    assert got["resuid"] == [free_uid] * 3 and got["groups"] == [4_000_000]
