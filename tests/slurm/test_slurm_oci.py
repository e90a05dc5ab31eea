"""End to end: Slurm's own `--container=IMAGE` through uctr's oci.conf profile (Slurm >= 23.02),
and what slurmd says without an oci.conf (every release).

The profile is installed as an admin would (`uctr slurm install --oci`, next to slurm.conf) and
removed afterwards (`uctr slurm uninstall --oci`). "oci.conf only": the plugstack.conf line is
taken out for the test, so nothing but Slurm's runtime hook and uctr-oci brings the tasks into
the image; "both": the SPANK plugin stays, and wins (docs/slurm.md).

On 22.05 only the last test runs: 22.05's oci.conf cannot take an image name (see
tests/unit/test_oci_install.py for the refusal); run this file in the trixie (24.11) and sid
(26.05) roots: tests/harness/slurmroot.py.
"""

import contextlib
import os
import re
import subprocess
import time

import pytest

from tests.harness.slurm import SLURM_CONF, BASE_PATH
from tests.slurm.test_slurm_mpi import mount_table, user_processes
from tests.slurm.test_slurm_staging import NODES, UID, bundles
from uctr_batch.batch import oci_install

pytestmark = pytest.mark.slurm

WHERE = '[ -e /etc/debian_version ] && w=host || w=image; '
RANK_LINE = WHERE + ('echo "rank=$SLURM_PROCID node=$(hostname) where=$w '
                     'mnt=$(readlink /proc/self/ns/mnt) job=$SLURM_JOB_ID"')
RANK_RE = re.compile(r"^rank=(\d+) node=(\S+) where=(\S+) mnt=(\S+) job=\d+$", re.M)


def uctr_as_admin(cluster, *args):
    env = {"PATH": BASE_PATH, "PYTHONPATH": str(cluster.path("lib", "python")),
           "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    return subprocess.run([cluster.python, "-m", "uctr_batch", *args], capture_output=True,
                          text=True, env=env, cwd="/", timeout=300)


@pytest.fixture(scope="module")
def oci_profile(slurm_cluster):
    release = oci_install.installed_release()
    if release is None or release < oci_install.MIN_RELEASE:
        shown = "%d.%02d" % release if release else "(unknown release)"
        pytest.skip(f"Slurm {shown}: oci.conf takes only bundle directories before 23.02 "
                    "(uctr slurm install --oci refuses; tests/unit/test_oci_install.py)")
    directory = str(SLURM_CONF.parent)
    # the harness's own install options (SlurmCluster._install_code), --log-dir included:
    # without it the reinstalled hooks log to slurmd's stderr, and later tests that read the
    # hook logs (test_slurm_staging) find nothing
    result = uctr_as_admin(slurm_cluster, "slurm", "install", "--prefix",
                           str(slurm_cluster.prefix), "--policy", str(slurm_cluster.policy_file),
                           "--log-dir", str(slurm_cluster.path("log")),
                           "--oci", "--slurm-conf-dir", directory)
    assert result.returncode == 0, result.stderr
    assert "oci.conf" in result.stdout
    try:
        yield SLURM_CONF.parent / "oci.conf"
    finally:
        result = uctr_as_admin(slurm_cluster, "slurm", "uninstall", "--oci", "--slurm-conf-dir",
                               directory)
        assert result.returncode == 0, result.stderr
        assert not (SLURM_CONF.parent / "oci.conf").exists()


@contextlib.contextmanager
def without_spank(cluster):
    """No plugstack.conf line: slurmstepd and the clients read it afresh for every step."""
    path = cluster.path("etc", "plugstack.conf")
    original = path.read_text()
    cluster._write(path, "# uctr plugin taken out by test_slurm_oci.py\n")
    try:
        yield
    finally:
        cluster._write(path, original)


@pytest.fixture
def oci_only(slurm_cluster, oci_profile):
    with without_spank(slurm_cluster):
        yield slurm_cluster


