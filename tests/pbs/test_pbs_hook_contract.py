"""Contract tests of hooks/pbs/uctr_hook.py against a double of the `pbs` hook module.

No PBS server runs here, so every event is run the way pbs_mom runs a hook: a fresh
interpreter per event (tests/pbs/pbs_double.py), as root, in its own session, killed with
its whole process group when it ends or overruns its alarm. Only the `pbs` module is a
double: the hook really runs uctr, which really pulls from the harness registry, unpacks as
the job user and writes the records uctr-exec reads.
"""

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pbs.pbs_double import ND_FREE, ND_OFFLINE, REPO, HookRunner

pytestmark = [pytest.mark.pbs, pytest.mark.contract]

HOOK_FILE = REPO / "hooks" / "pbs" / "uctr_hook.py"
GUARD_FILE = REPO / "hooks" / "pbs" / "uctr_guard.py"
UCTR_EXEC = "/opt/uctr/bin/uctr-exec"  # only ever written into argv, never run here
SERVER = "pbs-server"


def _needs_root_and_test_user(test_user):
    if os.geteuid() != 0:
        pytest.skip("the hook runs as root under pbs_mom; these tests need root")
    try:
        pwd.getpwnam(test_user)
    except KeyError:
        pytest.skip(f"needs the user {test_user} (run scripts/install.sh)")


class Site:
    """One PBS "site" per test: policy, hook config, run dir, the job user's storage."""

    def __init__(self, tmp_path: Path, dirs, user: str, registries):
        self.tmp, self.dirs, self.user = tmp_path, dirs, user
        self.uid = pwd.getpwnam(user).pw_uid
        self.registries = list(registries)
        self.run_dir = tmp_path / "run"
        self.policy = tmp_path / "etc" / "policy.yaml"
        self.config_file = tmp_path / "hook" / "uctr_hook.json"
        self.config_file.parent.mkdir()
        self.runner = HookRunner(HOOK_FILE, self.config_file)
        self._jobs = 0
        self.write_policy()
        self.write_config()

    def write_policy(self, allow=(), local_dir=None, user_modes=("N1", "R1", "P1"),
                     stage_timeout=120, engines=None):
        lines = ["version: 1", "defaults:",
                 f"  user_modes: [{', '.join(user_modes)}]",
                 "  registries:",
                 f"    insecure: [{', '.join(json.dumps(r) for r in self.registries)}]"]
        if engines:  # PBS Professional's container_engine=NAME -> mode
            lines.insert(2, "  container_engines: " + json.dumps(engines))
        if allow:
            lines.append(f"    allow: [{', '.join(json.dumps(a) for a in allow)}]")
        lines += ["  storage:", f"    cache_dir: {self.dirs.cache}",
                  f"    local_dir: {local_dir or self.dirs.local}",
                  f"    stage_timeout: {stage_timeout}", ""]
        self.policy.parent.mkdir(exist_ok=True)
        self.policy.write_text("\n".join(lines))
        self.policy.chmod(0o644)

    def write_config(self, **overrides):
        config = {"python": sys.executable, "pythonpath": str(REPO), "uctr_exec": UCTR_EXEC,
                  "policy": str(self.policy), "run_dir": str(self.run_dir), "alarm": 30}
        config.update(overrides)
        self.config_file.write_text(json.dumps(config))
        self.config = config

    def job(self, image=None, resources=None, variables=None, queue="workq") -> dict:
        self._jobs += 1
        resource_list = dict(resources or {})
        if image:
            resource_list["container_image"] = image
        return {"id": f"{self._jobs}.{SERVER}", "euser": self.user, "egroup": self.user,
                "queue": queue, "Resource_List": resource_list,
                "Variable_List": dict(variables or {})}

    def event(self, name, job, **extra):
        return self.runner.run(name, job, **extra)

    def readiness(self, job) -> dict:
        path = self.run_dir / "readiness" / job["id"]
        if not path.exists():
            return None
        return dict(line.split("=", 1) for line in path.read_text().splitlines())

    def state_files(self, job):
        state = self.run_dir / "pbs"
        return sorted(p.name for p in state.glob(job["id"] + ".*")) if state.exists() else []

    def bundles(self):
        bundles = self.dirs.local / "bundles"
        if not bundles.exists():
            return []
        return [p for p in bundles.iterdir() if not p.name.startswith(".")]


@pytest.fixture
def site(tmp_path, uctr, test_user, registry_http):
    _needs_root_and_test_user(test_user)
    return Site(tmp_path, uctr.dirs(test_user), test_user, [registry_http.host])


def stager_pid(site, job):
    lock = site.run_dir / "pbs" / f"{job['id']}.lock"
    return int(lock.read_text().split()[0])


def session_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[3])


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- queuejob -----------------------------------------------------------------------------
def test_queuejob_accepts_a_valid_image(site, pushed):
    result = site.event("queuejob", site.job(pushed["busybox"]))
    assert result["accepted"], result
    assert not site.run_dir.exists(), "queuejob runs on the server: no node state"


def test_queuejob_accepts_v_uctr_image(site, pushed):
    result = site.event("queuejob", site.job(variables={"UCTR_IMAGE": pushed["busybox"]}))
    assert result["accepted"], result


@pytest.mark.parametrize("image, what, hint", [
    ("debian:12:bad", 'invalid repository name "debian:12" in "debian:12:bad"',
     "repository path components are lowercase"),
    ("Debian/Upper:1", 'repository name must be lowercase: "Debian/Upper"',
     'did you mean "debian/upper:1"?'),
])
def test_queuejob_rejects_bad_syntax_with_a_clear_message(site, image, what, hint):
    result = site.event("queuejob", site.job(image))
    assert not result["accepted"]
    assert result["reject_message"] == f"uctr: {what} (hint: {hint}" + \
        result["reject_message"][len(f"uctr: {what} (hint: {hint}"):]
    assert result["reject_message"].endswith(")")
    assert not result["job_rerun"] and not result["job_delete"]  # not for server hooks


def test_queuejob_rejects_bad_syntax_in_v_uctr_image(site):
    result = site.event("queuejob", site.job(variables={"UCTR_IMAGE": "a//b"}))
    assert not result["accepted"] and result["reject_message"].startswith("uctr: ")


def test_queuejob_rejects_an_image_the_policy_refuses(site, registry_http):
    site.write_policy(allow=[f"{registry_http.host}/busybox:*"])
    result = site.event("queuejob", site.job("docker.io/library/debian:12"))
    assert not result["accepted"]
    assert "refused by the site policy" in result["reject_message"]
    assert "docker.io/library/debian:12" in result["reject_message"]
    allowed = site.event("queuejob", site.job(f"{registry_http.host}/busybox:1"))
    assert allowed["accepted"], allowed


def test_queuejob_rejects_a_mode_users_may_not_choose(site, pushed):
    site.write_policy(user_modes=("P1",))
    result = site.event("queuejob", site.job(pushed["busybox"],
                                             resources={"container_mode": "N1"}))
    assert not result["accepted"]
    assert "mode N1 is not allowed" in result["reject_message"]
    result = site.event("queuejob", site.job(variables={"UCTR_IMAGE": pushed["busybox"],
                                                        "UCTR_MODE": "P1"}))
    assert result["accepted"], result


def test_queuejob_rejects_a_bad_job_shell_choice(site, pushed):
    result = site.event("queuejob", site.job(pushed["busybox"],
                                             variables={"UCTR_JOB_SHELL": "inside"}))
    assert not result["accepted"] and "UCTR_JOB_SHELL" in result["reject_message"]


