"""The per-node policy cache of uctr-exec: reused without yaml, invalidated by the policy
files' fingerprint, and in step with the modules whose rules it repeats without their
imports (policy.paths, policy.model, settings, batch.stage)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from uctr_batch import settings
from uctr_batch.batch import stage
from uctr_batch.errors import ConfigError, ModeError
from uctr_batch.launch import policy_cache
from uctr_batch.policy import NodePolicy, paths
from uctr_batch.policy.model import expand as model_expand
from uctr_batch.policy.model import path_variables as model_path_variables

from policy_util import needs_root, write_policy

REPO = Path(__file__).resolve().parents[2]

POLICY = """
    version: 1
    defaults:
      modes: [N1, P1]
      user_modes: [N1, P1, P2]
      storage: {stage_timeout: 42, local_dir: "/tmp/uctr-test-${UID}-${JOB_ID}"}
    classes:
      - name: dbg
        match: {partition: debug}
        modes: [P1]
"""


@pytest.fixture
def env(tmp_path):
    policy = write_policy(tmp_path / "etc", POLICY)
    return {"UCTR_POLICY": str(policy), "UCTR_LOCAL_DIR": str(tmp_path / "local"),
            "SLURMD_NODENAME": "cn01", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path)}


def _child(env):
    code = ("import sys; from uctr_batch.launch import policy_cache as p; d = p.load(); "
            "print(','.join(d['modes']), 'yaml' in sys.modules, 'jsonschema' in sys.modules)")
    return subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True)


def _load_in_child(env):
    """policy_cache.load() in a fresh interpreter: (modes, yaml imported?, jsonschema?)."""
    cp = _child(env)
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout.split()
    return out[0], out[1] == "True", out[2] == "True"


@needs_root
def test_cached_policy_is_reused_without_yaml_and_invalidated_by_changes(env):
    assert _load_in_child(env) == ("N1,P1", True, True)  # resolved: yaml and schema
    assert _load_in_child(env) == ("N1,P1", False, False)  # cached
    stem = policy_cache.cache_stem(env)
    assert os.path.isfile(stem + ".json") and os.path.isfile(stem + ".marshal")
    policy = Path(env["UCTR_POLICY"])
    policy.write_text(policy.read_text().replace("modes: [N1, P1]", "modes: [P1, N1]"))
    assert _load_in_child(env) == ("P1,N1", True, True)
    dropin = write_policy(policy.parent / "conf.d", "version: 1\ndefaults: {modes: [P2]}\n",
                          "10-x.yaml")
    assert _load_in_child(env)[0] == "P2"
    assert _load_in_child(env) == ("P2", False, False)
    os.chmod(dropin, 0o664)  # changes only ctime (and trust): still noticed
    cp = _child(env)
    assert cp.returncode != 0 and "untrusted policy file" in cp.stderr  # root: an error


@needs_root
def test_partition_and_node_have_their_own_entries(env):
    assert policy_cache.load(env)["modes"] == ["N1", "P1"]
    debug = dict(env, SLURM_JOB_PARTITION="debug")
    assert policy_cache.load(debug)["modes"] == ["P1"]
    assert policy_cache.cache_stem(debug) != policy_cache.cache_stem(env)
    assert policy_cache.read_cached(env)["modes"] == ["N1", "P1"]
    assert policy_cache.read_cached(dict(env, SLURMD_NODENAME="cn02")) is None


def test_an_entry_of_another_user_is_ignored(env, tmp_path):
    policy_cache.store(env, {"modes": ["N1"]},
                       policy_cache.stat_rows(policy_cache.watched_paths(env["UCTR_POLICY"])))
    assert policy_cache.read_cached(env) == {"modes": ["N1"]}
    if os.geteuid() != 0:
        pytest.skip("needs root to chown the entry")
    os.chown(policy_cache.cache_stem(env) + ".marshal", 12345, 12345)
    assert policy_cache.read_cached(env) is None


def test_watched_paths_are_the_fingerprinted_ones(env):
    path = env["UCTR_POLICY"]
    write_policy(Path(path).parent / "conf.d", "version: 1\n", "20-b.yaml")
    write_policy(Path(path).parent / "conf.d", "version: 1\n", "10-a.yaml")
    write_policy(Path(path).parent / "conf.d", "version: 1\n", ".hidden.yaml")
    assert policy_cache.watched_paths(path) == [str(p) for p in paths.watched_paths(Path(path))]


def test_default_dirs_follow_settings(monkeypatch, tmp_path):
    for variables in ({},
                      {"UCTR_LOCAL_DIR": str(tmp_path / "l"), "UCTR_CACHE": str(tmp_path / "c")},
                      {"XDG_CACHE_HOME": str(tmp_path / "x")}):
        for name in ("UCTR_LOCAL_DIR", "UCTR_CACHE", "XDG_CACHE_HOME"):
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        assert policy_cache.local_base() == str(settings.default_local_dir())
        assert policy_cache.default_cache_dir() == str(settings.default_cache_dir())


@pytest.mark.parametrize("user_dirs", [False, True], ids=["policy", "UCTR_CACHE-set"])
@pytest.mark.parametrize("storage", [
    {},
    {"local_dir": "/local/uctr-${UID}-${USER}", "cache_dir": "/shared/${HOSTNAME}/c"},
    {"local_dir": "/l/${JOB_ID}/${SLURM_JOB_ID}", "cache_dir": "${HOME}/cache"},
])
def test_storage_dirs_are_stage_storage_dirs(storage, user_dirs, monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    for name in ("UCTR_CACHE", "UCTR_LOCAL_DIR"):
        monkeypatch.delenv(name, raising=False)
        if user_dirs:
            monkeypatch.setenv(name, str(tmp_path / name))
    body = {"storage": dict({"cache_dir": None, "local_dir": None}, **storage)}
    node_policy = NodePolicy.from_dict(_policy_dict(body))
    expected = tuple(str(p) for p in stage.storage_dirs(node_policy))
    assert policy_cache.storage_dirs(node_policy.to_dict(), os.environ) == expected
    if user_dirs:  # the user's own directories beat the site's templates (docs/user-guide.md)
        assert expected == (str(tmp_path / "UCTR_CACHE"), str(tmp_path / "UCTR_LOCAL_DIR"))


def test_expand_is_model_expand():
    env = {"SLURM_JOB_ID": "77"}
    variables = policy_cache.path_variables(env)
    assert variables == model_path_variables(env=env)
    template = "/a/${USER}/${UID}-${JOB_ID}/x${SLURM_JOB_ID}"
    assert policy_cache.expand(template, variables) == model_expand(template, variables)
    with pytest.raises(ConfigError):
        policy_cache.expand("/a/${PBS_JOBID}", variables)


def test_stage_timeout():
    policy = {"storage": {"stage_timeout": 42}}
    assert policy_cache.stage_timeout(policy, {}) == 42
    assert policy_cache.stage_timeout(policy, {"UCTR_STAGE_TIMEOUT": "2.5"}) == 2.5
    assert policy_cache.stage_timeout({}, {}) == 600
    with pytest.raises(ConfigError):
        policy_cache.stage_timeout(policy, {"UCTR_STAGE_TIMEOUT": "soon"})


def test_mode_ladder():
    policy = _policy_dict({"modes": ["N1", "P1"], "user_modes": ["P1"]})
    assert policy_cache.mode_ladder(policy) == ("N1", "P1")
    assert policy_cache.mode_ladder(policy, "P1") == ("P1",)
    with pytest.raises(ModeError) as info:
        policy_cache.mode_ladder(policy, "N1")
    assert "not allowed" in info.value.message


def _policy_dict(body):
    from uctr_batch.policy.model import builtin_body, merge_body

    merged = merge_body(builtin_body(), body)
    return NodePolicy.from_body(merged, {}, node="cn01", partition=None, features=(),
                                class_name=None, reason="test").to_dict()
