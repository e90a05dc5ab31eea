"""The prolog/epilog logic without a cluster: a Slurm-like environment, a real image from an
OCI layout, the job user for real (root needed: the hooks switch users)."""

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.harness.images import build_busybox
from uctr_batch.batch import readiness, slurm

TEST_USER = "uctrtest"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the hooks switch users: needs root")


@pytest.fixture
def site(tmp_path):
    """A world-readable scratch tree (pytest's is 0700), a trusted policy, a busybox layout."""
    try:
        user = pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.skip(f"needs the user {TEST_USER}")
    root = Path(tempfile.mkdtemp(prefix="uctr-hooks-"))
    root.chmod(0o755)
    (root / "users").mkdir(mode=0o1777)
    (root / "users").chmod(0o1777)
    build_busybox(root / "busybox")
    for dirpath, dirs, files in os.walk(root / "busybox"):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)
    yield root, user
    shutil.rmtree(root, ignore_errors=True)


def write_policy(root: Path, user_modes=("N1", "R1")) -> Path:
    policy = root / "policy.yaml"
    policy.write_text("\n".join([
        "version: 1", "defaults:", f"  user_modes: [{', '.join(user_modes)}]", "  storage:",
        f"    cache_dir: {root}/users/cache-${{USER}}", f"    local_dir: {root}/users/local-${{UID}}",
        "    local_quota: 1G", ""]))
    policy.chmod(0o644)
    return policy


def hook_env(root, user, job_id="100", **extra):
    env = {"SLURM_JOB_ID": job_id, "SLURM_JOB_UID": str(user.pw_uid),
           "SLURM_JOB_GID": str(user.pw_gid), "SLURM_JOB_USER": user.pw_name,
           "SLURMD_NODENAME": "node9", "UCTR_POLICY": str(write_policy(root)),
           "UCTR_RUN_DIR": str(root / "run"), "PATH": "/usr/bin:/bin"}
    env.update(extra)
    return env


def test_prolog_stages_as_the_job_user_and_epilog_cleans_up(site):
    root, user = site
    image = f"oci:{root / 'busybox'}:1"
    env = hook_env(root, user, SPANK_UCTR_IMAGE=image)
    assert slurm.prolog(env) == 0

    record = readiness.read_readiness("100", user.pw_uid, env)
    assert record["status"] == "ok" and record["image"] == image
    rootfs = Path(record["rootfs"])
    assert rootfs.is_relative_to(root / "users" / f"local-{user.pw_uid}")
    assert (rootfs / "bin" / "busybox").is_file()
    assert rootfs.stat().st_uid == user.pw_uid  # unpacked by the user, not by root
    assert (root / "users" / f"cache-{TEST_USER}").stat().st_uid == user.pw_uid
    digest_hex = record["manifest_digest"].split(":")[1]
    inuse = root / "users" / f"local-{user.pw_uid}" / "inuse" / digest_hex
    assert [p.name for p in inuse.iterdir()] == ["job-100"]

    assert slurm.epilog(env) is None
    assert readiness.read_readiness("100", user.pw_uid, env) is None
    assert list(inuse.iterdir()) == []
    assert rootfs.is_dir()  # kept for the next job


def test_mode_outside_the_policy_is_recorded_not_fatal(site):
    root, user = site
    env = hook_env(root, user, SPANK_UCTR_IMAGE=f"oci:{root / 'busybox'}:1", SPANK_UCTR_MODE="F1")
    assert slurm.prolog(env) == 0
    record = readiness.read_readiness("100", user.pw_uid, env)
    assert record["status"] == "error"
    assert record["message"].startswith("mode F1 is not allowed on node node9")
    assert not (root / "users" / f"local-{user.pw_uid}").exists()  # nothing was staged


def test_missing_image_is_a_user_error(site):
    root, user = site
    env = hook_env(root, user, SPANK_UCTR_IMAGE=f"oci:{root / 'nothing'}:1")
    assert slurm.prolog(env) == 0
    assert readiness.read_readiness("100", user.pw_uid, env)["status"] == "error"


def test_untrusted_policy_is_a_node_fault(site):
    root, user = site
    env = hook_env(root, user, SPANK_UCTR_IMAGE=f"oci:{root / 'busybox'}:1")
    Path(env["UCTR_POLICY"]).chmod(0o666)
    assert slurm.prolog_main(env) == slurm.EXIT_NODE_FAULT


def test_job_without_container_does_nothing(site, tmp_path, monkeypatch):
    root, user = site
    scontrol = tmp_path / "scontrol"  # the job record: no Container= field
    scontrol.write_text("#!/bin/sh\necho 'JobId=100 JobName=x'\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    env = hook_env(root, user)
    assert slurm.prolog(env) == 0
    assert not (root / "run").exists()


def test_unreadable_job_record_does_not_drain(site, tmp_path, monkeypatch):
    root, user = site
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\necho 'Unable to contact slurm controller' >&2\nexit 1\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert slurm.prolog_main(hook_env(root, user)) == 0


def test_epilog_never_fails(site):
    root, user = site
    assert slurm.epilog_main(hook_env(root, user, job_id="404")) == 0
    assert slurm.epilog_main({}) == 0  # not even outside Slurm
