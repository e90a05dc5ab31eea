"""One user+mount namespace per job step and node (N1): the ranks of a step share it, other
steps do not, nothing is left when ranks exit or are SIGKILLed, and single-copy shared
memory (CMA, process_vm_readv) works between ranks only because they share it."""

import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.exec_helpers import (
    NS_PROBE, Node, ns_inodes, processes_in_mount_ns, step_env, unprivileged_user,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def node(harness):
    return Node(harness.root / "shared-ns", unprivileged_user())


@pytest.fixture(scope="module")
def busybox(test_images):
    return test_images["busybox"].oci_ref


def start_ranks(node, image, job, step, count, payload, local_size=None, extra=None):
    procs = []
    for rank in range(count):
        env = dict(step_env(job, step, local_size or count, rank), **(extra or {}))
        procs.append(node.popen(image, "sh", "-c", payload, env=env))
    return procs


def finish(procs, timeout=120):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err
        outs.append(out)
    return outs


def payloads_in(inode) -> list:
    """Pids of the `sleep` payloads in mount namespace INODE."""
    found = []
    for pid in processes_in_mount_ns(inode):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep":
                found.append(pid)
        except OSError:
            continue
    return found


def wait_gone(inode, timeout=10.0):
    deadline = time.monotonic() + timeout
    while processes_in_mount_ns(inode):
        assert time.monotonic() < deadline, \
            f"still in mount ns {inode}: {processes_in_mount_ns(inode)}"
        time.sleep(0.05)


def test_ranks_of_a_step_share_one_namespace_other_steps_do_not(node, busybox):
    assert node.run(busybox, "true").returncode == 0  # stage first: the ranks start warm
    payload = NS_PROBE + "; sleep 1"
    a = start_ranks(node, busybox, "50", "0", 4, payload)
    b = start_ranks(node, busybox, "50", "1", 3, payload)
    a_ns = {ns_inodes(out)[0] for out in finish(a)}
    b_ns = {ns_inodes(out)[0] for out in finish(b)}
    assert len(a_ns) == 1 and len(b_ns) == 1, (a_ns, b_ns)
    host_user = str(os.stat("/proc/self/ns/user").st_ino)
    (user_a, mnt_a), (user_b, mnt_b) = (x.split()[1:] for x in (a_ns.pop(), b_ns.pop()))
    assert user_a != user_b and mnt_a != mnt_b and host_user not in (user_a, user_b)
    wait_gone(mnt_a)
    wait_gone(mnt_b)


def test_ranks_share_although_slurm_gives_only_some_of_them_tmpdir(node, busybox):
    """Slurm 22.05 exported TMPDIR=/tmp to rank 0 of a `--mpi=pmi2` step and not to rank 1;
    each PMI_FD and rank differ too. None of that may split the step's ranks into several
    containers: MPICH's shared memory between them failed that way."""
    assert node.run(busybox, "true").returncode == 0
    procs = []
    for rank in range(3):
        env = dict(step_env("52", "0", 3, rank), PMI_RANK=str(rank), PMI_SIZE="3",
                   PMI_FD=str(11 + 2 * rank), PMI_JOBID="52.0")
        if rank == 0:
            env["TMPDIR"] = "/tmp"
        procs.append(node.popen(busybox, "sh", "-c", NS_PROBE + "; sleep 1", env=env))
    namespaces = {ns_inodes(out)[0] for out in finish(procs)}
    assert len(namespaces) == 1, namespaces


def test_short_commands_share_through_the_holder_which_then_exits(node, busybox):
    assert node.run(busybox, "true").returncode == 0
    outs = finish(start_ranks(node, busybox, "51", "0", 8, NS_PROBE))
    namespaces = {ns_inodes(out)[0] for out in outs}
    assert len(namespaces) == 1, namespaces
    mnt = namespaces.pop().split()[2]
    wait_gone(mnt, timeout=5)  # the holder left once all 8 ranks had joined


def test_sigkilled_ranks_leave_no_namespace_or_lock(node, busybox):
    assert node.run(busybox, "true").returncode == 0
    # 3 of 6 announced ranks start, then everything is killed: the holder must give up too
    procs = start_ranks(node, busybox, "52", "0", 3, NS_PROBE + "; exec sleep 60", local_size=6)
    first = procs[0].stdout.readline()
    mnt = first.split()[2]
    deadline = time.monotonic() + 30
    # wait for the 3 payloads themselves: counting processes would also count a rank's
    # short-lived `stat` children while a slower rank has not joined yet
    while len(payloads_in(mnt)) < 3:
        assert time.monotonic() < deadline, f"in mount ns {mnt}: {processes_in_mount_ns(mnt)}"
        time.sleep(0.05)
    for pid in payloads_in(mnt):
        os.kill(pid, signal.SIGKILL)
    for p in procs:
        p.communicate(timeout=30)
    wait_gone(mnt, timeout=10)  # holder: every member gone, nobody new: it exits
    # the old namespace is empty, hence freed; a new rank of the step is not stuck behind
    # a dead creator's lock. (Its namespace may well get the same inode number back: the
    # kernel reuses freed ones, so comparing inodes proves nothing here.)
    again = node.run(busybox, "sh", "-c", NS_PROBE, env=step_env("52", "0", 6), timeout=30)
    assert again.returncode == 0, again.stderr
    assert ns_inodes(again.stdout), again.stdout


CMA_PROGRAM = r'''
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
role, path = sys.argv[1], sys.argv[2]
if role == "serve":
    buf = ctypes.create_string_buffer(b"cma-payload-0123456789", 64)
    with open(path + ".tmp", "w") as f:
        f.write("%d %d" % (os.getpid(), ctypes.addressof(buf)))
    os.rename(path + ".tmp", path)
    while not os.path.exists(path + ".done"):
        time.sleep(0.01)
else:
    while not os.path.exists(path):
        time.sleep(0.01)
    pid, addr = map(int, open(path).read().split())
    out = ctypes.create_string_buffer(64)
    local, remote = iovec(ctypes.addressof(out), 22), iovec(addr, 22)
    n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    open(path + ".done", "w").close()
    if n < 0:
        print("FAIL", os.strerror(ctypes.get_errno()))
    else:
        print("OK", out.value.decode())
'''


@pytest.mark.parametrize("same_step", [True, False], ids=["one-step", "two-steps"])
def test_cma_works_only_in_the_shared_namespace(node, test_images, same_step):
    """process_vm_readv between two ranks: allowed in one user namespace, refused between
    two sibling ones (EPERM), which is why a step's ranks share theirs."""
    image = test_images["debian-openmpi"].oci_ref  # has python3
    shared = node.work / "cma"
    shared.mkdir()
    os.chmod(shared, 0o777)
    (shared / "cma.py").write_text(CMA_PROGRAM)
    rendezvous = "/cma/rv-%s" % ("same" if same_step else "split")
    assert node.run(image, "true", timeout=600).returncode == 0  # staging may take a while
    steps = ("0", "0") if same_step else ("0", "1")
    args = ("-v", f"{shared}:/cma", image, "python3", "/cma/cma.py")
    server = node.popen(*args, "serve", rendezvous, env=step_env("53", steps[0], 2, 0))
    reader = node.popen(*args, "read", rendezvous, env=step_env("53", steps[1], 2, 1))
    out, err = reader.communicate(timeout=120)
    server.communicate(timeout=60)
    assert reader.returncode == 0, err
    if same_step:
        assert out.strip() == "OK cma-payload-0123456789"
    else:
        assert out.strip() == "FAIL Operation not permitted"
