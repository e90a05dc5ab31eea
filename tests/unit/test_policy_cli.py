"""`uctr policy check` and `uctr policy explain`, through the real command line."""

import json
import os
import shutil
import uuid

import pytest

from uctr_batch.policy import load_policy, match_trace, resolve
from uctr_batch.policy.explain import explain_text, storage_paths

from policy_util import EXAMPLE, needs_root, user_ids, write_policy


def _copy_example(directory):
    """site-config/ copied to a root-owned place (a checkout may be owned by anyone)."""
    dest = directory / "etc-uctr"
    shutil.copytree(EXAMPLE.parent, dest)
    return dest / "policy.yaml"


def test_check_accepts_the_example(uctr):
    cp = uctr("policy", "check", EXAMPLE, EXAMPLE.parent / "conf.d" / "50-example.yaml")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines() == [
        f"ok: {EXAMPLE} (+1 drop-in): 5 classes, 2 MPI profiles",
        f"ok: {EXAMPLE.parent}/conf.d/50-example.yaml: 2 classes, 0 MPI profiles",
    ]


def test_check_reports_every_problem_with_hints(uctr, tmp_path):
    bad = write_policy(tmp_path, """
        version: 1
        defaults:
          bnids: []
          modes: [N1, N9]
        """)
    cp = uctr("policy", "check", bad)
    assert cp.returncode == 1
    assert cp.stdout == ""
    # (As a non-root user the file is also "not trusted": that warning is tested below.)
    assert [line for line in cp.stderr.splitlines() if not line.startswith("warning:")] == [
        f"error: {bad}:3: defaults.bnids: unknown key 'bnids'",
        "hint: did you mean 'binds'?",
        f"error: {bad}:4: defaults.modes[1]: 'N9' is not one of N1, R1, P1, P2, F1, S1",
        "hint: N1 native userns, R1 crun/runc rootless, P1 proot, P2 proot without seccomp, "
        "F1 fakechroot, S1 apptainer/singularity"]


@needs_root
def test_check_validates_untrusted_files_with_a_warning(uctr, tmp_path):
    uid, gid = user_ids()
    path = write_policy(tmp_path, "version: 1\n")
    os.chown(path, uid, gid)
    cp = uctr("policy", "check", path)
    assert cp.returncode == 0
    assert cp.stderr == (f"warning: {path} is not trusted (is owned by uid {uid}, not root): "
                         "root would refuse it, users ignore it\n")


@needs_root
def test_explain_json_for_a_node(uctr, tmp_path):
    policy = _copy_example(tmp_path)
    cp = uctr("policy", "explain", "--node", "gpu017", "--partition", "batch", "--features",
              "a100,ib", "--json", env={"UCTR_POLICY": policy})
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cp.stdout)
    assert data["policy"]["sources"] == [str(policy), str(policy.parent / "conf.d/50-example.yaml")]
    assert data["classes_tried"] == [
        {"class": "debug", "matched": False, "why": "partition batch is not debug"},
        {"class": "gpu", "matched": True, "why": "hostlist gpu[001-128]"}]
    np = data["node_policy"]
    assert (np["class_name"], np["modes"], np["features"]) == ("gpu", ["N1", "R1"], ["a100", "ib"])
    assert np["storage"]["local_quota_bytes"] == 200 * 1024 ** 3
    not_probed = "not probed (--node names another node)"
    assert data["probes"] == {m: not_probed for m in ("N1", "R1", "P1", "P2")}
    assert data["storage_paths"]["local_dir"] == "/local/nvme/uctr-0"


@needs_root
def test_explain_refuses_an_untrusted_policy_as_root(uctr, tmp_path):
    uid, gid = user_ids()
    policy = _copy_example(tmp_path)
    os.chown(policy, uid, gid)
    cp = uctr("policy", "explain", env={"UCTR_POLICY": policy})
    assert cp.returncode == 1
    assert cp.stderr.startswith(
        f"error: untrusted policy file: {policy}: is owned by uid {uid}, not root\nhint: ")


