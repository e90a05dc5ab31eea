"""A joining rank computes its argv and environment without run.py and inject.plan: the
results must be those of run.build_spec and InjectionPlan.apply_env."""

import pytest

from uctr_batch import run
from uctr_batch.errors import UsageError
from uctr_batch.inject.plan import InjectionPlan
from uctr_batch.launch import procspec
from uctr_batch.policy.model import NodePolicy, builtin_body, merge_body


def _full_plan():
    plan = InjectionPlan()
    plan.env.update(PMIX_MCA_gds="hash", LD_PRELOAD="/x.so", KEEP="plan")
    plan.env_defaults.update(OMPI_MCA_btl="self,vader", KEEP="default", NEW_DEFAULT="d")
    plan.env_unset.extend(["UNSET_ME", "LD_PRELOAD"])
    plan.env_prepend.update(MANPATH="/opt/man", EMPTY_PRE="/pre")
    plan.env_append.update(FI_PROVIDER_PATH="/opt/fi", EMPTY_APP="/app")
    plan.ld_library_path.extend(["/.uctr/lib", "/opt/a"])
    plan.path_prefix.append("/.uctr/bin")
    return plan


BASES = [
    {},
    {"UNSET_ME": "1", "KEEP": "base", "MANPATH": "/usr/man:/opt/man", "FI_PROVIDER_PATH": "/f",
     "LD_LIBRARY_PATH": "/opt/a:/usr/lib", "PATH": "/usr/bin:/.uctr/bin", "LD_PRELOAD": "/y"},
]


@pytest.mark.parametrize("base", BASES)
def test_apply_env_ops_is_apply_env(base):
    plan = _full_plan()
    assert procspec.apply_env_ops(procspec.ops_of(plan), base) == plan.apply_env(base)


def test_every_environment_field_of_the_plan_is_carried():
    """A new env-like field in InjectionPlan must be added to procspec.OPS_FIELDS."""
    env_like = {name for name in InjectionPlan().to_dict()
                if name.startswith("env") or name in ("ld_library_path", "path_prefix")}
    assert env_like == set(procspec.OPS_FIELDS)


def _policy(body=None):
    merged = merge_body(builtin_body(), body or {})
    return NodePolicy.from_body(merged, {}, node="n", partition=None, features=(),
                                class_name=None, reason="test")


CONFIGS = [
    ({"Entrypoint": ["/entry"], "Cmd": ["default"], "Env": ["PATH=/img/bin", "A=image"]},
     ["x", "y"]),
    ({"Entrypoint": ["/entry"], "Cmd": ["default"]}, []),
    ({"Cmd": ["sh", "-c", "true"], "Env": ["B=1"]}, []),
    ({}, ["cmd"]),
]


@pytest.mark.parametrize("config,command", CONFIGS)
def test_argv_and_env_are_build_specs(config, command, tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    policy = _policy({"env": {"set": {"A": "policy", "S": "1"}, "prepend": {"PATH": "/site/bin"},
                              "append": {"MANPATH": "/site/man"}, "unset": ["DROP"],
                              "passthrough": ["LANG", "UCX_*"]}})
    host_env = {"SLURM_PROCID": "3", "UCX_TLS": "sm", "LANG": "C", "SECRET": "no",
                "HOME": str(tmp_path), "FROM_HOST": "h"}
    user_env = ["U=1", "FROM_HOST", "DROP"]
    spec = run.build_spec(run.Target(str(rootfs), config), policy, command=command,
                          user_env=user_env, host_env=host_env, host_cwd="/",
                          scratch=str(tmp_path / "scratch"))
    assert procspec.compose_argv(config, command) == list(spec.argv)
    assert procspec.base_env(config, policy.to_dict(), host_env, user_env) == spec.env


def test_no_command_at_all():
    with pytest.raises(UsageError):
        procspec.compose_argv({}, [])


def test_finish_env_order():
    """Launcher variables, then the step's injection, then GPU visibility, then -e."""
    extras = {"ops": {"env": {"PMIX_MCA_gds": "hash", "X": "plan"},
                      "ld_library_path": ["/.uctr/lib"]},
              "passthrough_prefixes": ["PMIX_", "SLURM_"], "passthrough_names": ["ODD"]}
    host = {"PMIX_RANK": "2", "SLURM_LOCALID": "1", "ODD": "o", "OTHER": "no",
            "CUDA_VISIBLE_DEVICES": "3", "X": "host"}
    env = procspec.finish_env({"LD_LIBRARY_PATH": "/usr/lib", "PATH": "/bin"}, host, extras,
                              {"CUDA_VISIBLE_DEVICES": "0"}, ["X=user"])
    assert env == {"LD_LIBRARY_PATH": "/.uctr/lib:/usr/lib", "PATH": "/bin", "PMIX_RANK": "2",
                   "SLURM_LOCALID": "1", "ODD": "o", "PMIX_MCA_gds": "hash",
                   "CUDA_VISIBLE_DEVICES": "0", "X": "user"}
