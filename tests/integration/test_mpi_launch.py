"""Real MPI jobs without Slurm: the host's launchers start one uctr-exec per rank.

  * Open MPI `mpirun -np 4` (PMIx) runs mpi4py's helloworld and ringtest in the
    debian-openmpi image;
  * MPICH `mpiexec.mpich -n 4` (hydra, PMI-1 over PMI_FD) runs mpi_hello in debian-mpich.
The world size is asserted: a broken PMI wiring does not fail, every rank just believes it
is alone (size 1). Host MPI injection: the host's Open MPI replaces the image's (same ABI),
and a host Open MPI profile is refused for the MPICH image, with the reason, falling back to
the fabric libraries, or stopping when the policy allows no fallback.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import hostabi, users
from tests.integration.exec_helpers import SHIM, Node, unprivileged_user

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("mpirun.openmpi")
                                      and shutil.which("mpiexec.mpich")),
                                 reason="needs Open MPI and MPICH on the host")]

HOST_OMPI_PROFILE = """version: 1
{defaults}
mpi_profiles:
  host-ompi:
    family: openmpi
    libs: [libmpi.so.40]
    lib_dirs: [/usr/lib/x86_64-linux-gnu]
    abi_check: major
"""


@pytest.fixture(scope="module")
def node(harness):
    return Node(harness.root / "mpi", unprivileged_user())


@pytest.fixture(scope="module")
def openmpi_image(test_images, node):
    why = hostabi.host_openmpi_differs_from_images()
    if why:
        pytest.skip(why)
    image = test_images["debian-openmpi"].oci_ref
    staged = node.run(image, "true", timeout=900)  # stage once for the module
    assert staged.returncode == 0, staged.stderr
    return image


@pytest.fixture(scope="module")
def mpich_image(test_images, node):
    image = test_images["debian-mpich"].oci_ref
    staged = node.run(image, "true", timeout=900)
    assert staged.returncode == 0, staged.stderr
    return image


def trusted_policy(node, name, text) -> Path:
    """A policy file the site could have written: root-owned, readable, in root-owned dirs."""
    directory = node.base.parent / f"policy-{name}"
    directory.mkdir(exist_ok=True)
    os.chmod(directory, 0o755)
    path = directory / "policy.yaml"
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


def launch(node, launcher, *args, env=None, timeout=300):
    """`launcher ... SHIM args` as the node's user, with the node's environment."""
    full = node.env(env)
    argv = [*launcher, str(SHIM), *map(str, args)]
    if node.user:
        argv = users.as_user_argv(node.user, argv, full)
    elif launcher[0].startswith("mpirun"):
        argv = [launcher[0], "--allow-run-as-root", *argv[1:]]
    return subprocess.run(argv, env=full, capture_output=True, text=True, timeout=timeout,
                          cwd=str(node.work))


MPIRUN = ("mpirun.openmpi", "-np", "4", "--oversubscribe")
MPIEXEC = ("mpiexec.mpich", "-n", "4")


def test_openmpi_mpirun_helloworld_and_ringtest(node, openmpi_image):
    cp = launch(node, MPIRUN, openmpi_image, "python3", "-m", "mpi4py.bench", "helloworld")
    assert cp.returncode == 0, cp.stderr
    lines = sorted(ln for ln in cp.stdout.splitlines() if ln.startswith("Hello, World!"))
    assert lines == [f"Hello, World! I am process {r} of 4 on {os.uname().nodename}."
                     for r in range(4)]
    ring = launch(node, MPIRUN, openmpi_image, "python3", "-m", "mpi4py.bench", "ringtest",
                  "-n", "65536", "-l", "10")
    assert ring.returncode == 0, ring.stderr
    assert "(4 processes, 65536 bytes)" in ring.stdout


def test_mpich_hydra_mpi_hello(node, mpich_image):
    cp = launch(node, MPIEXEC, mpich_image, "mpi_hello")
    assert cp.returncode == 0, cp.stderr
    lines = sorted(ln for ln in cp.stdout.splitlines() if ln.startswith("hello"))
    assert [ln.split()[1:3] + ln.split()[4:] for ln in lines] == [
        [f"rank={r}", "size=4", "sum=6"] for r in range(4)]


def test_host_openmpi_replaces_the_images_compatible_one(node, openmpi_image):
    probe = ("python3 -c 'from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "print(\"size\", c.Get_size())'; grep -c libmpi.so.40 /proc/self/mountinfo")
    cp = launch(node, MPIRUN, "--verbose", "--mpi", "auto", openmpi_image, "sh", "-c", probe)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.count("size 4") == 4
    level = re.search(r"mpi: level (\w+)", cp.stderr)
    hostabi.expect_full_swap(level.group(1) if level else "", cp.stderr.splitlines())
    counts = [int(ln) for ln in cp.stdout.splitlines() if ln.isdigit()]
    assert counts and all(c >= 1 for c in counts)  # the host's libmpi is bound over the image's
    assert "mpi: level full" in cp.stderr
    assert "libmpi.so.40" in cp.stderr and "over the image's" in cp.stderr


def test_incompatible_image_is_refused_with_the_reason(node, mpich_image):
    policy = trusted_policy(node, "fallback", HOST_OMPI_PROFILE.format(defaults=""))
    cp = launch(node, MPIEXEC, "--verbose", "--mpi", "host-ompi", mpich_image, "mpi_hello",
                env={"UCTR_POLICY": policy})
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.count("size=4") == 4  # fell back: the image's MPICH runs
    assert "mpi: step full swap refused (host MPI family openmpi (profile host-ompi) does not " \
           "match the image's mpich-abi" in cp.stderr
    assert "mpi: level fabric" in cp.stderr or "mpi: level none" in cp.stderr
    manifest = next(ln for ln in cp.stderr.splitlines() if "injection manifest (" in ln)
    path = manifest.split("injection manifest (", 1)[1].rstrip("):")
    assert "full swap refused" in Path(path).read_text()


def test_no_fallback_policy_stops_the_job(node, mpich_image):
    policy = trusted_policy(node, "strict", HOST_OMPI_PROFILE.format(
        defaults="defaults:\n  mpi: {profile: host-ompi, fallback: false}"))
    cp = launch(node, MPIEXEC, mpich_image, "mpi_hello", env={"UCTR_POLICY": policy})
    assert cp.returncode != 0
    assert "allows no fallback" in cp.stderr and "hello" not in cp.stdout