@pytest.fixture
def shared_dir(harness):
    """A root-owned 0755 directory the test user can read."""
    d = harness.root / f"policy-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


def test_user_ignores_an_untrusted_policy(uctr, shared_dir):
    uid, gid = user_ids()
    policy = write_policy(shared_dir, "version: 1\ndefaults: {modes: [P1], user_modes: [P1]}\n")
    policy.chmod(0o644)
    os.chown(policy, uid, gid)
    cp = uctr("policy", "explain", "--json", env={"UCTR_POLICY": policy}, user="uctrtest")
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr == (f"warning: ignored untrusted policy file {policy}: is owned by uid "
                         f"{uid}, not root; built-in defaults apply\n")
    data = json.loads(cp.stdout)
    assert data["policy"]["builtin"] is True
    assert data["node_policy"]["modes"] == ["N1", "R1", "P1", "P2", "F1", "S1"]


def test_user_reads_a_trusted_policy(uctr, shared_dir):
    policy = write_policy(shared_dir, "version: 1\ndefaults: {modes: [P1], user_modes: [P1]}\n")
    policy.chmod(0o644)
    cp = uctr("policy", "explain", "--json", "-v", env={"UCTR_POLICY": policy}, user="uctrtest")
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cp.stdout)
    assert data["policy"]["builtin"] is False
    assert data["node_policy"]["modes"] == ["P1"] and data["node_policy"]["user_modes"] == ["P1"]


def test_policy_without_action_is_a_usage_error(uctr):
    cp = uctr("policy")
    assert cp.returncode == 2
    assert "error: the following arguments are required: ACTION" in cp.stderr


def test_explain_text_for_the_example():
    policy = load_policy(EXAMPLE, require_trusted=False)
    np = resolve(policy, node="nid000042", partition="compute", features=())
    trace = match_trace(policy.classes, np.node, np.partition, np.features)
    text = explain_text(policy, np, trace, {"N1": "ok"}, storage_paths(np))
    lines = text.splitlines()
    assert lines[1] == "node:       nid000042   partition: compute   features: -"
    assert lines[2] == ('class:      cray: matched class "cray" by hostlist nid[000001-004096] '
                        "and partition compute")
    assert "            skipped gpu: node nid000042 is not in hostlist gpu[001-128]" in lines
    assert "modes:      N1   (tried in this order)" in lines
    assert "  N1: probe: ok" in lines
    assert "user may choose: (none: --mode is refused)" in lines
    assert "  /scratch/${USER} -> /scratch (rw, optional)" in lines
    assert "  set      OMP_PROC_BIND=spread" in lines
    assert "  prepend  PATH=/opt/site/bin:$PATH" in lines
    assert "  local_quota    20G (21474836480 bytes)" in lines
    assert "  stage_timeout  900 s" in lines
    assert "  mirror   docker.io -> https://mirror.example.org https://mirror2.example.org" in lines
    assert ("mpi:        profile cray-mpich (family mpich-abi, abi_check full); "
            "no fallback: refusal is an error") in lines
    assert lines[-1] == ("munge:      bind /run/munge/munge.socket.2   pmix: yes   "
                         "readonly_rootfs: no")


def test_explain_probes_each_mode_on_this_node(uctr, tmp_path):
    """Without --node, every mode of the ladder is probed through the modes registry."""
    cp = uctr("policy", "explain", "--json", env={"UCTR_POLICY": None})
    assert cp.returncode == 0, cp.stderr
    probes = json.loads(cp.stdout)["probes"]
    assert list(probes) == ["N1", "R1", "P1", "P2", "F1", "S1"]
    for mode, words in probes.items():
        known = ("ok", "unavailable: ", "(mode not available", "(modes not available")
        assert words.startswith(known), (mode, words)
