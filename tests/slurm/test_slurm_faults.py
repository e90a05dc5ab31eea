"""End to end on the real cluster: faults while many nodes stage one image (issue 13, item 5).

Every test runs on all the cluster's nodes (2 by default; UCTR_SLURM_NODES=8 widens it) with
the image pinned at submission, through a fault-injecting proxy in front of the registry on
the nodes' bridge. What is documented (docs/slurm.md, "When the image cannot be used"): a
registry or disk problem fails the job with the message, never drains a node, leaves no
half-made rootfs in use, and a resubmission fetches only what the shared cache lacks.
"""

import pwd
import re
import subprocess

import pytest

from tests.harness.faults import FaultProxy
from tests.harness.images import push
from tests.harness.slurm import BRIDGE_ADDR, cluster_policy
from tests.harness.users import TEST_USER

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

UID = pwd.getpwnam(TEST_USER).pw_uid
LOCAL = f"/tmp/uctr-{UID}"
SCRIPT = "#!/bin/sh\necho batch ran\n"


def all_nodes(cluster):
    return sorted(cluster.nodes, key=lambda name: int(name[4:]))


def complete_bundles(cluster, node):
    """Bundles whose rootfs was finished (image.json is written last)."""
    names = [n for n in cluster.list_node_dir(node, f"{LOCAL}/bundles") if not n.startswith(".")]
    return [n for n in names
            if cluster.read_node_file(node, f"{LOCAL}/bundles/{n}/image.json") is not None]


def outcomes(cluster, job_id):
    """node -> 'staged' / 'error' from the prolog logs."""
    out = {}
    for node in all_nodes(cluster):
        lines = cluster.hook_lines("prolog", node, job_id)
        out[node] = ("staged" if any(": staged " in ln for ln in lines)
                     else "error" if any("error staging" in ln for ln in lines) else "none")
    return out


def cached_blobs(digests):
    cache = pwd.getpwnam(TEST_USER).pw_dir + "/.cache/uctr/blobs/sha256/"
    return {d for d in digests if subprocess.run(["test", "-f", cache + d.split(":")[1]]).returncode == 0}


def run_on_all(cluster, ref, name, hold=False):
    args = ["-N", str(len(cluster.nodes)), "--time=3", f"--container-image={ref}"]
    return cluster.submit(SCRIPT, name=name, args=(["-H"] if hold else []) + args)


@pytest.fixture
def proxy(slurm_cluster):
    """A FaultProxy on the bridge in front of the cluster registry, allowed by the policy;
    the test user's shared cache and node-local dirs emptied."""
    registry = slurm_cluster.registry
    fault = FaultProxy(registry.host, bind_host=BRIDGE_ADDR).start()
    text = cluster_policy(registry.host).replace(f'["{registry.host}"]',
                                                 f'["{registry.host}", "{fault.host}"]')
    slurm_cluster._write_policy(text)
    slurm_cluster.reset_user_storage()
    yield fault
    fault.stop()
    slurm_cluster.set_policy()
    slurm_cluster.resume_nodes()


def pushed_via(cluster, proxy, test_images, name, repo):
    return proxy.rewrite(push(test_images[name], cluster.registry, repo=repo, tag="1"))


def test_registry_dies_after_one_node_staged_the_others_proceed(slurm_cluster, proxy,
                                                                test_images):
    ref = pushed_via(slurm_cluster, proxy, test_images, "busybox", "fault-dies")
    job_id = run_on_all(slurm_cluster, ref, "dies-all", hold=True)  # pinned while it is up
    first = slurm_cluster.submit(SCRIPT, name="dies-first",
                                 args=["-N1", "-w", "node1", f"--container-image={ref}"])
    assert slurm_cluster.wait(first).state == "COMPLETED"
    proxy.fail(r".", status=503, times=None)  # the registry is gone from now on
    asked = len(proxy.requests)
    subprocess.run(["scontrol", "release", job_id], check=True, capture_output=True)
    result = slurm_cluster.wait(job_id)
    assert result.state == "COMPLETED", result.output
    assert set(outcomes(slurm_cluster, job_id).values()) == {"staged"}
    assert len(proxy.requests) == asked  # the shared cache had all: nothing asked of it
    assert slurm_cluster.unavailable_nodes() == {}