def test_jobs_without_an_image_never_start_uctr(site):
    site.write_config(python="/nonexistent/python3")  # any call of uctr would fail
    for event in ("queuejob", "execjob_begin", "execjob_prologue", "execjob_end",
                  "execjob_epilogue"):
        result = site.event(event, site.job())
        assert result["accepted"] and not result["logs"], (event, result)
    result = site.event("execjob_launch", site.job(), progname="/bin/bash", argv=[],
                        env={"HOME": "/home/x"})
    assert result["accepted"]
    assert (result["progname"], result["argv"]) == ("/bin/bash", [])
    assert result["env"] == {"HOME": "/home/x"}


# -- execjob_begin: staging ---------------------------------------------------------------
def test_begin_stages_as_the_job_user_never_root(site, pushed, test_images):
    job = site.job(pushed["busybox"])
    result = site.event("execjob_begin", job)

    assert result["accepted"], result
    assert not result["job_rerun"] and not result["job_delete"]
    assert any("staged" in text for _, text in result["logs"]), result["logs"]
    record = site.readiness(job)
    digest = test_images["busybox"].manifest_digest()
    assert record["status"] == "ok" and record["manifest_digest"] == digest
    assert record["uid"] == str(site.uid) and record["image"] == pushed["busybox"]
    # everything the staging created belongs to the job user, though the hook ran as root
    bundle = Path(record["bundle"])
    assert bundle.parent.parent == site.dirs.local
    for path in (bundle, bundle / "rootfs", bundle / "rootfs" / "bin" / "busybox",
                 site.dirs.cache, site.dirs.local):
        assert path.lstat().st_uid == site.uid, f"{path} is not owned by {site.user}"
    blobs = [p for p in site.dirs.cache.rglob("*") if p.is_file()]
    assert blobs and all(p.stat().st_uid == site.uid for p in blobs)
    # the record uctr-exec reads is the job user's, in a root-owned directory
    record_path = site.run_dir / "readiness" / job["id"]
    assert record_path.stat().st_uid == site.uid
    assert stat.S_IMODE(record_path.stat().st_mode) == 0o600
    assert (site.run_dir / "readiness").stat().st_uid == 0
    assert (site.dirs.local / "inuse" / digest.split(":")[1] / f"job-{job['id']}").exists()


def test_begin_on_a_second_job_reuses_the_rootfs(site, pushed, registry_http, test_images):
    first = site.job(pushed["busybox"])
    assert site.event("execjob_begin", first)["accepted"]
    layers = test_images["busybox"].layer_digests()
    gets = {d: registry_http.blob_gets(d) for d in layers}
    second = site.job(pushed["busybox"])
    result = site.event("execjob_begin", second)
    assert result["accepted"]
    assert any("(reused)" in text for _, text in result["logs"]), result["logs"]
    assert {d: registry_http.blob_gets(d) for d in layers} == gets
    assert len(site.bundles()) == 1


