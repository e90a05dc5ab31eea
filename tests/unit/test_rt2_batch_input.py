"""Red-team regressions (issue 10, second pass): what a user puts in the job's request
(--container-image through SPANK, -l container_image) reaches the root hooks as text; no
byte of it may drain a node or write a line of its own into root's records."""

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from uctr_batch.batch import readiness, slurm

TEST_USER = "uctrtest"
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # everything str.splitlines() splits on


@pytest.fixture
def hook(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the prolog switches users: needs root")
    try:
        user = pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.skip(f"needs the user {TEST_USER}")
    root = Path(tempfile.mkdtemp(prefix="uctr-rt2-"))
    root.chmod(0o755)
    (root / "users").mkdir()
    (root / "users").chmod(0o1777)
    policy = root / "policy.yaml"
    policy.write_text("version: 1\ndefaults:\n  storage:\n"
                      f"    local_dir: {root}/users/local-${{UID}}\n")
    policy.chmod(0o644)

    def env(image, job_id="300"):
        return {"SLURM_JOB_ID": job_id, "SLURM_JOB_UID": str(user.pw_uid),
                "SLURM_JOB_GID": str(user.pw_gid), "SLURM_JOB_USER": user.pw_name,
                "SLURMD_NODENAME": "node9", "UCTR_POLICY": str(policy),
                "UCTR_RUN_DIR": str(root / "run"), "PATH": "/usr/bin:/bin",
                "SPANK_UCTR_IMAGE": image}

    yield env, user
    shutil.rmtree(root, ignore_errors=True)


# os.environ holds bytes that are not UTF-8 as lone surrogates (PEP 383): this is what
# `--container-image=$'\xff\xfe'` (or a job submitted through the API) looks like to the prolog
@pytest.mark.parametrize("image", ["\udcff\udcfe", "busybox\udce9:1", "\ud800x"])
def test_an_image_name_that_is_not_utf8_fails_the_job_not_the_node(hook, image):
    env, user = hook
    assert slurm.prolog_main(env(image)) == 0  # was 1 (drain): "the run dir: 'utf-8' codec..."
    record = readiness.read_readiness("300", user.pw_uid, env(image))
    assert record["status"] == "error" and "invalid" in record["message"]
    assert slurm.epilog_main(env(image)) == 0
    assert not readiness.record_path("300", env(image)).exists()


@pytest.mark.parametrize("brk", list(LINE_BREAKS), ids=[f"U+{ord(c):04X}" for c in LINE_BREAKS])
def test_an_image_name_cannot_add_lines_to_the_readiness_record(hook, brk):
    env, user = hook
    image = f"img{brk}status=ok{brk}uid=0{brk}rootfs=/etc{brk}bundle=/etc"
    assert slurm.prolog_main(env(image)) == 0
    text = readiness.record_path("300", env(image)).read_bytes().decode()
    record = readiness.parse_record(text)
    assert record["status"] == "error" and record["uid"] == str(user.pw_uid)
    assert "rootfs" not in record and "bundle" not in record
    assert sorted(record) == ["hint", "image", "job", "message", "status", "uid", "version"]
    slurm.epilog_main(env(image))


@pytest.mark.parametrize("brk", list(LINE_BREAKS), ids=[f"U+{ord(c):04X}" for c in LINE_BREAKS])
def test_records_split_on_newline_only(brk):
    fields = {"status": "error", "message": f"a{brk}status=ok"}
    assert readiness.parse_record(readiness.format_record(fields)) == {
        "status": "error", "message": readiness.parse_record(
            readiness.format_record(fields))["message"]}
    assert readiness.parse_record(readiness.format_record(fields))["status"] == "error"
    assert readiness.encode_record({"image": "\udcff\ud800"}) == b"image=\\udcff\\ud800\n"


@pytest.fixture
def shared_fs(hook):
    """A small tmpfs like /tmp or /run (/run/lock is world-writable on it) that holds the
    run dir, filled up by a user."""
    import subprocess

    env, user = hook
    mount = Path(env("x")["UCTR_RUN_DIR"]).parent / "shared"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=1777", "tmpfs", str(mount)],
                   check=True)
    try:
        (mount / "uctr-run").mkdir(mode=0o755)
        filler = mount / "fill"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        os.chown(filler, user.pw_uid, user.pw_gid)
        yield mount / "uctr-run"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_user_who_fills_the_run_dirs_file_system_drains_nothing(hook, shared_fs, capfd):
    env, user = hook
    job = dict(env("bad image"), UCTR_RUN_DIR=str(shared_fs))
    assert slurm.prolog_main(job) == 0  # was 1: "the run dir: No space left on device"
    assert "no space left on" in capfd.readouterr().err
    assert os.listdir(shared_fs / "readiness") == []  # nothing half-written
    assert slurm.epilog_main(job) == 0
