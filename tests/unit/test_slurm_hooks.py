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
from uctr_batch.image.rootfs import MARKER

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


def test_a_policy_changed_after_a_warm_prolog_applies_to_the_next_job(site):
    """The prolog keeps the policy bytes it validated (run dir); the next job's prolog
    still sees the site's edit at once."""
    root, user = site
    env = hook_env(root, user, SPANK_UCTR_IMAGE=f"oci:{root / 'busybox'}:1", SPANK_UCTR_MODE="R1")
    assert slurm.prolog(env) == 0
    assert readiness.read_readiness("100", user.pw_uid, env)["status"] == "ok"
    assert (root / "run" / "policy" / "validated.marshal").is_file()
    slurm.epilog(env)
    write_policy(root, user_modes=("N1",))
    env = dict(env, SLURM_JOB_ID="101")
    assert slurm.prolog(env) == 0
    record = readiness.read_readiness("101", user.pw_uid, env)
    assert record["status"] == "error"
    assert record["message"].startswith("mode R1 is not allowed on node node9")


def test_a_warm_node_whose_rootfs_went_away_stages_it_again(site):
    """Warm node, but its bundle was removed (or left without its completion marker): the
    next job's prolog unpacks again instead of pointing the job at nothing."""
    root, user = site
    env = hook_env(root, user, SPANK_UCTR_IMAGE=f"oci:{root / 'busybox'}:1")
    assert slurm.prolog(env) == 0
    rootfs = Path(readiness.read_readiness("100", user.pw_uid, env)["rootfs"])
    slurm.epilog(env)
    for job_id, damage in (("101", lambda: shutil.rmtree(rootfs.parent)),
                           ("102", lambda: (rootfs.parent / MARKER).unlink())):
        damage()
        env = dict(env, SLURM_JOB_ID=job_id)
        assert slurm.prolog(env) == 0
        record = readiness.read_readiness(job_id, user.pw_uid, env)
        assert record["status"] == "ok" and Path(record["rootfs"]) == rootfs
        assert (rootfs / "bin" / "busybox").is_file()
        slurm.epilog(env)


def test_missing_image_is_a_user_error(site):
    root, user = site
    env = hook_env(root, user, SPANK_UCTR_IMAGE=f"oci:{root / 'nothing'}:1")
    assert slurm.prolog(env) == 0
    assert readiness.read_readiness("100", user.pw_uid, env)["status"] == "error"


@pytest.mark.parametrize("mode", [0o666, 0o664])
def test_untrusted_policy_fails_the_job_and_never_drains(site, mode):
    """A careless site's group-writable policy is refused, but a drain for it would take the
    node from every job, one container job at a time (issue 10 red team): the job fails."""
    root, user = site
    env = hook_env(root, user, SPANK_UCTR_IMAGE=f"oci:{root / 'busybox'}:1")
    Path(env["UCTR_POLICY"]).chmod(mode)
    assert slurm.prolog_main(env) == 0
    record = readiness.read_readiness("100", user.pw_uid, env)
    assert record["status"] == "error"
    assert "node9 cannot run container jobs" in record["message"]
    assert "writable by group" in record["message"] and "uctr policy check" in record["hint"]
    assert slurm.epilog_main(env) == 0
    assert readiness.read_readiness("100", user.pw_uid, env) is None


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


# -- nothing a user does drains a node; nothing of a job stays (issue 10, classes 11, 12) --
def test_a_local_dir_another_user_planted_does_not_drain_and_the_job_runs(site):
    root, user = site
    planted = root / "users" / f"local-{user.pw_uid}"
    planted.mkdir()
    os.chown(planted, 65534, 65534)  # user A (nobody) took B's name first
    env = hook_env(root, user, SPANK_UCTR_IMAGE=f"oci:{root / 'busybox'}:1")

    assert slurm.prolog_main(env) == 0
    record = readiness.read_readiness("100", user.pw_uid, env)
    assert record["status"] == "ok", record
    fallback = Path(record["bundle"]).parent.parent
    assert fallback.name == str(user.pw_uid) and fallback.parent.parent == root / "users"
    assert fallback.stat().st_uid == user.pw_uid and planted.stat().st_uid == 65534
    assert list(planted.iterdir()) == []
    digest_hex = record["manifest_digest"].split(":")[1]
    assert [p.name for p in (fallback / "inuse" / digest_hex).iterdir()] == ["job-100"]

    assert slurm.epilog_main(env) == 0
    assert list((fallback / "inuse" / digest_hex).iterdir()) == []


def test_a_bug_while_staging_fails_the_job_not_the_node(site, monkeypatch):
    from uctr_batch.batch import common

    root, user = site

    def broken(*args, **kwargs):
        raise RuntimeError("a bug triggered by this job")

    monkeypatch.setattr(common, "stage_as_user", broken)
    env = hook_env(root, user, SPANK_UCTR_IMAGE=f"oci:{root / 'busybox'}:1")
    assert slurm.prolog_main(env) == 0