def reaches_the_user(site, job, result, text, event="execjob_begin"):
    """Issue 15, item 4: a user error found at execjob_begin/prologue does not reject the
    job (its owner would only see "Execution server rejected request"): it is accepted
    with the message as its comment, and its launch prints the error and hint on the job's
    stderr (the .e file) instead of running anything, then exits 1. Returns the stderr."""
    assert result["accepted"], result
    assert not result["job_delete"] and not result["job_rerun"]
    assert result["job_comment"].startswith("uctr: ") and text in result["job_comment"], result
    assert all(v == {"state": ND_FREE, "comment": None} for v in result["vnodes"].values())
    launch = site.event("execjob_launch", job, progname="/bin/bash", argv=[], env={})
    assert launch["accepted"] and launch["progname"] == "/bin/sh", launch
    assert UCTR_EXEC not in launch["argv"], "nothing of the job may run"
    ran = subprocess.run(launch["argv"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert ran.returncode == 1 and ran.stdout == ""
    assert ran.stderr.startswith("error: uctr: ") and text in ran.stderr, ran.stderr
    assert "\nhint: " in ran.stderr
    end = site.event("execjob_end", job)
    assert end["accepted"], end
    assert site.readiness(job) is None and site.state_files(job) == []
    return ran.stderr


def test_begin_user_error_reaches_the_job_and_leaves_the_vnode_alone(site, registry_http):
    missing = f"{registry_http.host}/no-such-image:1"
    job = site.job(missing)
    result = site.event("execjob_begin", job)

    stderr = reaches_the_user(site, job, result, f"cannot stage {missing} on node1: ")
    assert "not found" in stderr or "unknown" in stderr
    # as docs/pbs.md shows it: the image named once (a real OpenPBS run printed it twice)
    assert stderr.startswith(f"error: uctr: cannot stage {missing} on node1: "), stderr


def test_begin_refuses_what_the_node_policy_refuses_without_pulling(site, registry_http, pushed):
    site.write_policy(allow=["docker.io/library/*"])
    job = site.job(pushed["busybox"])
    result = site.event("execjob_begin", job)
    reaches_the_user(site, job, result, "refused by the site policy")
    assert not site.dirs.cache.exists(), "nothing may be pulled for a refused image"


@pytest.mark.skipif(shutil.which("apptainer") is not None, reason="apptainer is installed here")
def test_begin_a_sif_where_s1_cannot_run_reaches_the_user(site, harness):
    """-l container_image=PATH.sif: nothing is staged (a SIF runs as it is in mode S1); on a
    node without apptainer the job gets the reason and the alternative, the vnode stays up."""
    from tests.integration.test_sif_images import SIF_HEADER

    images = harness.root / "pbs-sif"
    images.mkdir(exist_ok=True)
    images.chmod(0o755)
    sif = images / "app.sif"
    sif.write_bytes(SIF_HEADER)
    sif.chmod(0o644)
    job = site.job(str(sif))
    result = site.event("execjob_begin", job)
    stderr = reaches_the_user(site, job, result, "is an Apptainer image (SIF)")
    assert "apptainer/singularity is not installed" in stderr and "--sandbox" in stderr
    assert site.bundles() == []


@pytest.mark.parametrize("breakage", ["group-writable", "world-writable", "another-owner",
                                      "missing", "not-yaml"])
@pytest.mark.parametrize("event", ["execjob_begin", "execjob_prologue"])
def test_a_policy_the_node_cannot_use_fails_the_job_and_never_offlines(site, pushed, breakage,
                                                                      event):
    """A careless site (issue 10, red team): an untrusted or broken policy is refused, but
    offlining every vnode a container job lands on would take the cluster away from all
    jobs, one container job after another. The job fails with the reason; vnodes stay FREE."""
    if breakage == "group-writable":
        site.policy.chmod(0o664)
    elif breakage == "world-writable":
        site.policy.chmod(0o666)
    elif breakage == "another-owner":
        os.chown(site.policy, 65534, 65534)
    elif breakage == "missing":
        site.policy.unlink()
    else:
        site.policy.write_text("version: 1\ndefaults: [\n")
    job = site.job(pushed["busybox"])
    result = site.event(event, job, vnodes=["node1", "node1[1]"])
    stderr = reaches_the_user(site, job, result, "node node1 cannot run container jobs")
    assert "uctr policy check" in stderr
    site.policy.unlink(missing_ok=True)
    site.write_policy()  # fixed: the next job runs
    again = site.event("execjob_begin", site.job(pushed["busybox"]))
    assert again["accepted"], again


def test_begin_refuses_a_bad_job_shell_choice_as_a_user_error(site, pushed):
    job = site.job(pushed["busybox"], variables={"UCTR_JOB_SHELL": "inside"})
    result = site.event("execjob_begin", job)
    reaches_the_user(site, job, result, "UCTR_JOB_SHELL=inside")


@pytest.mark.parametrize("node_fault, offlined", [("offline", True), ("requeue", False)])
def test_node_fault_requeues_the_job(site, pushed, node_fault, offlined):
    # an unusable node-local directory is the node's problem, not the user's
    site.write_policy(local_dir="/proc/uctr-${UID}")
    site.write_config(node_fault=node_fault)
    job = site.job(pushed["busybox"])
    result = site.runner.run("execjob_begin", job, vnodes=["node1", "node1[1]", "node2"])

    assert not result["accepted"]
    assert result["job_rerun"] and not result["job_delete"]
    assert "node node1 cannot run container jobs" in result["reject_message"]
    assert result["job_comment"].endswith("; the job is requeued"), "the user sees why"
    vnodes = result["vnodes"]
    assert vnodes["node2"] == {"state": ND_FREE, "comment": None}  # another host's vnode
    for name in ("node1", "node1[1]"):
        assert (vnodes[name]["state"] == ND_OFFLINE) is offlined
        assert (vnodes[name]["comment"] or "").startswith("uctr: ") is offlined
    # the admin fixes the node; the requeued job (same id) comes back and runs
    site.write_policy()
    again = site.runner.run("execjob_begin", job)
    assert again["accepted"] and not again["job_rerun"], again
    assert site.readiness(job)["status"] == "ok"


def test_uctr_that_cannot_run_is_a_node_fault_not_a_user_error(site, pushed):
    site.write_config(python="/nonexistent/python3")
    job = site.job(pushed["busybox"])
    begin = site.event("execjob_begin", job)
    assert not begin["accepted"] and begin["job_rerun"] and not begin["job_delete"]
    assert begin["vnodes"]["node1"]["state"] == ND_OFFLINE
    assert "cannot run uctr" in begin["reject_message"]
    queued = site.event("queuejob", job)
    assert not queued["accepted"]
    assert "cannot check the container request" in queued["reject_message"]
    end = site.event("execjob_end", job)
    assert end["accepted"] and any("cleanup skipped" in text for _, text in end["logs"])


def test_a_broken_hook_config_is_reported(site, pushed):
    site.write_config(job_shell="inside")
    job = site.job(pushed["busybox"])
    result = site.event("execjob_begin", job)
    assert not result["accepted"] and result["job_rerun"] and not result["job_delete"]
    assert "broken hook configuration" in result["reject_message"]
    assert "job_shell" in result["reject_message"]
    # the config says which vnodes may be offlined: a broken one offlines nothing
    assert result["vnodes"]["node1"]["state"] == ND_FREE
    queued = site.event("queuejob", job)
    assert not queued["accepted"] and queued["exception"] is None
    assert queued["reject_message"].startswith("uctr: cannot check the container request: ")


# -- the alarm: detached, bounded staging that resumes ------------------------------------
def test_alarm_is_respected_and_an_interrupted_pull_resumes(site, pushed, fault_proxy,
                                                            test_images, uctr):
    site.registries.append(fault_proxy.host)
    site.write_policy()
    image = fault_proxy.rewrite(pushed["busybox"])
    layer = test_images["busybox"].layer_digests()[0]
    fault_proxy.stall(r"/blobs/", after=64 * 1024, seconds=120, times=None)
    site.write_config(alarm=10)  # begin may wait 10 - 8 = 2 s
    job = site.job(image)

    result = site.event("execjob_begin", job, alarm=10)

    # answered before the alarm, job accepted, staging still going on in its own session
    assert not result["alarm"] and result["seconds"] < 10, result
    assert result["accepted"], result
    assert any("still staging" in text for _, text in result["logs"]), result["logs"]
    pid = stager_pid(site, job)
    assert session_of(pid) == pid != result["hook_pid"]
    os.kill(pid, 0)  # alive after MoM's kill(-hook, SIGKILL)
    partial = site.dirs.cache / "tmp" / f"{layer.split(':')[1]}.partial"
    wait_for(lambda: partial.exists() and partial.stat().st_size > 0, what="a partial download")

    # the stager dies mid-download (node reboot, OOM, a previous job end): nothing
    # half-written may look complete
    for member in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if session_of(member) == pid:
                os.kill(member, signal.SIGKILL)
        except (OSError, ValueError):
            pass
    wait_for(lambda: not _alive(pid), what="the stager to die")
    assert site.readiness(job) is None
    assert not (site.dirs.cache / "blobs" / "sha256" / layer.split(":")[1]).exists()
    received = partial.stat().st_size
    assert 0 < received < _blob_size(test_images["busybox"], layer)

    # the requeued job starts again: the pull resumes where it stopped and completes
    fault_proxy.clear()
    site.write_config(alarm=60)
    again = site.event("execjob_begin", job, alarm=60)
    assert again["accepted"], again
    assert any("staged" in text for _, text in again["logs"]), again["logs"]
    assert site.readiness(job)["status"] == "ok"
    ranges = [r.range for r in fault_proxy.matching(layer.split(":")[1]) if r.range]
    assert any(r.startswith(f"bytes={received}-") for r in ranges), fault_proxy.requests
    verify = uctr("verify", user=site.user)  # re-hashes every blob of the job user's cache
    assert verify.returncode == 0, verify.stderr


def test_a_hook_killed_by_its_alarm_leaves_the_stager_running(site, pushed, fault_proxy):
    site.registries.append(fault_proxy.host)
    site.write_policy()
    fault_proxy.stall(r"/blobs/", after=1024, seconds=120, times=None)
    # the hook believes its alarm is long; MoM's real alarm (3 s here) kills it first
    site.write_config(alarm=120, begin_wait=60)
    job = site.job(fault_proxy.rewrite(pushed["busybox"]))

    result = site.event("execjob_begin", job, alarm=3)

    assert result["alarm"], "the hook should have overrun the 3 s alarm"
    wait_for(lambda: (site.run_dir / "pbs" / f"{job['id']}.lock").exists(), what="the lock")
    pid = stager_pid(site, job)
    assert _alive(pid), "the stager must survive kill(-hook, SIGKILL)"
    end = site.event("execjob_end", job)  # the job is gone: its stager stops too
    assert end["accepted"] and any("stopped its stager" in t for _, t in end["logs"]), end
    wait_for(lambda: not _alive(pid), what="the stager to stop")
    assert site.state_files(job) == [] and site.readiness(job) is None


def test_prologue_waits_for_the_stager_begin_left_running(site, pushed, fault_proxy,
                                                          test_images):
    site.registries.append(fault_proxy.host)
    site.write_policy()
    layer_hex = test_images["busybox"].layer_digests()[0].split(":")[1]
    fault_proxy.stall(layer_hex, after=1024, seconds=3, times=1)
    site.write_config(begin_wait=0.5)
    job = site.job(fault_proxy.rewrite(pushed["busybox"]))

    begin = site.event("execjob_begin", job)
    assert begin["accepted"] and any("still staging" in t for _, t in begin["logs"]), begin
    prologue = site.event("execjob_prologue", job)
    assert prologue["accepted"] and any("staged" in t for _, t in prologue["logs"]), prologue
    assert site.readiness(job)["status"] == "ok"


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _blob_size(image, digest):
    return next(layer["size"] for layer in image.manifest()["layers"] if layer["digest"] == digest)


# -- execjob_launch -----------------------------------------------------------------------
@pytest.fixture
def staged(site, pushed):
    job = site.job(pushed["busybox"], resources={"container_mode": "R1"},
                   variables={"UCTR_MPI": "none"})
    assert site.event("execjob_begin", job)["accepted"]
    return job


def test_launch_runs_the_job_shell_through_uctr_exec(site, staged, pushed):
    env = {"HOME": "/home/uctrtest", "PBS_JOBID": staged["id"]}
    result = site.event("execjob_launch", staged, progname="/bin/bash", argv=[], env=env)

    assert result["accepted"], result
    # busybox has no bash: the job shell falls back to the image's /bin/sh
    assert result["progname"] == UCTR_EXEC
    assert result["argv"] == [UCTR_EXEC, pushed["busybox"], "--", "/bin/sh"]
    assert result["env"]["UCTR_IMAGE"] == pushed["busybox"]
    assert result["env"]["UCTR_MODE"] == "R1" and result["env"]["UCTR_MPI"] == "none"
    assert result["env"]["UCTR_RUN_DIR"] == str(site.run_dir)
    assert result["env"]["UCTR_POLICY"] == str(site.policy)
    assert result["env"]["UCTR_PYTHON"] == sys.executable  # the launchers/ shim runs on it
    assert result["env"]["PBS_JOBID"] == staged["id"] and result["env"]["HOME"] == env["HOME"]
    # MoM hands the shell the script's path on stdin: it must exist in the container
    assert result["env"]["UCTR_MOUNTS"] == \
        "/var/spool/pbs/mom_priv/jobs:/var/spool/pbs/mom_priv/jobs:ro"


def test_launch_adds_the_script_dir_to_the_users_mounts(site, staged):
    result = site.event("execjob_launch", staged, progname="/bin/sh", argv=[],
                        env={"UCTR_MOUNTS": "/scratch"}, pbs_home="/pbs")
    assert result["env"]["UCTR_MOUNTS"] == "/scratch,/pbs/mom_priv/jobs:/pbs/mom_priv/jobs:ro"
    task = site.event("execjob_launch", staged, progname="hostname", argv=["hostname"],
                      env={"UCTR_MOUNTS": "/scratch"}, pbs_home="/pbs")
    assert "UCTR_MOUNTS" not in task["env"] or task["env"]["UCTR_MOUNTS"] == "/scratch"


def test_launch_keeps_a_shell_the_image_has(site, staged, pushed):
    result = site.event("execjob_launch", staged, progname="/bin/sh", argv=[], env={})
    assert result["argv"] == [UCTR_EXEC, pushed["busybox"], "--", "/bin/sh"]
    result = site.event("execjob_launch", staged, progname="/usr/bin/zsh", argv=[], env={})
    assert result["argv"][-1] == "/bin/sh"


def test_launch_wraps_tm_tasks_but_not_mpi_daemons(site, staged, pushed):
    task = site.event("execjob_launch", staged, progname="hostname", argv=["hostname", "-f"],
                      env={"UCTR_ARGV0": "/bin/true"})  # qsub -V from inside a Slurm step
    assert task["argv"] == [UCTR_EXEC, pushed["busybox"], "--", "hostname", "-f"]
    assert task["progname"] == UCTR_EXEC
    assert task["env"]["UCTR_ARGV0"] == "", "uctr-exec would run UCTR_ARGV0 instead"
    daemons = (["/usr/bin/orted", "-mca", "ess", "tm"],
               ["hydra_pmi_proxy", "--control-port", "x:1"])
    host_shell = site.job(pushed["busybox"], variables={"UCTR_JOB_SHELL": "host"})
    for daemon in daemons:
        # the job shell on the host: the host's mpiexec started its daemon, which starts
        # the ranks the user's mpiexec line wraps
        result = site.event("execjob_launch", host_shell, progname=daemon[0], argv=daemon,
                            env={})
        assert result["accepted"]
        assert (result["progname"], result["argv"]) == (daemon[0], daemon), "a daemon starts ranks"
        assert result["env"]["UCTR_IMAGE"] == pushed["busybox"]  # for the user's mpiexec line
        # the job shell in the image: its mpiexec asked for the image's daemon, which forks
        # the ranks inside the same container
        inside = site.event("execjob_launch", staged, progname=daemon[0], argv=daemon, env={})
        assert inside["argv"] == [UCTR_EXEC, pushed["busybox"], "--"] + daemon
    for tool in (["/opt/pbs/bin/pbs_attach", "-j", staged["id"], "x"], ["pbs_tmrsh", "n2", "x"]):
        result = site.event("execjob_launch", staged, progname=tool[0], argv=tool, env={})
        assert result["argv"] == tool, "PBS's own tools stay on the host"
    # the user already wrote `mpiexec uctr-exec IMAGE app`: not wrapped twice
    wrapped = ["/opt/uctr/bin/uctr-exec", pushed["busybox"], "app"]
    result = site.event("execjob_launch", staged, progname=wrapped[0], argv=wrapped, env={})
    assert result["argv"] == wrapped


def test_launch_leaves_the_job_shell_on_the_host_when_asked(site, pushed):
    job = site.job(pushed["busybox"], variables={"UCTR_JOB_SHELL": "host"})
    assert site.event("execjob_begin", job)["accepted"]
    result = site.event("execjob_launch", job, progname="/bin/bash", argv=[], env={})
    assert (result["progname"], result["argv"]) == ("/bin/bash", [])
    assert result["env"]["UCTR_IMAGE"] == pushed["busybox"]
    task = site.event("execjob_launch", job, progname="hostname", argv=["hostname"], env={})
    assert task["argv"][:3] == [UCTR_EXEC, pushed["busybox"], "--"]


def test_launch_with_v_uctr_image_only(site, pushed):
    job = site.job(variables={"UCTR_IMAGE": pushed["busybox"]})
    result = site.event("execjob_launch", job, progname="/bin/sh", argv=[], env={})
    assert result["argv"] == [UCTR_EXEC, pushed["busybox"], "--", "/bin/sh"]


def test_launch_fails_the_job_after_a_staging_user_error(site, registry_http):
    job = site.job(f"{registry_http.host}/no-such-image:1")
    # the stager failed after execjob_begin accepted the job (it was still staging then)
    state = site.run_dir / "pbs"
    state.mkdir(parents=True, mode=0o700)
    (state / f"{job['id']}.outcome").write_text(json.dumps({
        "status": "error", "fault": "user", "image": job["Resource_List"]["container_image"],
        "message": "repository not found", "hint": "check the name"}))
    result = site.event("execjob_launch", job, progname="/bin/sh", argv=[], env={})
    assert result["accepted"] and not result["job_delete"]
    assert result["job_comment"] == "uctr: cannot run in " \
        f"{job['Resource_List']['container_image']}: repository not found (hint: check the name)"
    ran = subprocess.run(result["argv"], capture_output=True, text=True)
    assert (ran.returncode, ran.stderr) == (1, "error: uctr: cannot run in "
                                               f"{job['Resource_List']['container_image']}: "
                                               "repository not found\nhint: check the name\n")
    # a TM task of the job on this node reports the same, and runs nothing either
    task = site.event("execjob_launch", job, progname="/bin/hostname", argv=["hostname"], env={})
    assert task["progname"] == "/bin/sh" and "hostname" not in task["argv"]


# -- execjob_end / execjob_epilogue -------------------------------------------------------
@pytest.mark.parametrize("event", ["execjob_end", "execjob_epilogue"])
def test_end_removes_job_state_and_keeps_the_bundle(site, staged, test_images, event):
    digest_hex = test_images["busybox"].manifest_digest().split(":")[1]
    inuse = site.dirs.local / "inuse" / digest_hex
    assert [p.name for p in inuse.iterdir()] == [f"job-{staged['id']}"]
    assert site.state_files(staged)

    result = site.event(event, staged)

    assert result["accepted"], result
    assert any("removed 1 reference" in text for _, text in result["logs"]), result["logs"]
    assert site.readiness(staged) is None and site.state_files(staged) == []
    assert list(inuse.iterdir()) == []
    assert [b.name for b in site.bundles()] == [digest_hex]
    again = site.event(event, staged)  # idempotent: the other of the two events, or a retry
    assert again["accepted"] and not any(level == "error" for level, _ in again["logs"])


def test_end_enforces_the_node_local_quota(site, pushed, test_images):
    job = site.job(pushed["busybox"])
    assert site.event("execjob_begin", job)["accepted"]
    site.write_policy()
    policy = site.policy.read_text().replace("  storage:\n", "  storage:\n    local_quota: 1K\n")
    site.policy.write_text(policy)
    result = site.event("execjob_end", job)
    assert result["accepted"]
    assert any("evicted 1 bundle" in text for _, text in result["logs"]), result["logs"]
    assert site.bundles() == []


# -- install ------------------------------------------------------------------------------
def _uctr(*args, env=None):
    return subprocess.run([sys.executable, "-m", "uctr_batch", *args], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, **(env or {})))


def test_install_dry_run_prints_the_qmgr_steps():
    result = _uctr("pbs", "install", "--dry-run", "--policy", "/etc/uctr/policy.yaml",
                   "--uctr-exec", "/opt/uctr/bin/uctr-exec", "--alarm", "90")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("qmgr")]
    assert commands[:4] == [
        "qmgr -c 'create resource container_image type=string'   "
        "# unless: qmgr -c 'list resource container_image'",
        "qmgr -c 'set resource container_image flag = m'",
        "qmgr -c 'create resource container_mode type=string'   "
        "# unless: qmgr -c 'list resource container_mode'",
        "qmgr -c 'set resource container_mode flag = m'"]
    # job-wide (no h); m: the MoMs get the value, else execjob hooks never see it
    assert "flag=h" not in "\n".join(commands[:4])
    # PBS Professional's container_engine: host-level, for select chunks
    assert commands[4] == ("qmgr -c 'create resource container_engine type=string, flag=h'   "
                           "# unless: qmgr -c 'list resource container_engine'")
    text = "\n".join(commands)
    assert ("set hook uctr event = \"queuejob,execjob_begin,execjob_prologue,execjob_launch,"
            "execjob_end\"") in text
    assert "set hook uctr alarm = 90" in text and "set hook uctr fail_action = none" in text
    imports = [c for c in commands if "'import hook " in c]
    assert imports == [f"qmgr -c 'import hook uctr application/x-python default "
                       f"{REPO}/hooks/pbs/uctr_hook.py'",
                       "qmgr -c 'import hook uctr application/x-config default uctr_hook.json'"]
    # the events are set before the imports (MoMs only get files of hooks with events)
    assert text.index("event =") < text.index("import hook")
    config = json.loads("\n".join(line[4:] for line in result.stdout.splitlines()
                                  if line.startswith("#   ")))
    from uctr_batch.batch.pbs import HookConfig

    parsed = HookConfig.from_dict(config)
    assert parsed.policy == "/etc/uctr/policy.yaml"
    assert parsed.uctr_exec == "/opt/uctr/bin/uctr-exec"
    assert parsed.alarm == 90 and parsed.python == sys.executable