def test_registry_dies_mid_pull_then_a_resubmission_fetches_only_what_is_missing(
        slurm_cluster, proxy, test_images):
    image = test_images["layers"]
    ref = pushed_via(slurm_cluster, proxy, test_images, "layers", "fault-midpull")
    layers = image.layer_digests()
    dead = proxy.fail(re.escape(layers[-1]), status=503, times=None)  # dies on the last layer
    job_id = run_on_all(slurm_cluster, ref, "midpull-1")
    result = slurm_cluster.wait(job_id)
    assert result.state == "FAILED", result.output
    assert "503" in result.output and "uctr:" in result.output
    assert set(outcomes(slurm_cluster, job_id).values()) == {"error"}
    assert slurm_cluster.unavailable_nodes() == {}
    for node in all_nodes(slurm_cluster):
        assert complete_bundles(slurm_cluster, node) == []  # nothing half-made is kept as done
    missing = set(layers) - cached_blobs(layers)
    assert layers[-1] in missing
    proxy.rules.remove(dead)  # the registry is back
    proxy.requests.clear()
    job_id = run_on_all(slurm_cluster, ref, "midpull-2")
    result = slurm_cluster.wait(job_id)
    assert result.state == "COMPLETED", result.output
    fetched = {r.path.rsplit("/", 1)[1] for r in proxy.matching(r"/blobs/") if r.status == 200}
    assert fetched == missing  # what the shared cache lacked, once, whatever the node count


def test_a_429_storm_with_retry_after_is_waited_out(slurm_cluster, proxy, test_images):
    image = test_images["busybox"]
    ref = pushed_via(slurm_cluster, proxy, test_images, "busybox", "fault-429")
    proxy.rate_limit(r"/blobs/", retry_after=1, times=3)
    job_id = run_on_all(slurm_cluster, ref, "storm")
    result = slurm_cluster.wait(job_id)
    assert result.state == "COMPLETED", result.output
    assert set(outcomes(slurm_cluster, job_id).values()) == {"staged"}
    assert sum(1 for r in proxy.matching(r"/blobs/") if r.status == 429) == 3
    for digest in image.layer_digests():  # one download per blob for the whole cluster
        assert sum(1 for r in proxy.matching(re.escape(digest)) if r.status == 200) == 1
    assert slurm_cluster.unavailable_nodes() == {}


def test_one_node_with_a_full_disk_fails_the_job_not_the_node(slurm_cluster, proxy, test_images):
    ref = pushed_via(slurm_cluster, proxy, test_images, "busybox", "fault-full")
    full = all_nodes(slurm_cluster)[-1]
    mounted = slurm_cluster.node_exec(full, ["sh", "-c",
                                             f"mkdir -m 700 {LOCAL} && chown {UID} {LOCAL} && "
                                             f"mount -t tmpfs -o size=256k,mode=700,uid={UID} "
                                             f"tmpfs {LOCAL}"])
    assert mounted.returncode == 0, mounted.stderr
    try:
        n = len(slurm_cluster.nodes)
        job_id = slurm_cluster.submit(f"#!/bin/sh\nsrun -N{n} --ntasks-per-node=1 true\n",
                                      name="full", args=["-N", str(n), "--time=3",
                                                         f"--container-image={ref}"])
        result = slurm_cluster.wait(job_id)
        assert result.state == "FAILED", result.output
        assert "space" in result.output.lower(), result.output
        seen = outcomes(slurm_cluster, job_id)
        assert seen[full] == "error"
        assert all(v == "staged" for n, v in seen.items() if n != full), seen
        assert complete_bundles(slurm_cluster, full) == []
        assert slurm_cluster.unavailable_nodes() == {}
    finally:
        slurm_cluster.node_exec(full, ["umount", LOCAL])
        slurm_cluster.node_exec(full, ["rm", "-rf", LOCAL])


def test_a_node_that_cannot_run_the_mode_fails_the_job_not_the_node(slurm_cluster, proxy,
                                                                    test_images):
    """The last node's class offers N1 only; the job asks for R1 (allowed elsewhere)."""
    ref = pushed_via(slurm_cluster, proxy, test_images, "busybox", "fault-mode")
    odd = all_nodes(slurm_cluster)[-1]
    policy = slurm_cluster.policy_file.read_text() + "\n".join([
        "classes:", "  - name: n1-only", f"    match: {{regex: '{odd}'}}",
        "    modes: [N1]", "    user_modes: [N1]", ""])
    slurm_cluster._write_policy(policy)
    n = len(slurm_cluster.nodes)
    job_id = slurm_cluster.submit(f"#!/bin/sh\nsrun -N{n} --ntasks-per-node=1 true\n",
                                  name="mode", args=["-N", str(n), "--time=3",
                                                     "--container-mode=R1",
                                                     f"--container-image={ref}"])
    result = slurm_cluster.wait(job_id)
    assert result.state == "FAILED", result.output
    assert "R1" in result.output and "uctr:" in result.output, result.output
    seen = outcomes(slurm_cluster, job_id)
    assert seen[odd] == "error"
    assert all(v == "staged" for node, v in seen.items() if node != odd), seen
    assert complete_bundles(slurm_cluster, odd) == []  # refused before anything was staged
    assert slurm_cluster.unavailable_nodes() == {}
