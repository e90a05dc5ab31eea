"""The environment precedence every mode shares, as a table.

image Env < policy set < prepend/append < unset < host passthrough < user -e
"""

import pytest

from uctr_batch import envspec
from uctr_batch.policy.model import DEFAULT_PASSTHROUGH, EnvRules

RULES = EnvRules(set={"SITE": "site", "OMP_PROC_BIND": "close", "IMG": "site-wins"},
                 prepend={"PATH": "/opt/site/bin", "NEWPRE": "/p"},
                 append={"MANPATH": "/opt/site/man", "NEWAPP": "/a"},
                 unset=("LD_PRELOAD", "SITE_UNSET"),
                 passthrough=DEFAULT_PASSTHROUGH + ("UCX_*", "LANG", "FI_?ROVIDER"))
IMAGE = ["PATH=/usr/bin:/bin", "IMG=image", "IMG_ONLY=1", "MANPATH=/usr/man", "LD_PRELOAD=/x.so",
         "SLURM_FOO=image", "HOME=/root", "SITE_UNSET=gone", "EMPTY=", "EQ=a=b"]
HOST = {"SLURM_FOO": "host", "SLURM_JOB_ID": "42", "PMI_FD": "7", "PMIX_RANK": "0",
        "OMPI_COMM_WORLD_RANK": "3", "PBS_JOBID": "9.pbs", "PALS_RANKID": "1",
        "CUDA_VISIBLE_DEVICES": "0,1", "TERM": "xterm", "HOME": "/home/u", "USER": "u",
        "UCX_TLS": "rc", "LANG": "C.UTF-8", "FI_PROVIDER": "cxi", "PATH": "/host/bin",
        "SECRET": "host-only", "LD_PRELOAD": "/host.so", "SLURMD_NODENAME": "n1",
        "PMI_SIZE": "4", "NOT_PASSED": "x"}


@pytest.fixture(scope="module")
def env():
    return envspec.build_env(IMAGE, RULES, HOST, ["USER_VAR=u", "SLURM_JOB_ID=override",
                                                  "TERM", "NOT_ON_HOST", "SET_TWICE=1", "SET_TWICE=2"])


@pytest.mark.parametrize("key, expected, why", [
    ("IMG_ONLY", "1", "image Env is the base"),
    ("EMPTY", "", "an empty image value stays set"),
    ("EQ", "a=b", "only the first '=' splits"),
    ("IMG", "site-wins", "policy set overrides the image"),
    ("SITE", "site", "policy set adds"),
    ("PATH", "/opt/site/bin:/usr/bin:/bin", "policy prepend; host PATH never passes"),
    ("NEWPRE", "/p", "prepend to an unset variable: no stray colon"),
    ("MANPATH", "/usr/man:/opt/site/man", "policy append"),
    ("NEWAPP", "/a", "append to an unset variable: no stray colon"),
    ("SLURM_FOO", "host", "passthrough overrides the image"),
    ("HOME", "/home/u", "HOME passes through, over the image's"),
    ("USER", "u", "USER passes through"),
    ("PMI_FD", "7", "PMI_* passes"), ("PMIX_RANK", "0", "PMIX_* passes"),
    ("OMPI_COMM_WORLD_RANK", "3", "OMPI_* passes"), ("PBS_JOBID", "9.pbs", "PBS_* passes"),
    ("PALS_RANKID", "1", "PALS_* passes"), ("CUDA_VISIBLE_DEVICES", "0,1", "GPU list passes"),
    ("UCX_TLS", "rc", "policy passthrough pattern"), ("LANG", "C.UTF-8", "policy exact name"),
    ("FI_PROVIDER", "cxi", "'?' patterns go through fnmatch"),
    ("SLURM_JOB_ID", "override", "-e beats passthrough"),
    ("USER_VAR", "u", "-e adds"),
    ("TERM", "xterm", "-e NAME copies the host value"),
    ("SET_TWICE", "2", "the last -e wins"),
])
def test_value(env, key, expected, why):
    assert env.get(key) == expected, why


@pytest.mark.parametrize("key, why", [
    ("LD_PRELOAD", "policy unset removes the image value, and the host's is not passed"),
    ("SITE_UNSET", "policy unset"),
    ("SECRET", "host variables outside passthrough are dropped"),
    ("NOT_PASSED", "host variables outside passthrough are dropped"),
    ("SLURMD_NODENAME", "SLURM_* needs the underscore"),
    ("NOT_ON_HOST", "-e NAME of a variable the host lacks removes it"),
])
def test_absent(env, key, why):
    assert key not in env, why


def test_passthrough_beats_policy_set_and_unset():
    rules = EnvRules(set={"SLURM_X": "site"}, unset=("PMI_FD",), passthrough=("SLURM_*", "PMI_*"))
    env = envspec.build_env([], rules, {"SLURM_X": "host", "PMI_FD": "5"})
    assert env["SLURM_X"] == "host" and env["PMI_FD"] == "5"


def test_default_path_when_the_image_has_none():
    env = envspec.build_env(["A=1"], EnvRules(), {})
    assert env == {"A": "1", "PATH": envspec.DEFAULT_PATH}


def test_minus_e_can_remove_an_image_variable():
    env = envspec.build_env(["GONE=1"], EnvRules(), {}, ["GONE"])
    assert "GONE" not in env


def test_bad_minus_e_is_a_usage_error():
    from uctr_batch.errors import UsageError

    with pytest.raises(UsageError):
        envspec.build_env([], EnvRules(), {}, ["=x"])


@pytest.mark.parametrize("name, patterns, expected", [
    ("SLURM_JOB_ID", ("SLURM_*",), True),
    ("SLURM", ("SLURM_*",), False),
    ("XSLURM_A", ("SLURM_*",), False),
    ("TERM", ("TERM",), True),
    ("TERMINAL", ("TERM",), False),
    ("FI_PROVIDER", ("FI_?ROVIDER",), True),
    ("A1", ("A[0-9]",), True),
    ("MPI_LOCALRANKID", DEFAULT_PASSTHROUGH, True),
])
def test_matches(name, patterns, expected):
    assert envspec.matches(name, patterns) is expected
