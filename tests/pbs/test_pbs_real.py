"""End to end through a real OpenPBS: install the hook with `uctr pbs install`, submit jobs
with -l container_image, check that they ran inside the image, that a bad image is refused
with its message, and that every node cleans up.

Runs wherever qsub and qmgr exist and a PBS server answers (as root: the installer needs
a PBS manager, the jobs are submitted as the test user), with job history enabled (the
tests read finished jobs: `qmgr -c 'set server job_history_enable = true'`) and a free
vnode. Skipped with the reason otherwise; CI has no PBS (it is built by hand, outside the
project, to run this module: docs/pbs.md). The PBS complex is the local one: every vnode
must see the same paths as this host (a single-host PBS, or shared /tmp and run dir).

The module cleans up after itself even when interrupted: its jobs are named JOB_NAME and
deleted with `qdel -W force` at the end (and at the start, left over from a killed run),
and every vnode it finds offline at the end that was not offline at the start is put back
(`pbsnodes -r`, comment cleared with `pbsnodes -C ""`).
"""

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.users import BASE_PATH

pytestmark = pytest.mark.pbs

REPO = Path(__file__).resolve().parents[2]
HOOK = "uctr_test"
JOB_NAME = "uctr-test"  # every job this module submits: found and deleted at both ends
IMAGE_MARKER = "/etc/uctr-image-marker"  # a file only the test image has


def _why_not() -> str:
    for tool in ("qsub", "qmgr", "qstat", "pbsnodes"):
        if shutil.which(tool) is None:
            return f"no OpenPBS here: {tool} is not on PATH (see docs/pbs.md, 'Tested')"
    if os.geteuid() != 0:
        return "needs root: `uctr pbs install` runs qmgr as a PBS manager"
    up = subprocess.run(["qstat", "-B", "-f", "-F", "json"], capture_output=True, text=True,
                        timeout=30)
    if up.returncode != 0:
        return f"the PBS server does not answer: {up.stderr.strip()}"
    why = _server_not_ready(up.stdout) or _no_free_vnode()
    if why:
        return why
    from uctr_batch.batch.pbs_install import find_uctr_exec

    if not os.access(find_uctr_exec(), os.X_OK):
        return f"uctr-exec is not installed at {find_uctr_exec()}"
    return ""


def _server_not_ready(qstat_json: str) -> str:
    try:
        server = next(iter(json.loads(qstat_json)["Server"].values()))
    except (ValueError, KeyError, StopIteration):
        return "cannot read the PBS server's attributes (qstat -B -f -F json)"
    if str(server.get("job_history_enable", "")).lower() not in ("true", "1"):
        return ("job history is off on the PBS server (the tests read finished jobs): "
                "qmgr -c 'set server job_history_enable = true'")
    return ""


def vnode_states() -> dict:
    cp = subprocess.run(["pbsnodes", "-a", "-F", "json"], capture_output=True, text=True,
                        timeout=30)
    try:
        return {name: node for name, node in json.loads(cp.stdout)["nodes"].items()}
    except (ValueError, KeyError):
        return {}


def _no_free_vnode() -> str:
    nodes = vnode_states()
    if not any(n.get("state") == "free" for n in nodes.values()):
        states = ", ".join(f"{name}: {n.get('state')}" + (f" ({n['comment']})" if
                                                          n.get("comment") else "")
                           for name, n in sorted(nodes.items())) or "no vnodes"
        return f"no free vnode to run the test jobs on ({states})"
    return ""


def delete_test_jobs(user: str, only=None) -> None:
    """qdel -W force every unfinished job named JOB_NAME of USER (or ONLY those ids)."""
    cp = subprocess.run(["qstat", "-f", "-F", "json"], capture_output=True, text=True,
                        timeout=30)
    try:
        jobs = json.loads(cp.stdout).get("Jobs", {}) if cp.returncode == 0 else {}
    except ValueError:
        jobs = {}
    ids = [job_id for job_id, job in jobs.items()
           if job.get("Job_Name") == JOB_NAME
           and str(job.get("Job_Owner", "")).split("@")[0] == user
           and (only is None or job_id in only)]
    if ids:
        subprocess.run(["qdel", "-W", "force", *ids], capture_output=True, timeout=60)


