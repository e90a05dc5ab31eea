"""The simulated nodes look like separate machines to what runs on them (issue 11, item 5).

Each node has its own sysfs, mounted in its network namespace: /sys/class/net lists the
node's lo and eth0, not the host's NICs. MPICH/UCX choose their device from it, so before,
they worked only on hosts whose own NIC happened to be called eth0.
"""

import subprocess

import pytest

pytestmark = [pytest.mark.slurm]

NODE_DEVICES = ["eth0", "lo"]


def net_devices(text: str):
    return sorted(text.split())


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_a_job_on_the_node_sees_the_nodes_own_net_devices(slurm_cluster, node):
    result = slurm_cluster.srun(["-N1", "-n1", "--time=2", f"--nodelist={node}",
                                 "ls", "/sys/class/net"])
    assert result.returncode == 0, result.stderr
    assert net_devices(result.stdout) == NODE_DEVICES
    # and the device behind the name is the node's own (its address is the node's)
    result = slurm_cluster.srun(["-N1", "-n1", "--time=2", f"--nodelist={node}",
                                 "cat", "/sys/class/net/eth0/address"])
    assert result.returncode == 0, result.stderr
    link = slurm_cluster.node_exec(node, ["ip", "-o", "link", "show", "eth0"]).stdout
    assert result.stdout.strip() in link


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_the_nodes_sysfs_keeps_the_hosts_cgroup_mounts(slurm_cluster, node):
    argv = ["findmnt", "-rn", "-R", "-o", "TARGET", "/sys/fs/cgroup"]
    host = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    assert slurm_cluster.node_exec(node, argv).stdout.split() == host