def test_epilog_drops_the_reference_of_a_prolog_cut_short(site):
    root, user = site
    env = hook_env(root, user, SPANK_UCTR_IMAGE=f"oci:{root / 'busybox'}:1")
    assert slurm.prolog(env) == 0
    record = readiness.read_readiness("100", user.pw_uid, env)
    inuse = Path(record["bundle"]).parent.parent / "inuse" / record["manifest_digest"][7:]
    readiness.remove_readiness("100", env)  # scancel'ed before the prolog wrote its record
    assert slurm.epilog_main(env) == 0
    assert list(inuse.iterdir()) == []


def test_prolog_sweeps_records_of_jobs_the_controller_no_longer_knows(site, tmp_path,
                                                                      monkeypatch):
    import time

    root, user = site
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\ncase \"$4\" in\n"
                        "  7) echo 'JobId=7 JobState=RUNNING' ;;\n"
                        "  *) echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1;;\n"
                        "esac\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    env = hook_env(root, user, SPANK_UCTR_IMAGE=f"oci:{root / 'busybox'}:1")
    old = time.time() - 7200
    for job_id in ("6", "7", "8"):
        path = readiness.write_readiness(job_id, user.pw_uid, {"status": "error"}, env)
        if job_id != "8":  # 8 is fresh: maybe starting right now
            os.utime(path, (old, old))

    assert slurm.prolog(env) == 0

    left = sorted(p.name for p in (root / "run" / "readiness").iterdir())
    assert left == ["100", "7", "8"]


def test_a_run_dir_a_user_planted_fails_the_job_not_the_node(site):
    root, user = site
    env = hook_env(root, user, SPANK_UCTR_IMAGE=f"oci:{root / 'busybox'}:1")
    (root / "run").mkdir()
    os.chown(root / "run", 65534, 65534)  # a site that put UCTR_RUN_DIR in a shared place
    assert slurm.prolog_main(env) == 0
    assert not (root / "run" / "readiness").exists()


# -- the warm path's imports ---------------------------------------------------------------
# Every allocated node runs the prolog (and later the epilog) for every container job, on
# the job's start path; on a warm node (image staged, policy validated) Python's start and
# its imports are nearly all they cost. These stay out of both hooks and of their child
# that works as the job user: each costs milliseconds, and none is needed there.
WARM_NEVER = ("yaml", "jsonschema", "hostlist", "requests", "urllib3", "zstandard", "isal",
              "typing", "dataclasses", "inspect", "hashlib", "socket", "uuid", "random",
              "platform", "shutil", "concurrent.futures", "tempfile", "subprocess", "tarfile",
              "uctr_batch.image.registry", "uctr_batch.image.flatten", "uctr_batch.image.archive")

RECORDER = """
import gc, os, sys
record, hook = sys.argv[1], sys.argv[2]
parent, real_exit = os.getpid(), os._exit

def write(path):
    with open(path, "w") as f:
        f.write("\\n".join(sorted(sys.modules) + ["gc-enabled=%s" % gc.isenabled()]))

def _exit(code):  # the job user's child ends here (batch.privdrop)
    if os.getpid() != parent:
        write(record + ".child")
    real_exit(code)

os._exit = _exit
sys.argv = [hook]
try:
    with open(hook) as f:  # as `python3 HOOK` runs it (runpy would import typing itself)
        exec(compile(f.read(), hook, "exec"), {"__name__": "__main__", "__file__": hook})
finally:
    write(record + ".parent")
"""


def _run_hook(kind, env, record):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    for side in ("parent", "child"):
        path = Path(f"{record}.{side}")
        path.write_text("")
        path.chmod(0o666)  # the child runs as the job user
    hook = repo / "hooks" / "slurm" / f"{kind}.py"
    done = subprocess.run([sys.executable, "-c", RECORDER, str(record), str(hook)],
                          env=dict(env, PYTHONPATH=str(repo)), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return {side: set(Path(f"{record}.{side}").read_text().split()) for side in ("parent", "child")}


def test_warm_prolog_and_epilog_import_only_what_they_use(site, pushed):
    root, user = site
    image = pushed["busybox"]
    env = hook_env(root, user, SPANK_UCTR_IMAGE=image)
    with open(env["UCTR_POLICY"], "a") as f:  # under defaults:
        f.write(f"  registries:\n    insecure: [\"{image.split('/')[0]}\"]\n")
    assert slurm.prolog(env) == 0  # cold: pulls, unpacks, validates the policy
    assert readiness.read_readiness("100", user.pw_uid, env)["status"] == "ok"
    slurm.epilog(env)

    env = dict(env, SLURM_JOB_ID="101")
    prolog = _run_hook("prolog", env, root / "users" / "prolog")
    record = readiness.read_readiness("101", user.pw_uid, env)
    assert record["status"] == "ok", record
    epilog = _run_hook("epilog", env, root / "users" / "epilog")
    assert readiness.read_readiness("101", user.pw_uid, env) is None

    for name, modules in [("prolog", prolog["parent"]), ("prolog's child", prolog["child"]),
                          ("epilog", epilog["parent"]), ("epilog's child", epilog["child"])]:
        assert "uctr_batch.batch.stage" in modules, name  # it did reach the work
        assert not modules & set(WARM_NEVER), (name, sorted(modules & set(WARM_NEVER)))
    assert "gc-enabled=False" in prolog["parent"]  # paused for the start-up (hooks/slurm)
    assert "gc-enabled=True" in prolog["child"]  # a cold child may pull for minutes