def test_uninstall_dry_run_reverses_install():
    result = _uctr("pbs", "uninstall", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert [line.split("   #")[0] for line in result.stdout.splitlines()] == [
        "qmgr -c 'create hook uctr_guard'", "qmgr -c 'set hook uctr_guard event = queuejob'",
        "qmgr -c 'set hook uctr_guard enabled = true'",
        f"qmgr -c 'import hook uctr_guard application/x-python default {GUARD_FILE}'",
        "qmgr -c 'delete hook uctr'", "qmgr -c 'delete resource container_mode'",
        "qmgr -c 'delete resource container_image'"]


def test_disable_dry_run_leaves_the_guard_and_keeps_the_hook():
    result = _uctr("pbs", "disable", "--dry-run", "--hook-name", "site")
    assert result.returncode == 0, result.stderr
    lines = [line.split("   #")[0] for line in result.stdout.splitlines()]
    assert lines[0] == "qmgr -c 'create hook site_guard'"
    assert lines[-1] == "qmgr -c 'set hook site enabled = false'"
    assert not any("delete" in line for line in lines)


FAKE_QMGR = """#!/bin/sh
# contract double of qmgr -c: records each command; "list" succeeds for created objects
echo "$2" >> "{log}"
case "$2" in
  "list "*) grep -qxF "${{2#list }}" "{state}" 2>/dev/null ;;
  "create "*) echo "${{2#create }}" | sed 's/ type=.*//' >> "{state}" ;;
  "delete resource "*) if [ -e "{state}.busy" ]; then
      echo "qmgr obj=${{2#delete resource }} svr=default: Resource busy on job" >&2; exit 1; fi
    grep -vxF "${{2#delete }}" "{state}" > "{state}.new"; mv "{state}.new" "{state}" ;;
  "delete "*) grep -vxF "${{2#delete }}" "{state}" > "{state}.new"; mv "{state}.new" "{state}" ;;
esac
"""


@pytest.mark.contract
def test_install_runs_qmgr_and_is_idempotent(tmp_path):
    log, state = tmp_path / "qmgr.log", tmp_path / "objects"
    qmgr = tmp_path / "qmgr"
    qmgr.write_text(FAKE_QMGR.format(log=log, state=state))
    qmgr.chmod(0o755)
    args = ["pbs", "install", "--qmgr", str(qmgr), "--uctr-exec", "/opt/uctr/bin/uctr-exec"]

    first = _uctr(*args)
    assert first.returncode == 0, first.stderr
    ran = [c for c in log.read_text().splitlines() if not c.startswith("list ")]
    assert ran[:6] == ["create resource container_image type=string",
                       "set resource container_image flag = m",
                       "create resource container_mode type=string",
                       "set resource container_mode flag = m",
                       "create resource container_engine type=string, flag=h",
                       "create hook uctr"]
    assert ran[-1].startswith("import hook uctr application/x-config default /")
    second = _uctr(*args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("# skipped, nothing to do: create") == 4
    removed = _uctr("pbs", "uninstall", "--qmgr", str(qmgr))
    assert removed.returncode == 0, removed.stderr
    assert state.read_text().splitlines() == ["resource container_engine", "hook uctr_guard"], \
        "only the guard is left, and container_engine, which vnodes may offer"
    ran = [c for c in log.read_text().splitlines() if not c.startswith("list ")]
    assert ran.index("create hook uctr_guard") < ran.index("delete hook uctr"), \
        "the guard comes before the hook goes: no container job is accepted unchecked"
    again = _uctr(*args)
    assert again.returncode == 0, again.stderr
    ran = [c for c in log.read_text().splitlines() if not c.startswith("list ")]
    assert ran[-1] == "delete hook uctr_guard", "install removes the guard last"
    assert "uctr_guard" not in state.read_text()


@pytest.mark.contract
def test_uninstall_keeps_resources_that_jobs_still_name(tmp_path):
    log, state = tmp_path / "qmgr.log", tmp_path / "objects"
    qmgr = tmp_path / "qmgr"
    qmgr.write_text(FAKE_QMGR.format(log=log, state=state))
    qmgr.chmod(0o755)
    assert _uctr("pbs", "install", "--qmgr", str(qmgr),
                 "--uctr-exec", "/opt/uctr/bin/uctr-exec").returncode == 0
    (tmp_path / "objects.busy").touch()  # finished jobs in the history still name them

    removed = _uctr("pbs", "uninstall", "--qmgr", str(qmgr))

    assert removed.returncode == 0, removed.stderr
    assert "warning: kept container_image: jobs (finished ones in the job history too)" \
        in removed.stderr
    assert state.read_text().split("\n")[:2] == ["resource container_image",
                                                 "resource container_mode"]
    assert "hook uctr\n" not in state.read_text() and "hook uctr_guard" in state.read_text()


def test_install_without_qmgr_says_so():
    result = _uctr("pbs", "install", "--qmgr", "/nonexistent/qmgr")
    assert result.returncode == 1
    assert result.stderr.startswith("error: /nonexistent/qmgr not found")
    assert "hint:" in result.stderr


@pytest.mark.parametrize("path", ["site-config/pbs/uctr_hook.json", "hooks/pbs/uctr_hook.json"])
def test_shipped_hook_configs_are_valid(path):
    from uctr_batch.batch.pbs import HookConfig

    example = json.loads((REPO / path).read_text())
    config = HookConfig.from_dict(example)
    assert os.path.isabs(config.uctr_exec) and os.path.isabs(config.python)


def test_the_site_config_example_uses_and_explains_every_key():
    from uctr_batch.batch.pbs import HookConfig

    example = json.loads((REPO / "site-config" / "pbs" / "uctr_hook.json").read_text())
    assert set(example) - {"comment"} == set(HookConfig.__dataclass_fields__)
    readme = (REPO / "site-config" / "pbs" / "README.md").read_text()
    for key in HookConfig.__dataclass_fields__:
        assert f"| `{key}` |" in readme, f"site-config/pbs/README.md does not explain {key}"


def test_unknown_hook_config_keys_are_refused():
    from uctr_batch.batch.pbs import HookConfig
    from uctr_batch.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key.*job_shel"):
        HookConfig.from_dict({"job_shel": "host"})
    with pytest.raises(ConfigError, match="uctr_exec must be an absolute path"):
        HookConfig.from_dict({"uctr_exec": "uctr-exec"})


# -- another user's doing is never a node fault (issue 10, classes 11 and 12) ---------------
NOBODY = pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def sticky(site):
    """A root-owned, world-writable sticky directory every user can reach: a second /tmp."""
    shared = site.dirs.base.parent / f"sticky-{os.getpid()}-{site.tmp.name}"
    shared.mkdir()
    shared.chmod(0o1777)
    # the run dir as on a node (/run/uctr): the job user can reach the records in it
    site.run_dir = site.dirs.base.parent / f"run-{os.getpid()}-{site.tmp.name}"
    site.write_config(run_dir=str(site.run_dir))
    yield shared
    subprocess.run(["rm", "-rf", "--one-file-system", str(shared), str(site.run_dir)],
                   check=False)


def _plant(target: Path, kind: str, uid: int) -> None:
    """What user A (uid `nobody`) or the job user's own mistake leaves at TARGET."""
    if kind == "other-users-dir":
        target.mkdir(mode=0o755)
        os.chown(target, NOBODY, NOBODY)
    elif kind == "symlink":
        target.symlink_to("/etc")
        os.lchown(target, NOBODY, NOBODY)
    elif kind == "file":
        target.write_text("x")
        os.chown(target, NOBODY, NOBODY)
    elif kind == "world-writable-own-dir":
        target.mkdir()
        target.chmod(0o777)
        os.chown(target, uid, uid)
    elif kind == "locked-own-dir":
        target.mkdir(mode=0o000)
        os.chown(target, uid, uid)
    elif kind == "planted-parent":
        target.parent.mkdir(mode=0o777)
        target.parent.chmod(0o777)
        os.chown(target.parent, NOBODY, NOBODY)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["other-users-dir", "symlink", "file", "world-writable-own-dir",
                                  "locked-own-dir", "planted-parent"])
def test_a_planted_node_local_dir_neither_offlines_the_vnode_nor_fails_the_job(
        site, pushed, sticky, kind):
    template = "uctr/${UID}" if kind == "planted-parent" else "uctr-${UID}"
    site.write_policy(local_dir=f"{sticky}/{template}")
    target = sticky / template.replace("${UID}", str(site.uid))
    _plant(target, kind, site.uid)
    before = os.lstat(target if kind != "planted-parent" else target.parent)
    job = site.job(pushed["busybox"])

    result = site.event("execjob_begin", job, vnodes=["node1", "node1[1]"])

    assert result["accepted"], result
    assert not result["job_rerun"] and not result["job_delete"]
    assert all(v["state"] == ND_FREE for v in result["vnodes"].values()), result["vnodes"]
    record = site.readiness(job)
    assert record["status"] == "ok", record
    # staged in a private directory root made for the user, beside the planted one
    fallback = Path(record["bundle"]).parent.parent
    assert fallback.parent.parent == sticky and fallback.name == str(site.uid)
    assert fallback.parent.name.startswith("uctr-fallback.")
    assert fallback.parent.stat().st_uid == 0 and fallback.stat().st_uid == site.uid
    assert stat.S_IMODE(fallback.stat().st_mode) == 0o700
    assert os.lstat(target if kind != "planted-parent" else target.parent).st_ino == before.st_ino
    # uctr-exec (as the job user) finds the same directory through the root-owned record
    probe = subprocess.run(
        ["su", "-s", "/bin/sh", site.user, "-c",
         f"cd / && PYTHONPATH={REPO} UCTR_RUN_DIR={site.run_dir} {sys.executable} -c "
         f"'from uctr_batch.batch import location; "
         f"print(location.usable_local_dir(\"{target}\"))'"],
        capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == str(fallback), probe.stderr
    # a second job reuses the fallback's root filesystem; the end removes the job's traces
    second = site.job(pushed["busybox"])
    again = site.event("execjob_begin", second)
    assert again["accepted"] and any("(reused)" in t for _, t in again["logs"]), again["logs"]
    for done in (job, second):
        end = site.event("execjob_end", done)
        assert end["accepted"] and any("removed 1 reference" in t for _, t in end["logs"]), end
        assert site.readiness(done) is None and site.state_files(done) == []


def test_a_full_node_local_disk_fails_only_the_job(site, pushed, tmp_path):
    if subprocess.run(["mountpoint", "-q", "/"]).returncode != 0:
        pytest.skip("needs mount")
    small = site.dirs.base.parent / f"small-{os.getpid()}-{site.tmp.name}"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=1777", "tmpfs", str(small)],
                   check=True)
    try:
        site.write_policy(local_dir=f"{small}/uctr-${{UID}}")
        job = site.job(pushed["busybox"])
        result = site.event("execjob_begin", job, vnodes=["node1"])
        reaches_the_user(site, job, result, f"cannot stage {pushed['busybox']} on node1")
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
        small.rmdir()


def test_begin_sweeps_records_of_jobs_that_left_without_an_end(site, pushed, tmp_path):
    pbs_home = tmp_path / "pbs_home"
    jobs = pbs_home / "mom_priv" / "jobs"
    jobs.mkdir(parents=True)
    readiness_dir = site.run_dir / "readiness"
    state = site.run_dir / "pbs"
    readiness_dir.mkdir(parents=True)
    state.mkdir(mode=0o700)
    old = time.time() - 7200
    for job_id in ("90.pbs-server", "91.pbs-server", "92.pbs-server"):
        record = readiness_dir / job_id
        record.write_text(f"version=1\njob={job_id}\nuid={site.uid}\nstatus=error\n")
        (state / f"{job_id}.outcome").write_text("{}")
        (state / f"{job_id}.log").write_text("")
        for path in (record, state / f"{job_id}.outcome", state / f"{job_id}.log"):
            os.utime(path, (old, old))
    (jobs / "91.pbs-server.JB").write_text("")  # still on this MoM: a long job, keep it
    os.utime(readiness_dir / "92.pbs-server", None)  # fresh: maybe starting now, keep it
    (state / "93.pbs-server.log").write_text("")  # an orphan state file of a gone job
    os.utime(state / "93.pbs-server.log", (old, old))

    job = site.job(pushed["busybox"])
    result = site.event("execjob_begin", job, pbs_home=str(pbs_home))

    assert result["accepted"], result
    assert sorted(p.name for p in readiness_dir.iterdir()) == sorted(
        ["91.pbs-server", "92.pbs-server", job["id"]])
    assert not list(state.glob("90.pbs-server.*")) and not list(state.glob("93.pbs-server.*"))
    assert list(state.glob("91.pbs-server.*"))


# -- the guard left by uninstall/disable (issue 15, item 3) ---------------------------------
@pytest.mark.parametrize("resources, variables, asked", [
    ({"container_image": "docker.io/library/debian:12"}, {}, "-l container_image"),
    ({}, {"UCTR_IMAGE": "debian:12"}, "-v UCTR_IMAGE"),
    ({"select": "2:ncpus=1:container_engine=singularity"}, {}, "container_engine in select"),
])
def test_guard_refuses_container_jobs_with_a_message(tmp_path, resources, variables, asked):
    runner = HookRunner(GUARD_FILE, tmp_path / "none.json")
    job = {"id": "1.server", "euser": "u", "queue": "workq", "Resource_List": resources,
           "Variable_List": variables}
    result = runner.run("queuejob", job)
    assert not result["accepted"], result
    assert result["reject_message"].startswith("uctr: container jobs are not accepted now")
    assert f"leave out {asked}" in result["reject_message"]
    assert result["exception"] is None


def test_guard_accepts_jobs_without_a_container(tmp_path):
    runner = HookRunner(GUARD_FILE, tmp_path / "none.json")
    job = {"id": "1.server", "euser": "u", "queue": "workq",
           "Resource_List": {"select": "1:ncpus=2"}, "Variable_List": {"HOME": "/home/u"}}
    result = runner.run("queuejob", job)
    assert result["accepted"] and result["reject_message"] is None, result


# -- PBS Professional syntax (issue 15, item 2) ------------------------------------------------
def test_container_engine_in_select_takes_the_mode_the_policy_maps_it_to(site, pushed):
    site.write_policy(engines={"singularity": "R1", "uctr": "auto", "docker": "S1"},
                      user_modes=("N1", "R1", "P1"))
    select = {"select": "2:ncpus=1:container_engine=singularity"}
    job = site.job(pushed["busybox"], resources=select)
    assert site.event("queuejob", job)["accepted"]
    assert site.event("execjob_begin", job)["accepted"]
    launch = site.event("execjob_launch", job, progname="/bin/sh", argv=[], env={})
    assert launch["env"]["UCTR_MODE"] == "R1", launch
    # container_mode wins over the engine
    job = site.job(pushed["busybox"], resources=dict(select, container_mode="P1"))
    launch = site.event("execjob_launch", job, progname="/bin/sh", argv=[], env={})
    assert launch["env"]["UCTR_MODE"] == "P1"
    # auto: the class's ladder, no UCTR_MODE
    job = site.job(pushed["busybox"], resources={"select": "1:container_engine=uctr"})
    launch = site.event("execjob_launch", job, progname="/bin/sh", argv=[], env={})
    assert "UCTR_MODE" not in launch["env"]


@pytest.mark.parametrize("select, words", [
    ("1:ncpus=1:container_engine=podman", "container_engine=podman is not an engine this site "
                                          "offers (engines in the site policy: docker, "
                                          "singularity)"),
    ("1:container_engine=docker", "mode S1 is not allowed"),  # mapped, but not a user mode
    ("1:container_engine=docker+1:container_engine=singularity", "different container_engine"),
])
def test_queuejob_refuses_an_engine_the_site_does_not_map(site, pushed, select, words):
    site.write_policy(engines={"singularity": "R1", "docker": "S1"})
    result = site.event("queuejob", site.job(pushed["busybox"], resources={"select": select}))
    assert not result["accepted"] and words in result["reject_message"], result


def test_pbs_container_args_reach_uctr_exec_as_its_settings(site, pushed, tmp_path):
    args = "--bind=/scratch:/scratch;--bind=/data:/in:ro;--env=OMP_NUM_THREADS=4;--pwd=/in;--nv"
    job = site.job(pushed["busybox"], variables={"PBS_CONTAINER_ARGS": args})
    assert site.event("queuejob", job)["accepted"]
    assert site.event("execjob_begin", job)["accepted"]
    pbs_home = tmp_path / "pbs_home"
    (pbs_home / "mom_priv" / "jobs").mkdir(parents=True)
    env = {"UCTR_MOUNTS": "/home/u/x:/x", "PBS_CONTAINER_ARGS": args}
    shell = site.event("execjob_launch", job, progname="/bin/sh", argv=[], env=env,
                       pbs_home=str(pbs_home))
    scripts = f"{pbs_home}/mom_priv/jobs"
    assert shell["env"]["UCTR_MOUNTS"] == ("/home/u/x:/x,/scratch:/scratch:rw,/data:/in:ro,"
                                           f"{scripts}:{scripts}:ro")
    assert shell["env"]["UCTR_WORKDIR"] == "/in" and shell["env"]["UCTR_GPU"] == "nvidia"
    assert shell["env"]["OMP_NUM_THREADS"] == "4"
    assert shell["env"]["UCTR_ENV_NAMES"] == "OMP_NUM_THREADS"
    task = site.event("execjob_launch", job, progname="/bin/hostname", argv=["hostname"],
                      env=env)
    assert task["env"]["UCTR_WORKDIR"] == "/in" and task["argv"][-1] == "hostname"


def test_pbs_container_args_it_cannot_honour_are_refused_at_qsub(site, pushed):
    job = site.job(pushed["busybox"],
                   variables={"PBS_CONTAINER_ARGS": "--bind=/a:/a;--fakeroot"})
    result = site.event("queuejob", job)
    assert not result["accepted"]
    assert result["reject_message"].startswith("uctr: PBS_CONTAINER_ARGS: --fakeroot is not "
                                               "supported by uctr")
    assert "(hint: uctr understands --bind" in result["reject_message"]
    # changed after qsub (qalter -v): the launch reports it instead of running the job
    launch = site.event("execjob_launch", job, progname="/bin/sh", argv=[], env={})
    assert launch["progname"] == "/bin/sh" and UCTR_EXEC not in launch["argv"]
    assert "--fakeroot is not supported" in launch["job_comment"]


def test_pbs_pro_syntax_without_an_image_is_refused(site):
    for job in (site.job(resources={"select": "1:ncpus=1:container_engine=singularity"}),
                site.job(variables={"PBS_CONTAINER_ARGS": "--nv"})):
        result = site.event("queuejob", job)
        assert not result["accepted"], result
        assert "need an image" in result["reject_message"]


# -- the job script's interpreter (issue 15, item 5) --------------------------------------------
@pytest.mark.parametrize("first_line, missing", [
    ("#!/bin/bash", "/bin/bash"),
    ("#!/usr/bin/env sh", "/usr/bin/env"),  # busybox's env is /bin/env only
    ("#!/bin/env python3", "python3 (run by /bin/env python3)"),
    ("#!/bin/sh -e", None),
    ("#!/bin/env sh", None),
    ("echo no interpreter line", None),
])
def test_the_script_interpreter_is_checked_in_the_image(site, staged, pushed, tmp_path,
                                                        first_line, missing):
    jobs = tmp_path / "pbs_home" / "mom_priv" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / f"{staged['id']}.SC").write_text(first_line + "\necho hi\n")
    result = site.event("execjob_launch", staged, progname="/bin/bash", argv=[], env={},
                        pbs_home=str(tmp_path / "pbs_home"))
    assert result["accepted"]
    if missing is None:
        assert result["progname"] == UCTR_EXEC, result
        return
    assert result["progname"] == "/bin/sh" and UCTR_EXEC not in result["argv"]
    ran = subprocess.run(result["argv"], capture_output=True, text=True)
    assert ran.returncode == 127
    assert ran.stderr.startswith(f"error: uctr: the job script's interpreter {missing} is not "
                                 f"in the image {pushed['busybox']}\nhint: "), ran.stderr
    assert "mom_priv" not in ran.stderr


