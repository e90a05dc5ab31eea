"""The Slurm version matrix: tests/slurm and scripts/demo on Debian trixie (Slurm 24.11) and
sid (Slurm 26.05), each in its own isolated root (harness.slurmroot), besides the host's
Slurm that the rest of the suite uses.

Each release runs the real tests/slurm inside its root with its own cluster (its own
network, PID and mount namespaces: the host's cluster and its session lock are not shared),
so a release that lacks a plugin shows as the skips tests/slurm itself declares, with their
reasons. The first run builds the roots (mmdebstrap, a few minutes each); later runs reuse
them. UCTR_SLURM_MATRIX=trixie (or sid, or "none") limits the releases.
"""

import re

import pytest

from tests.harness import slurmroot

SUITE_TIMEOUT = 1800  # seconds; tests/slurm takes 1.5-5 minutes in a root on 2 loaded cores
# the runs inside a root exceed the suite's 600 s per-test default when the machine is busy
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(SUITE_TIMEOUT + 300)]

RELEASES = slurmroot.selected_releases()
# What each release is known to lack, as tests/slurm reports it (the skip reason's start).
# Nothing else may skip: the task_init join (tests/slurm/test_slurm_fast_join.py) runs on
# every release, so a release where it regresses fails here.
EXPECTED_SKIPS = {
    "trixie": {},
    "sid": {"this Slurm has no mpi/pmix plugin": 3},
}


@pytest.fixture(scope="module", params=RELEASES)
def release(request):
    why = slurmroot.missing_prerequisites()
    if why:
        pytest.skip(why)
    name = request.param
    root = slurmroot.cached_root(name)
    return name, root


def in_root(release, argv, timeout=SUITE_TIMEOUT):
    name, root = release
    result = slurmroot.run_in_root(name, argv, root=root, timeout=timeout)
    return result, result.stdout + result.stderr


def skip_reasons(output):
    """{reason: count} from pytest's -rs summary lines."""
    reasons = {}
    for count, reason in re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", output, re.M):
        reasons[reason] = reasons.get(reason, 0) + int(count)
    return reasons


def test_the_release_is_what_the_matrix_says(release):
    name, root = release
    result, output = in_root(release, ["slurmd", "-V"], timeout=60)
    assert result.returncode == 0, output
    assert output.split()[1].startswith(slurmroot.RELEASES[name].slurm + "."), output


def test_slurm_suite(release):
    name, _ = release
    result, output = in_root(release, [slurmroot.VENV_PYTHON, "-m", "pytest", "-q", "-rs",
                                       "-p", "no:cacheprovider", "tests/slurm"])
    assert result.returncode == 0, output[-20000:]
    assert re.search(r"^\d+ passed", output, re.M), output[-5000:]
    found = skip_reasons(output)
    expected = EXPECTED_SKIPS[name]
    summary = {prefix: sum(n for reason, n in found.items() if reason.startswith(prefix))
               for prefix in expected}
    assert summary == expected, found
    unexpected = {r: n for r, n in found.items() if not any(r.startswith(p) for p in expected)}
    assert not unexpected, unexpected


def test_demo(release):
    """scripts/demo as the README gives it, in the release: 4 ranks on 2 nodes, and it says
    which MPI launcher it picked for this Slurm."""
    name, _ = release
    result, output = in_root(release, ["scripts/demo"])
    assert result.returncode == 0, output[-20000:]
    assert "demo done" in output, output[-5000:]
    assert re.search(r"^==> 4 ranks on 2 nodes \(node1, node2\)", output, re.M), output[-5000:]
    launcher = "srun --mpi=pmix" if name == "trixie" else "srun --mpi=pmi2"
    assert f"launcher: {launcher}" in output, output[-5000:]


def test_mode_s1_conformance(release):
    """Mode S1 for real where the release packages apptainer (sid: 1.4.5): the conformance
    suite's S1 runs, which skip on a host without apptainer (Debian 12)."""
    name, root = release
    if "apptainer" not in slurmroot.root_info(root)["versions"]:
        pytest.skip(f"Debian {name} has no apptainer package")
    result, output = in_root(release, [slurmroot.VENV_PYTHON, "-m", "pytest", "-q", "-rs",
                                       "-p", "no:cacheprovider", "-k", "S1",
                                       "tests/integration/test_mode_conformance.py"])
    assert result.returncode == 0, output[-20000:]
    assert re.search(r"^\d+ passed", output, re.M), output[-5000:]
    assert not skip_reasons(output), output[-5000:]
