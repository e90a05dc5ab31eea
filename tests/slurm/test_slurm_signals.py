"""End to end on the real cluster: a containerised task gets the signal state its launcher
(slurmstepd) gives a plain task (issue 10, class 3).

Python ignores SIGPIPE and SIGXFSZ at start-up; before the fix every containerised task
saw them ignored (SigIgn 0000000001001000) and `yes | head -1` ended with "Broken pipe".
Each test compares the container's SigIgn/SigBlk with a plain host task of the same kind
of step on the same node, so it holds whatever slurmstepd's own defaults are.
"""

import re

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Exec'd directly, not through `sh -c`: busybox's sh ignores SIGQUIT around its own applets.
SIGNALS = ["grep", "-E", "^Sig(Ign|Blk):", "/proc/self/status"]
# yes's own exit status, from the left side of the pipe: 141 when SIGPIPE killed it.
PIPE = "(yes; echo \"yes-status=$?\" >&2) | head -1"


@pytest.fixture(scope="module")
def busybox(slurm_cluster, test_images):
    return slurm_cluster.image_ref("busybox")


@pytest.fixture(scope="module")
def uctr_exec(slurm_cluster):
    return str(slurm_cluster.prefix / "bin" / "uctr-exec")


def signal_state(text: str):
    found = dict(re.findall(r"^(SigIgn|SigBlk):\s*([0-9a-f]+)$", text, re.M))
    assert set(found) == {"SigIgn", "SigBlk"}, text
    return found


def srun_ok(cluster, args):
    result = cluster.srun(["-N1", "-n1", "--time=2", *args])
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("how", ["--container-image", "uctr-exec"])
def test_task_in_the_container_sees_the_signal_state_of_a_plain_task(slurm_cluster, busybox,
                                                                     uctr_exec, how):
    host = signal_state(srun_ok(slurm_cluster, SIGNALS).stdout)
    if how == "uctr-exec":
        inside = srun_ok(slurm_cluster, [uctr_exec, busybox, *SIGNALS])
    else:
        inside = srun_ok(slurm_cluster, [f"--container-image={busybox}", *SIGNALS])
    assert signal_state(inside.stdout) == host, inside.stderr


def test_a_pipe_reader_that_exits_kills_the_writer_with_sigpipe(slurm_cluster, busybox):
    result = srun_ok(slurm_cluster, [f"--container-image={busybox}", "sh", "-c", PIPE])
    assert result.stdout.strip() == "y"
    assert "yes-status=141" in result.stderr, result.stderr
    assert "Broken pipe" not in result.stderr