# -- multi-host MPI through TM (issue 15, item 1) -----------------------------------------------
def test_two_hosts_stage_once_each_and_every_rank_and_tm_task_runs_in_the_image(
        site, pushed, registry_http, test_images):
    """A 2-chunk job on node1 (mother superior) and node2: what each MoM's hook does for
    the job shell on the host, Open MPI's daemon (TM, or pbs_tmrsh) and MPICH's proxy on the
    sister, and a pbsdsh task there; then a rank started the way orted starts it, with the
    environment the sister's hook gave the daemon, really runs inside the image that node2
    staged. Each host has its own node-local run dir and storage; the cache is shared."""
    # root's and world-readable, like /etc/uctr and /run/uctr (the rank reads both)
    node2_root = site.dirs.base.parent / f"node2-{site.dirs.base.name}"
    node2_root.mkdir(mode=0o755)
    node2_run = node2_root / "run"
    node2_policy = node2_root / "etc" / "policy.yaml"
    node2_policy.parent.mkdir(mode=0o755)
    node2_local = site.dirs.local.parent / "node2-local"
    node2_policy.write_text(site.policy.read_text().replace(str(site.dirs.local),
                                                            str(node2_local)))
    node2_policy.chmod(0o644)
    config2 = site.tmp / "hook2" / "uctr_hook.json"
    config2.parent.mkdir()
    config2.write_text(json.dumps(dict(site.config, run_dir=str(node2_run),
                                       policy=str(node2_policy))))
    node2 = HookRunner(HOOK_FILE, config2, node="node2")
    job = site.job(pushed["busybox"], resources={"select": "2:ncpus=1:mpiprocs=1"},
                   variables={"UCTR_JOB_SHELL": "host"})
    vnodes = ["node1", "node2"]
    layers = test_images["busybox"].layer_digests()
    gets = {d: registry_http.blob_gets(d) for d in layers}  # the registry is the session's

    assert site.event("queuejob", job)["accepted"]
    first = site.event("execjob_begin", job, vnodes=vnodes)
    # the mother superior's prologue waits for its staging (a slow machine may leave it
    # running past execjob_begin); then the sister stages from the shared cache
    assert site.event("execjob_prologue", job, vnodes=vnodes)["accepted"]
    second = node2.run("execjob_begin", job, vnodes=vnodes)
    assert first["accepted"] and second["accepted"], (first, second)
    # one stage per host: a readiness record and a root filesystem on each, blobs pulled once
    record1 = site.readiness(job)
    node2_record = node2_run / "readiness" / job["id"]
    wait_for(node2_record.exists, timeout=120, what="node2's stager (it runs on after begin)")
    record2 = dict(line.split("=", 1) for line in node2_record.read_text().splitlines())
    assert record1["status"] == record2["status"] == "ok"
    assert record1["bundle"] != record2["bundle"] and record2["bundle"].startswith(str(node2_local))
    assert all(registry_http.blob_gets(d) - gets[d] == 1 for d in layers), "pulled once"

    shell = site.event("execjob_launch", job, progname="/bin/bash", argv=[], env={})
    assert (shell["progname"], shell["argv"]) == ("/bin/bash", []), "the job shell: on the host"
    assert shell["env"]["UCTR_IMAGE"] == pushed["busybox"]
    daemons = (["/usr/bin/orted", "-mca", "ess", "tm", "-mca", "ess_base_vpid", "1"],  # TM
               ["orted", "-mca", "ess", "env", "-mca", "ess_base_vpid", "1"],  # pbs_tmrsh
               ["/usr/bin/hydra_pmi_proxy", "--control-port", "node1:4000", "--proxy-id", "1"])
    for daemon in daemons:
        launched = node2.run("execjob_launch", job, progname=daemon[0], argv=daemon, env={})
        assert (launched["progname"], launched["argv"]) == (daemon[0], daemon), launched
        assert launched["env"]["UCTR_RUN_DIR"] == str(node2_run)
    # hydra's rsh launcher quotes the proxy for a remote shell; through pbs_tmrsh no shell
    # takes the quotes off: the hook does, and leaves the proxy on the host
    quoted = ['"/usr/bin/hydra_pmi_proxy"', "--control-port", "node1:4000", "--proxy-id", "1"]
    launched = node2.run("execjob_launch", job, progname=quoted[0], argv=quoted, env={})
    assert launched["argv"] == ["/usr/bin/hydra_pmi_proxy"] + quoted[1:], launched
    assert launched["progname"] == "/usr/bin/hydra_pmi_proxy"
    task = node2.run("execjob_launch", job, progname="/bin/readlink",
                     argv=["readlink", "/bin/sh"], env={})
    assert task["argv"] == [UCTR_EXEC, pushed["busybox"], "--", "readlink", "/bin/sh"]

    # a rank as the daemon forks it: `uctr-exec "$UCTR_IMAGE" CMD` from the user's mpiexec
    # line, as the job user, with the daemon's environment from node2's hook
    from tests.harness.users import BASE_PATH, run_as

    rank_env = dict(launched["env"], PATH=BASE_PATH, HOME=str(site.dirs.home),
                    PBS_JOBID=job["id"], PYTHONPATH=str(REPO))
    rank = run_as(site.user, [str(REPO / "launchers" / "uctr-exec"), pushed["busybox"],
                              "readlink", "/bin/sh"], env=rank_env, timeout=120, cwd="/")
    assert rank.returncode == 0, rank.stderr
    assert rank.stdout.strip() == "busybox", "in the image (the host's /bin/sh is not busybox)"
    assert all(registry_http.blob_gets(d) - gets[d] == 1 for d in layers), "node2's stage used"
    for runner in (site.runner, node2):
        assert runner.run("execjob_end", job, vnodes=vnodes)["accepted"]
    assert not (node2_run / "readiness" / job["id"]).exists()


