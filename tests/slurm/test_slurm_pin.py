"""End to end on the real cluster: the image is pinned at submission (issue 13, item 1).

sbatch/srun resolve IMAGE:tag to IMAGE@sha256:... once, as the submitting user; the prolog of
every node and every step use that digest. A tag moved after submission does not change what
the job runs; a registry that cannot be reached at submission refuses the job at once, unless
the site defers the pin to the prolog (plugstack.conf pin=prolog).
"""

import re
import subprocess

import pytest

from tests.harness.images import push

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NODES = ("node1", "node2")
# Which image a task runs in: B (multiarch, amd64) has /arch-marker, A (busybox) has not.
WHICH = "echo image=$(if [ -e /arch-marker ]; then echo B; else echo A; fi) host=$(hostname)"
STEP = f"""#!/bin/sh
srun -N2 --ntasks-per-node=1 sh -c '{WHICH}'
"""


def images_run(output):
    return sorted(re.findall(r"image=(\w) host=(\S+)", output))


@pytest.fixture
def moving_tag(slurm_cluster, test_images):
    """registry/pinned:1 -> image A (busybox); returns (ref, move_to_B)."""
    registry = slurm_cluster.registry
    ref = push(test_images["busybox"], registry, repo="pinned", tag="1")
    return ref, lambda: push(test_images["multiarch"], registry, repo="pinned", tag="1")


def test_a_tag_moved_after_submission_does_not_change_the_running_job(slurm_cluster,
                                                                      moving_tag, test_images):
    """Submitted held; the tag moves to B before any node has seen the job; the job runs A
    on every node (without the pin, the prologs and steps would resolve the tag to B)."""
    ref, move = moving_tag
    job_id = slurm_cluster.submit(STEP, name="pin-moved",
                                  args=["-H", "-N2", f"--container-image={ref}"])
    move()
    subprocess.run(["scontrol", "release", job_id], check=True, capture_output=True)
    result = slurm_cluster.wait(job_id)
    assert result.state == "COMPLETED", result.output
    assert images_run(result.output) == [("A", node) for node in NODES], result.output
    digest = test_images["busybox"].manifest_digest()
    for node in NODES:
        staged = slurm_cluster.hook_lines("prolog", node, job_id)
        assert any(f"@{digest} as {digest}" in line for line in staged), staged
    # a step started after the move, in a new job: B (the pin is per job, not forever)
    after = slurm_cluster.srun(["-N1", f"--container-image={ref}", "sh", "-c", WHICH])
    assert after.returncode == 0, after.stderr
    assert images_run(after.stdout)[0][0] == "B"
    move_back = push(test_images["busybox"], slurm_cluster.registry, repo="pinned", tag="1")
    assert move_back == ref


def test_srun_steps_of_the_job_ask_the_registry_for_no_manifest(slurm_cluster, moving_tag):
    ref, _ = moving_tag
    registry = slurm_cluster.registry
    manifests = re.compile(r'GET /v2/pinned/manifests/\S+ HTTP/[\d.]+" 200')

    def manifest_gets():
        return sum(1 for line in registry.access_log() if manifests.match(line))
    before = manifest_gets()
    job_id = slurm_cluster.submit(STEP,
                                  name="pin-count", args=["-N2", f"--container-image={ref}"])
    result = slurm_cluster.wait(job_id)
    assert images_run(result.output) == [("A", node) for node in NODES], result.output
    assert manifest_gets() - before == 1  # the pin at submission; nodes and steps: none


def test_an_unreachable_registry_refuses_the_submission_at_once(slurm_cluster):
    dead = "10.200.0.1:9/nothing:1"  # nothing listens on port 9
    with pytest.raises(Exception) as refused:
        slurm_cluster.submit("#!/bin/sh\ntrue\n", name="pin-dead",
                             args=["-N1", f"--container-image={dead}"])
    message = str(refused.value)
    assert "uctr: --container-image=" in message and "cannot resolve" in message
    assert "hint:" in message
    assert slurm_cluster.unavailable_nodes(NODES) == {}


def test_the_site_can_defer_the_pin_to_the_prolog(slurm_cluster, moving_tag):
    ref, _ = moving_tag
    with slurm_cluster.plugstack_args("pin=prolog"):
        job_id = slurm_cluster.submit(STEP,
                                      name="pin-prolog", args=["-N2", f"--container-image={ref}"])
    result = slurm_cluster.wait(job_id)
    assert images_run(result.output) == [("A", node) for node in NODES], result.output
    for node in NODES:  # the prolog got the tag itself, not a digest
        assert any(f"staged {ref} as" in line
                   for line in slurm_cluster.hook_lines("prolog", node, job_id))
    assert slurm_cluster.unavailable_nodes(NODES) == {}
