"""The prolog's job context: environment, SPANK hand-over, Container= from the job record."""

import os
import sys
import types

import pytest

from uctr_batch.batch import job
from uctr_batch.errors import ConfigError

BASE_ENV = {"SLURM_JOB_ID": "123", "SLURM_JOB_UID": "1001", "SLURM_JOB_GID": "1002",
            "SLURM_JOB_USER": "alice", "SLURMD_NODENAME": "node7", "SLURM_JOB_PARTITION": "gpu"}

# A real `scontrol show job -o` line of Slurm 22.05.8 for `sbatch --container=...` (middle
# fields cut). Without --container the Container= field is absent.
SHOW_JOB = ("JobId=8 JobName=job.sh UserId=uctrtest(1001) GroupId=uctrtest(1001) MCS_label=N/A "
            "Priority=0 Nice=0 Account=(null) QOS=(null) JobState=PENDING Reason=JobHeldUser "
            "Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 "
            "Partition=debug AllocNode:Sid=localhost:9403 NumNodes=1 NumCPUs=1 NumTasks=1 "
            "Command=(null) WorkDir=/var/lib/uctr-slurm-test/work StdErr=/dev/null StdIn=/dev/null "
            "StdOut=/dev/null Power= Container=10.200.0.1:5000/debian-openmpi:1 ")


def no_lookup(job_id):
    raise AssertionError("the job record must not be read here")


def test_spank_values_are_the_request():
    env = dict(BASE_ENV, SPANK_UCTR_IMAGE="debian:12", SPANK_UCTR_MODE="R1",
               SPANK_UCTR_MPI="auto", SPANK_UCTR_GPU="none")
    ctx = job.from_env(env, container_lookup=no_lookup)
    assert (ctx.job_id, ctx.uid, ctx.gid, ctx.user, ctx.node, ctx.partition) == \
        ("123", 1001, 1002, "alice", "node7", "gpu")
    assert (ctx.image, ctx.mode, ctx.mpi, ctx.gpu) == ("debian:12", "R1", "auto", "none")
    assert ctx.wants_container


def test_container_option_comes_from_the_job_record():
    seen = []
    ctx = job.from_env(BASE_ENV, container_lookup=lambda j: seen.append(j) or "busybox:1")
    assert seen == ["123"] and ctx.image == "busybox:1" and ctx.mode is None


def test_the_plugins_no_image_flag_spares_the_job_record_lookup():
    ctx = job.from_env(dict(BASE_ENV, SPANK_UCTR_NO_IMAGE="1"), container_lookup=no_lookup)
    assert not ctx.wants_container


@pytest.mark.parametrize("flag", ["", "0", "yes"])
def test_anything_but_the_flag_still_reads_the_job_record(flag):
    seen = []
    job.from_env(dict(BASE_ENV, SPANK_UCTR_NO_IMAGE=flag),
                 container_lookup=lambda j: seen.append(j))
    assert seen == ["123"]


def test_no_container_at_all():
    ctx = job.from_env(BASE_ENV, container_lookup=lambda j: None)
    assert not ctx.wants_container


@pytest.mark.parametrize("missing", ["SLURM_JOB_ID", "SLURM_JOB_UID"])
def test_not_a_prolog_environment(missing):
    env = {k: v for k, v in BASE_ENV.items() if k != missing}
    with pytest.raises(ConfigError, match=missing):
        job.from_env(env, container_lookup=lambda j: None)


def test_gid_defaults_to_the_users_primary_group():
    env = {k: v for k, v in BASE_ENV.items() if k != "SLURM_JOB_GID"}
    env["SLURM_JOB_UID"] = "0"
    assert job.from_env(env, container_lookup=lambda j: None).gid == 0


@pytest.mark.parametrize("line,expected", [
    (SHOW_JOB, "10.200.0.1:5000/debian-openmpi:1"),
    (SHOW_JOB.replace("Container=10.200.0.1:5000/debian-openmpi:1", "Container="), None),
    (SHOW_JOB.replace("Container=10.200.0.1:5000/debian-openmpi:1", ""), None),
    (SHOW_JOB.replace("Container=10.200.0.1:5000/debian-openmpi:1", "Container=(null)"), None),
    ("JobId=5 JobName=x", None),
])
def test_parse_container(line, expected):
    assert job.parse_container(line) == expected


def test_container_field_is_not_confused_with_container_id():
    line = "JobId=1 ContainerID=abc Container=img:1"
    assert job.parse_container(line) == "img:1"


# -- pyslurm: only a contract here (PyPI's pyslurm targets Slurm 25.11, CI has 22.05) ------
@pytest.fixture
def fake_pyslurm(monkeypatch):
    def install(module):
        monkeypatch.setitem(sys.modules, "pyslurm", module)
    return install


@pytest.mark.contract
def test_pyslurm_new_api(fake_pyslurm):
    """pyslurm >= 23.2: pyslurm.Job.load(id) returns a Job with a .container attribute."""
    class Job:
        @staticmethod
        def load(job_id):
            assert job_id == 77 and isinstance(job_id, int)
            return types.SimpleNamespace(container="docker.io/library/debian:12")
    fake_pyslurm(types.SimpleNamespace(Job=Job))
    assert job.job_container("77") == "docker.io/library/debian:12"


@pytest.mark.contract
def test_pyslurm_22_05_api(fake_pyslurm):
    """pyslurm 22.5: pyslurm.job().find_id(str) returns a list of dicts with 'container'."""
    class JobApi:
        def find_id(self, job_id):
            assert job_id == "77"
            return [{"job_id": 77, "container": "quay.io/x/y:2"}]
    fake_pyslurm(types.SimpleNamespace(job=JobApi))
    assert job.job_container("77") == "quay.io/x/y:2"


@pytest.mark.contract
def test_broken_pyslurm_falls_back_to_scontrol(fake_pyslurm, tmp_path, monkeypatch):
    """A pyslurm built for another Slurm raises: the prolog must still find the image."""
    class Job:
        @staticmethod
        def load(job_id):
            raise RuntimeError("slurm_load_job: Invalid protocol version")
    fake_pyslurm(types.SimpleNamespace(Job=Job))
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/sh\n[ \"$*\" = 'show job -o 77' ] || exit 3\necho '{SHOW_JOB}'\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert job.job_container("77") == "10.200.0.1:5000/debian-openmpi:1"


@pytest.mark.contract
def test_scontrol_failure_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyslurm", None)  # import pyslurm -> ImportError
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ConfigError, match="Invalid job id"):
        job.job_container("77")