def test_pbs_container_args_really_apply_in_the_container(site, pushed):
    """The launch environment PBS_CONTAINER_ARGS produces, given to the real uctr-exec as
    the job user: the variable, the working directory and the bind are there inside."""
    from tests.harness.users import BASE_PATH, run_as

    args = "--env=FOO=bar baz;--pwd=/etc;--bind=/usr/share:/mnt/share:ro"
    job = site.job(pushed["busybox"], variables={"PBS_CONTAINER_ARGS": args})
    task = site.event("execjob_launch", job, progname="/bin/sh", argv=["sh", "-c", "x"],
                      env={"PBS_CONTAINER_ARGS": args})
    # root's, world-readable (like /etc/uctr): the user's uctr-exec reads the policy
    etc = site.dirs.base.parent / f"etc-{site.dirs.base.name}"
    etc.mkdir(mode=0o755)
    policy = etc / "policy.yaml"
    policy.write_text(site.policy.read_text())
    policy.chmod(0o644)
    env = dict(task["env"], PATH=BASE_PATH, HOME=str(site.dirs.home), PYTHONPATH=str(REPO),
               UCTR_POLICY=str(policy), UCTR_RUN_DIR=str(etc / "run"))
    probe = 'echo "FOO=$FOO cwd=$(pwd)"; test -d /mnt/share/doc && echo bound'
    ran = run_as(site.user, [str(REPO / "launchers" / "uctr-exec"), pushed["busybox"],
                             "sh", "-c", probe], env=env, timeout=180, cwd="/")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["FOO=bar baz cwd=/etc", "bound"], ran.stdout