def restore_vnodes(before: dict) -> None:
    """Vnodes offline now (with a uctr: comment) that were not before: back in service."""
    for name, node in vnode_states().items():
        was = before.get(name, {})
        if "offline" in str(node.get("state")) and "offline" not in str(was.get("state")):
            subprocess.run(["pbsnodes", "-r", name], capture_output=True, timeout=30)
            subprocess.run(["pbsnodes", "-C", was.get("comment") or "", name],
                           capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pbs_available():
    why = _why_not()
    if why:
        pytest.skip(why)


class Pbs:
    """The local OpenPBS with the uctr hook installed under a test name."""

    def __init__(self, base: Path, user: str, policy: Path, run_dir: Path):
        self.base, self.user, self.policy, self.run_dir = base, user, policy, run_dir
        self._n = 0
        self.jobs = []  # every job id submitted: deleted at the end if still there

    def uctr(self, *args) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO), UCTR_RUN_DIR=str(self.run_dir))
        return subprocess.run([sys.executable, "-m", "uctr_batch", *args], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=300)

    def install(self) -> None:
        result = self.uctr("pbs", "install", "--hook-name", HOOK, "--policy", str(self.policy),
                           "--alarm", "120")
        assert result.returncode == 0, result.stderr
        time.sleep(5)  # the server copies MoM hooks asynchronously

    def uninstall(self) -> None:
        self.uctr("pbs", "uninstall", "--hook-name", HOOK)

    def qsub(self, script: str, *args: str) -> subprocess.CompletedProcess:
        self._n += 1
        path = self.base / f"job{self._n}.sh"
        path.write_text(script)
        out = self.base / f"job{self._n}.out"
        shutil.chown(path, self.user)
        qsub = shutil.which("qsub")
        argv = ["runuser", "-u", self.user, "--", "/usr/bin/env", "-i",
                f"PATH={os.path.dirname(qsub)}:{BASE_PATH}", f"HOME={self.base}",
                qsub, "-N", JOB_NAME, "-j", "oe", "-o", str(out), *args, str(path)]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=self.base, timeout=60)
        result.output_file = out
        if result.returncode == 0:
            self.jobs.append(result.stdout.strip())
        return result

    def wait(self, job_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            cp = subprocess.run(["qstat", "-x", "-f", "-F", "json", job_id], capture_output=True,
                                text=True, timeout=30)
            if cp.returncode == 0:
                job = json.loads(cp.stdout)["Jobs"][job_id]
                if job.get("job_state") == "F":
                    return job
            assert time.monotonic() < deadline, f"job {job_id} did not finish: {cp.stdout}"
            time.sleep(1)

    def nodes_free(self) -> bool:
        nodes = vnode_states()
        return all("offline" not in n["state"] and "down" not in n["state"] for n in nodes.values())


@pytest.fixture(scope="module")
def pbs(pbs_available, test_user, registry_http, harness):
    base = harness.root / "pbs-real"
    base.mkdir(mode=0o755)
    uid = pwd.getpwnam(test_user).pw_uid
    storage = base / "storage"
    storage.mkdir()
    shutil.chown(base, test_user)
    shutil.chown(storage, test_user)
    # root-owned and world-readable, like /etc/uctr and /run/uctr: uctr-exec reads the
    # policy and the readiness records as the job user
    etc, run = harness.root / "pbs-etc", harness.root / "pbs-run"
    etc.mkdir(mode=0o755)
    policy = etc / "policy.yaml"
    policy.write_text("\n".join([
        "version: 1", "defaults:",
        "  registries:", f'    insecure: ["{registry_http.host}"]',
        "  container_engines: {singularity: auto, uctr: auto}",
        "  storage:", f"    cache_dir: {storage}/cache-${{UID}}",
        f"    local_dir: {storage}/local-${{UID}}", "    stage_timeout: 300", ""]))
    policy.chmod(0o644)
    site = Pbs(base, test_user, policy, run)
    site.uid = uid
    site.local = storage / f"local-{uid}"
    delete_test_jobs(test_user)  # left by an interrupted earlier run
    before = vnode_states()
    try:
        site.install()
        yield site
    finally:  # also after a failure or Ctrl-C: no job, hook or offline vnode is left
        delete_test_jobs(test_user, only=set(site.jobs))
        site.uninstall()
        _remove_guard()
        restore_vnodes(before)


def _remove_guard() -> None:
    """uninstall leaves the guard hook; the test's own name must not stay on the server."""
    subprocess.run(["qmgr", "-c", f"delete hook {HOOK}_guard"], capture_output=True, timeout=60)


def pinned_or(reference: str) -> str:
    """A regex for REFERENCE as the job sees it: as given, or pinned to its digest at
    submission (name@sha256:..., where queuejob pins the tag)."""
    import re

    name = reference.rsplit(":", 1)[0] if ":" in reference.rsplit("/", 1)[-1] else reference
    return f"(?:{re.escape(reference)}|{re.escape(name)}@sha256:[0-9a-f]{{64}})"


def marked_layout(directory: Path):
    """busybox with a marker file: output that can only come from inside the image."""
    from tests.harness.oci import ImageConfig, Layer, LayerBuilder, LayoutWriter, TAG
    from tests.harness.images import TestImage, busybox_layer

    layout = directory / "layout"
    marker = LayerBuilder()
    marker.file(IMAGE_MARKER.lstrip("/"), b"inside-the-image\n", 0o644)
    writer = LayoutWriter(layout)
    writer.tag(writer.add_image(ImageConfig(cmd=["/bin/sh"]),
                                [Layer.build(busybox_layer()), Layer.build(marker)]), TAG)
    return TestImage("marked", layout, TAG)


@pytest.fixture(scope="module")
def marked_image(push, registry_http, test_images, tmp_path_factory):
    return push(marked_layout(tmp_path_factory.mktemp("marked")), registry_http, repo="marked")


@pytest.mark.parametrize("how", ["-l", "-v"])
def test_single_node_job_runs_inside_the_image(pbs, marked_image, how):
    script = f"#!/bin/sh\ncat {IMAGE_MARKER}\ntest -e /etc/os-release && echo host-os-release\n" \
             "echo job=$PBS_JOBID image=$UCTR_IMAGE\n"
    request = ["-l", f"container_image={marked_image}"] if how == "-l" else \
        ["-v", f"UCTR_IMAGE={marked_image}"]
    sub = pbs.qsub(script, *request, "-l", "select=1:ncpus=1")
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    job = pbs.wait(job_id)
    output = sub.output_file.read_text()
    assert job.get("Exit_status") == 0, (job, output)
    assert "inside-the-image" in output and "host-os-release" not in output, output
    assert f"job={job_id} image=\n" in output, "UCTR_* settings stay outside the container"
    assert pbs.nodes_free()


def test_two_chunk_job_runs_tm_tasks_and_mpi_ranks_inside_the_image(pbs, marked_image):
    # the job script stays on the host (a PBS-aware mpiexec and pbsdsh live there); TM tasks
    # are wrapped by the hook, MPI ranks by the user's mpiexec line
    from uctr_batch.batch.pbs_install import find_uctr_exec

    script = "\n".join([
        "#!/bin/sh",
        'echo "host image=$UCTR_IMAGE"',
        f"pbsdsh -- cat {IMAGE_MARKER}",
        'mpiexec --oversubscribe --mca plm_rsh_agent pbs_tmrsh -n 2 '
        f'{find_uctr_exec()} "$UCTR_IMAGE" '
        f'sh -c \'echo rank=$OMPI_COMM_WORLD_RANK $(cat {IMAGE_MARKER})\'',
        ""])
    sub = pbs.qsub(script, "-l", f"container_image={marked_image}", "-l",
                   "select=2:ncpus=1:mpiprocs=1", "-v", "UCTR_JOB_SHELL=host")
    assert sub.returncode == 0, sub.stderr
    job = pbs.wait(sub.stdout.strip())
    output = sub.output_file.read_text()
    assert job.get("Exit_status") == 0, (job, output)
    assert re.search(f"host image={pinned_or(marked_image)}\n", output), output
    assert output.count("inside-the-image") == 4, output
    assert sorted(line.split()[0] for line in output.splitlines() if line.startswith("rank=")) \
        == ["rank=0", "rank=1"]


def test_bad_image_syntax_is_refused_by_qsub(pbs):
    sub = pbs.qsub("#!/bin/sh\ntrue\n", "-l", "container_image=Not/Valid:1")
    assert sub.returncode != 0
    assert "uctr: repository name must be lowercase" in sub.stderr, sub.stderr


def test_missing_image_fails_the_job_with_its_reason_and_keeps_nodes_up(pbs, registry_http):
    image = f"{registry_http.host}/no-such-image:1"
    sub = pbs.qsub("#!/bin/sh\necho ran\n", "-l", f"container_image={image}")
    if sub.returncode != 0:  # queuejob pins tags to digests: the image is missing at qsub
        assert f"uctr: cannot resolve {image} to a digest" in sub.stderr, sub.stderr
        assert pbs.nodes_free()
        return
    job = pbs.wait(sub.stdout.strip())
    assert job.get("Exit_status") != 0
    output = sub.output_file.read_text() if sub.output_file.exists() else ""
    assert "ran" not in output
    # issue 15, item 4: the reason reaches the user, in the job's output (-j oe)
    assert f"error: uctr: cannot stage {image}" in output, (job, output)
    assert "\nhint: " in output
    assert pbs.nodes_free(), "a user's bad image must never offline a vnode"


def test_a_script_interpreter_the_image_lacks_is_named(pbs, marked_image):
    sub = pbs.qsub("#!/bin/bash\necho ran\n", "-l", f"container_image={marked_image}")
    assert sub.returncode == 0, sub.stderr
    job = pbs.wait(sub.stdout.strip())
    output = sub.output_file.read_text() if sub.output_file.exists() else ""
    assert job.get("Exit_status") == 127, (job, output)
    assert re.search("the job script's interpreter /bin/bash is not in the image "
                     f"{pinned_or(marked_image)}\n", output) and "mom_priv" not in output, output


def test_pbs_professional_syntax(pbs, marked_image):
    # container_engine in select (mapped to auto by the test policy) and PBS_CONTAINER_ARGS
    script = "#!/bin/sh\ncat /etc/uctr-image-marker\necho FOO=$FOO cwd=$(pwd)\n"
    sub = pbs.qsub(script, "-l", f"container_image={marked_image}",
                   "-l", "select=1:ncpus=1:container_engine=singularity",
                   "-v", "PBS_CONTAINER_ARGS=--env=FOO=bar;--pwd=/etc")
    assert sub.returncode == 0, sub.stderr
    job = pbs.wait(sub.stdout.strip())
    output = sub.output_file.read_text()
    assert job.get("Exit_status") == 0, (job, output)
    assert "inside-the-image" in output and "FOO=bar cwd=/etc" in output, output
    refused = pbs.qsub("#!/bin/sh\ntrue\n", "-l", f"container_image={marked_image}",
                       "-v", "PBS_CONTAINER_ARGS=--fakeroot")
    assert refused.returncode != 0
    assert "uctr: PBS_CONTAINER_ARGS: --fakeroot is not supported by uctr" in refused.stderr


def test_uninstalled_or_disabled_hook_never_runs_a_container_job_on_the_host(pbs, marked_image):
    try:
        for action in ("disable", "uninstall"):
            result = pbs.uctr("pbs", action, "--hook-name", HOOK)
            assert result.returncode == 0, result.stderr
            time.sleep(2)  # the server takes the hook changes asynchronously
            sub = pbs.qsub("#!/bin/sh\necho ran-on-the-host\n", "-v",
                           f"UCTR_IMAGE={marked_image}")
            assert sub.returncode != 0, f"{action}: accepted {sub.stdout}"
            assert "uctr: container jobs are not accepted now" in sub.stderr, sub.stderr
        plain = pbs.qsub("#!/bin/sh\necho plain\n")
        assert plain.returncode == 0, "jobs without an image still run"
        pbs.wait(plain.stdout.strip())
    finally:
        pbs.install()  # deletes the guard again
    sub = pbs.qsub("#!/bin/sh\ncat /etc/uctr-image-marker\n", "-v", f"UCTR_IMAGE={marked_image}")
    assert sub.returncode == 0, sub.stderr
    job = pbs.wait(sub.stdout.strip())
    assert job.get("Exit_status") == 0 and "inside-the-image" in sub.output_file.read_text()


def test_cleanup_leaves_no_job_state(pbs, marked_image):
    sub = pbs.qsub("#!/bin/sh\ntrue\n", "-l", f"container_image={marked_image}")
    job_id = sub.stdout.strip()
    pbs.wait(job_id)
    time.sleep(2)  # execjob_end runs in the background after the job is finished
    assert not (pbs.run_dir / "readiness" / job_id).exists()
    assert not list((pbs.run_dir / "pbs").glob(f"{job_id}.*"))
    inuse = pbs.local / "inuse"
    refs = [p.name for d in inuse.iterdir() for p in d.iterdir()] if inuse.exists() else []
    assert f"job-{job_id}" not in refs
    assert [p for p in (pbs.local / "bundles").iterdir() if not p.name.startswith(".")]


def test_tm_task_in_the_image_sees_the_signal_state_of_a_plain_tm_task(pbs, marked_image):
    # issue 10, class 3: a containerised task gets what MoM gives a task on the host (before,
    # SIGPIPE and SIGXFSZ were ignored inside); grep is exec'd by pbsdsh, no shell between
    script = "#!/bin/sh\npbsdsh -- grep -E '^Sig(Ign|Blk):' /proc/self/status\n"

    def signal_state(*request):
        sub = pbs.qsub(script, *request, "-l", "select=1:ncpus=1")
        assert sub.returncode == 0, sub.stderr
        job = pbs.wait(sub.stdout.strip())
        output = sub.output_file.read_text()
        assert job.get("Exit_status") == 0, (job, output)
        state = dict(line.split(":", 1) for line in output.splitlines() if line.startswith("Sig"))
        assert set(state) == {"SigIgn", "SigBlk"}, output
        return {k: v.strip() for k, v in state.items()}

    host = signal_state()
    inside = signal_state("-l", f"container_image={marked_image}", "-v", "UCTR_JOB_SHELL=host")
    assert inside == host