@pytest.fixture
def busybox(slurm_cluster, test_images):
    return slurm_cluster.image_ref("busybox")


def ranks(output):
    found = RANK_RE.findall(output)
    return {int(rank): (node, where, mnt) for rank, node, where, mnt in found}


def host_mnt(cluster, node):
    """The mount namespace a plain task gets on NODE."""
    result = cluster.srun([f"--nodelist={node}", "-N1", "-n1", "readlink", "/proc/self/ns/mnt"],
                          name="plain")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_srun_container_runs_every_rank_in_the_image_sharing_the_node_container(
        oci_only, busybox, test_images):
    oci_only.reset_user_storage()
    layers = test_images["busybox"].layer_digests()
    before = {d: oci_only.registry.blob_gets(d, status=200) for d in layers}

    result = oci_only.srun(["-N2", "--ntasks-per-node=2", f"--container={busybox}",
                            "sh", "-c", RANK_LINE], name="oci-ranks", env={"UCTR_VERBOSE": "2"})

    assert result.returncode == 0, result.stderr
    seen = ranks(result.stdout)
    assert sorted(seen) == [0, 1, 2, 3], result.stdout + result.stderr
    assert {where for _node, where, _mnt in seen.values()} == {"image"}
    for node in NODES:
        mnts = {mnt for n, _where, mnt in seen.values() if n == node}
        assert len(mnts) == 1, f"the ranks on {node} are not in one container: {seen}"
        assert mnts != {host_mnt(oci_only, node)}
    digest = test_images["busybox"].manifest_digest().split(":")[1]
    for node in NODES:  # staged once per node, by the prolog: every rank found it ready
        assert bundles(oci_only, node) == [digest]
    sources = re.findall(r"^uctr\[rank (\d)\]: .* rootfs \S+ \(sha256:[0-9a-f]+, (\w+)\)$",
                         result.stderr, re.M)
    assert sorted(rank for rank, _source in sources) == ["0", "1", "2", "3"], result.stderr
    # the prolog's record, or the node's index a rank before this one read it from: no rank
    # staged ("staged"), so no task unpacked or pulled anything
    assert {source for _rank, source in sources} <= {"readiness", "index"}, result.stderr
    assert {d: oci_only.registry.blob_gets(d, status=200) - before[d] for d in layers} == \
        {d: 1 for d in layers}


def test_exit_codes_and_signals_are_the_tasks_own(oci_only, busybox):
    for payload in ("exit 3", "kill -USR1 $$"):
        plain = oci_only.srun(["-N1", "-n1", "sh", "-c", payload], name="oci-plain")
        inside = oci_only.srun(["-N1", "-n1", f"--container={busybox}", "sh", "-c",
                                WHERE + 'echo "where=$w"; ' + payload], name="oci-exit")
        assert "where=image" in inside.stdout, inside.stderr
        assert inside.returncode == plain.returncode != 0, (payload, inside.stderr)


def test_a_bad_image_fails_the_step_with_uctrs_message(oci_only):
    result = oci_only.srun(["-N1", "-n1", "--container=Not/A:Valid::Ref", "true"],
                           name="oci-bad")
    assert result.returncode != 0
    assert "uctr: error: " in result.stderr and "uctr: hint: " in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_sbatch_container_runs_the_script_on_the_host_and_its_steps_in_the_image(oci_only, busybox):
    script = ("#!/bin/sh\n" + WHERE + 'echo "batch where=$w srun=$(command -v srun)"\n'
              f"srun -N2 --ntasks-per-node=2 sh -c '{RANK_LINE}'\n")
    job_id = oci_only.submit(script, name="oci-batch",
                             args=["-N2", "--ntasks-per-node=2", f"--container={busybox}"])
    result = oci_only.wait(job_id)
    assert result.state == "COMPLETED", result.output
    assert "batch where=host srun=/usr/bin/srun" in result.output
    seen = ranks(result.output)
    assert sorted(seen) == [0, 1, 2, 3] and {w for _n, w, _m in seen.values()} == {"image"}, \
        result.output


