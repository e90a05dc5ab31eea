"""End to end on the real cluster: job arrays and heterogeneous jobs (issue 13, item 4).

Array tasks that land on one node share one rootfs: one unpack per node per digest, whatever
the array size, with the tasks' prologs racing for it (rootfs.create's lock). The array is
pinned once at submission, so every task runs the same digest. Each component of a
heterogeneous job can have its own image (the first component's through sbatch, the others
on their srun lines: Slurm 22.05 gives sbatch's SPANK options to the whole job).
"""

import re
import subprocess
import time

import pytest

from tests.harness.images import push

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NODES = ("node1", "node2")
WHICH = "echo image=$(if [ -e /arch-marker ]; then echo B; else echo A; fi) host=$(hostname)"


def wait_gone(job_id, timeout=300):
    """Until no task of JOB_ID (an array or het job) is in the queue."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id)], capture_output=True,
                             text=True).stdout
        if not out.strip():
            return
        assert time.monotonic() < deadline, f"job {job_id} still queued:\n{out}"
        time.sleep(0.2)


def log_sizes(cluster):
    return {node: cluster.node_log(node).stat().st_size if cluster.node_log(node).exists()
            else 0 for node in NODES}


def new_prolog_lines(cluster, since):
    out = {}
    for node in NODES:
        with open(cluster.node_log(node), errors="replace") as f:
            f.seek(since[node])
            out[node] = f.read().splitlines()
    return out


def test_array_tasks_on_a_node_share_one_rootfs(slurm_cluster, test_images):
    slurm_cluster.reset_user_storage()
    image = push(test_images["busybox"], slurm_cluster.registry, repo="array", tag="1")
    digest = test_images["busybox"].manifest_digest()
    since = log_sizes(slurm_cluster)
    script = "#!/bin/sh\nsrun sh -c '" + WHICH + " task=$SLURM_ARRAY_TASK_ID'\n"
    job_id = slurm_cluster.submit(script, name="array",
                                  args=["--array=0-11", "-N1", "-n1", "--time=2",
                                        f"--container-image={image}"])
    wait_gone(job_id)
    outputs = "".join(p.read_text() for p in slurm_cluster.path("work", "array").glob("*.out"))
    ran = re.findall(r"image=(\w) host=(\S+) task=(\d+)", outputs)
    assert sorted(int(t) for _i, _h, t in ran) == list(range(12)), outputs
    assert {i for i, _h, _t in ran} == {"A"}
    used = {h for _i, h, _t in ran}
    lines = new_prolog_lines(slurm_cluster, since)
    for node in used:
        staged = [ln for ln in lines[node] if f"as {digest}" in ln]
        unpacked = [ln for ln in staged if "(unpacked)" in ln]
        assert len(unpacked) == 1, staged  # one unpack per node, the other tasks reuse it
        assert all(f"@{digest} as" in ln for ln in staged)  # every task got the pinned digest
    assert slurm_cluster.unavailable_nodes(NODES) == {}


def test_each_component_of_a_heterogeneous_job_has_its_own_image(slurm_cluster, test_images):
    """Slurm 22.05 hands sbatch's SPANK options to the whole heterogeneous job (the first
    component's --container-image wins: tested below), so another component names its
    image on its srun line; that step pins and stages it itself (docs/slurm.md)."""
    image_a = push(test_images["busybox"], slurm_cluster.registry, repo="het-a", tag="1")
    image_b = push(test_images["multiarch"], slurm_cluster.registry, repo="het-b", tag="1")
    script = ("#!/bin/sh\n"
              f"srun --het-group=0 sh -c '{WHICH} group=0'\n"
              f"srun --het-group=1 --container-image={image_b} sh -c '{WHICH} group=1'\n"
              f"srun --het-group=1 sh -c '{WHICH} group=1-default'\n")
    job_id = slurm_cluster.submit(script, name="hetjob",
                                  args=["-N1", "--time=2", f"--container-image={image_a}", ":",
                                        "-N1", "--time=2"])
    wait_gone(job_id)
    outputs = "".join(p.read_text() for p in slurm_cluster.path("work", "hetjob").glob("*.out"))
    ran = sorted(re.findall(r"image=(\w) host=(\S+) group=(\S+)", outputs))
    assert [(i, g) for i, _h, g in ran] == [("A", "0"), ("A", "1-default"), ("B", "1")], outputs
    assert len({h for _i, h, _g in ran}) == 2  # one node per component
    assert slurm_cluster.unavailable_nodes(NODES) == {}
