"""End to end through a real OpenPBS: install the hook with `uctr pbs install`, submit jobs
with -l container_image, check that they ran inside the image, that a bad image is refused
with its message, and that every node cleans up.

Runs wherever qsub and qmgr exist and a PBS server answers (as root: the installer needs
a PBS manager, the jobs are submitted as the test user). Skipped with the reason otherwise;
CI has no PBS (it is built by hand, outside the project, to run this module: docs/pbs.md).
The PBS complex is the local one: every vnode must see the same paths as this host (a
single-host PBS, or shared /tmp and run dir).
"""

import json
import os
import pwd
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
IMAGE_MARKER = "/etc/uctr-image-marker"  # a file only the test image has


def _why_not() -> str:
    for tool in ("qsub", "qmgr", "qstat", "pbsnodes"):
        if shutil.which(tool) is None:
            return f"no OpenPBS here: {tool} is not on PATH (see docs/pbs.md, 'Tested')"
    if os.geteuid() != 0:
        return "needs root: `uctr pbs install` runs qmgr as a PBS manager"
    up = subprocess.run(["qstat", "-B"], capture_output=True, text=True, timeout=30)
    if up.returncode != 0:
        return f"the PBS server does not answer: {up.stderr.strip()}"
    from uctr_batch.batch.pbs_install import find_uctr_exec

    if not os.access(find_uctr_exec(), os.X_OK):
        return f"uctr-exec is not installed at {find_uctr_exec()}"
    return ""


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
                qsub, "-j", "oe", "-o", str(out), *args, str(path)]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=self.base, timeout=60)
        result.output_file = out
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
        cp = subprocess.run(["pbsnodes", "-a", "-F", "json"], capture_output=True, text=True)
        nodes = json.loads(cp.stdout)["nodes"]
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
        "  storage:", f"    cache_dir: {storage}/cache-${{UID}}",
        f"    local_dir: {storage}/local-${{UID}}", "    stage_timeout: 300", ""]))
    policy.chmod(0o644)
    site = Pbs(base, test_user, policy, run)
    site.uid = uid
    site.local = storage / f"local-{uid}"
    site.install()
    yield site
    site.uninstall()


@pytest.fixture(scope="module")
def marked_image(push, registry_http, test_images, tmp_path_factory):
    """busybox with a marker file: output that can only come from inside the image."""
    from tests.harness.oci import ImageConfig, Layer, LayerBuilder, LayoutWriter, TAG
    from tests.harness.images import TestImage, busybox_layer

    layout = tmp_path_factory.mktemp("marked") / "layout"
    marker = LayerBuilder()
    marker.file(IMAGE_MARKER.lstrip("/"), b"inside-the-image\n", 0o644)
    writer = LayoutWriter(layout)
    writer.tag(writer.add_image(ImageConfig(cmd=["/bin/sh"]),
                                [Layer.build(busybox_layer()), Layer.build(marker)]), TAG)
    return push(TestImage("marked", layout, TAG), registry_http, repo="marked")


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
    assert f"host image={marked_image}" in output, output
    assert output.count("inside-the-image") == 4, output
    assert sorted(line.split()[0] for line in output.splitlines() if line.startswith("rank=")) \
        == ["rank=0", "rank=1"]


def test_bad_image_syntax_is_refused_by_qsub(pbs):
    sub = pbs.qsub("#!/bin/sh\ntrue\n", "-l", "container_image=Not/Valid:1")
    assert sub.returncode != 0
    assert "uctr: repository name must be lowercase" in sub.stderr, sub.stderr


def test_missing_image_fails_the_job_and_keeps_nodes_up(pbs, registry_http):
    sub = pbs.qsub("#!/bin/sh\necho ran\n", "-l",
                   f"container_image={registry_http.host}/no-such-image:1")
    assert sub.returncode == 0, sub.stderr
    job = pbs.wait(sub.stdout.strip())
    assert job.get("Exit_status") != 0
    assert "ran" not in (sub.output_file.read_text() if sub.output_file.exists() else "")
    assert pbs.nodes_free(), "a user's bad image must never offline a vnode"


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