def test_scancel_leaves_nothing_behind(oci_only, busybox):
    mounts_before = {node: mount_table(oci_only, node) for node in NODES}
    script = "#!/bin/sh\nsrun -N2 --ntasks-per-node=2 sleep 321\n"
    job_id = oci_only.submit(script, name="oci-cancel",
                             args=["-N2", "--ntasks-per-node=2", f"--container={busybox}"])

    def sleepers(node):
        return [p for p in user_processes(oci_only, node, UID)
                if p.split(": ", 1)[1].startswith("sleep 321")]
    deadline = time.monotonic() + 120
    while not all(len(sleepers(node)) == 2 for node in NODES):
        assert time.monotonic() < deadline, "the step never started"
        assert oci_only.job_record(job_id).get("JobState") in ("RUNNING", "PENDING")
        time.sleep(0.2)

    subprocess.run(["scancel", job_id], check=True)
    assert oci_only.wait(job_id, timeout=120).state == "CANCELLED"
    deadline = time.monotonic() + 30
    while any(user_processes(oci_only, n, UID) for n in NODES) and time.monotonic() < deadline:
        time.sleep(0.2)
    for node in NODES:
        assert user_processes(oci_only, node, UID) == []
        assert mount_table(oci_only, node) == mounts_before[node]
        assert oci_only.read_node_file(node, f"/run/uctr/readiness/{job_id}") is None


def test_with_the_spank_plugin_too_the_plugin_wins_and_nothing_nests(slurm_cluster, oci_profile,
                                                                     busybox, tmp_path):
    """The plugin's task_init made the task `uctr-exec IMAGE -- ...` before Slurm's runtime
    ran: uctr-oci runs that as it is, and the plugin's options apply (--container-env here)."""
    result = slurm_cluster.srun(["-N1", "-n2", f"--container={busybox}",
                                 "--container-env=OCI_TEST", "sh", "-c",
                                 RANK_LINE + '; echo "env=$OCI_TEST"'],
                                env={"OCI_TEST": "from-host"}, name="oci-both")
    assert result.returncode == 0, result.stderr
    seen = ranks(result.stdout)
    assert sorted(seen) == [0, 1] and {w for _n, w, _m in seen.values()} == {"image"}
    assert len({m for _n, _w, m in seen.values()}) == 1
    assert result.stdout.count("env=from-host") == 2, result.stdout


def test_without_oci_conf_slurmd_logs_it_and_the_job_runs(slurm_cluster, busybox):
    """What the admin guide tells sites to expect in slurmd's log without an oci.conf."""
    with without_oci_conf():
        check_no_oci_conf_log(slurm_cluster, busybox)


@contextlib.contextmanager
def without_oci_conf():
    """The profile of this module's other tests set aside (slurmstepd reads it per step)."""
    path = SLURM_CONF.parent / "oci.conf"
    aside = path.with_name("oci.conf.test-aside")
    moved = path.exists()
    if moved:
        os.rename(path, aside)
    try:
        yield
    finally:
        if moved:
            os.rename(aside, path)


def check_no_oci_conf_log(slurm_cluster, busybox):
    logs = {node: slurm_cluster.path("log", f"slurmd.{node}.log") for node in NODES}
    sizes = {node: path.stat().st_size if path.exists() else 0 for node, path in logs.items()}
    job_id = slurm_cluster.submit("#!/bin/sh\necho done\n", name="no-oci",
                                  args=["-N1", f"--container={busybox}"])
    result = slurm_cluster.wait(job_id)
    assert result.state == "COMPLETED", result.output
    new = ""
    for node, path in logs.items():
        with open(path, errors="replace") as f:
            f.seek(sizes[node])
            new += f.read()
    assert "error: No oci.conf file" in new, new[-2000:]
