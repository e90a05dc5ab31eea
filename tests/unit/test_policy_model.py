"""NodePolicy as plain data: sizes, ${VARIABLES}, JSON round trip, cheap imports."""

import json
import os
import pwd
import subprocess
import sys

import pytest

from uctr_batch.errors import ConfigError
from uctr_batch.policy import NodePolicy, expand, load_policy, parse_size, path_variables, resolve

from policy_util import EXAMPLE, REPO

SIZES = [("20G", 20 * 1024 ** 3), ("20GiB", 20 * 1024 ** 3), ("20 GB", 20 * 1024 ** 3),
         ("512m", 512 * 1024 ** 2), ("1.5T", int(1.5 * 1024 ** 4)), ("100", 100),
         ("100B", 100), ("2P", 2 * 1024 ** 5), (4096, 4096), ("1k", 1024)]


@pytest.mark.parametrize("text,expected", SIZES)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["20X", "G", "-1G", "1.2.3G", ""])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError, match="not a size"):
        parse_size(text)


VARS = {"UID": "1001", "USER": "alice", "JOB_ID": "42", "HOSTNAME": "n1"}
EXPANSIONS = [
    ("/local/uctr-${UID}", "/local/uctr-1001"),
    ("/scratch/${USER}/${JOB_ID}", "/scratch/alice/42"),
    ("/plain/$UID/path", "/plain/$UID/path"),  # only ${NAME} is expanded
    ("/tmp/${HOSTNAME}-${HOSTNAME}", "/tmp/n1-n1"),
]


@pytest.mark.parametrize("template,expected", EXPANSIONS)
def test_expand(template, expected):
    assert expand(template, VARS) == expected


def test_expand_undefined_variable():
    with pytest.raises(ConfigError) as info:
        expand("/x/${SLURM_JOB_ID}", VARS)
    assert info.value.message == \
        "policy path '/x/${SLURM_JOB_ID}' uses ${SLURM_JOB_ID}, which is not set here"
    assert info.value.hint == "use ${JOB_ID}, which is 'nojob' outside a batch job"


def test_path_variables_come_from_the_password_database():
    entry = pwd.getpwuid(0)
    env = {"USER": "liar", "HOME": "/liar", "PBS_JOBID": "7.pbs"}
    values = path_variables(uid=entry.pw_uid, env=env, node="cn3.example.org")
    assert values == {"UID": str(entry.pw_uid), "GID": str(entry.pw_gid), "USER": entry.pw_name,
                      "HOME": entry.pw_dir, "HOSTNAME": "cn3", "JOB_ID": "7.pbs",
                      "PBS_JOBID": "7.pbs"}
    assert path_variables(uid=entry.pw_uid, env={}, node="n")["JOB_ID"] == "nojob"


def test_node_policy_round_trips_through_json():
    policy = load_policy(EXAMPLE, require_trusted=False)
    for node, partition in (("gpu001", None), ("nid000001", "compute"), ("login1", None)):
        np = resolve(policy, node=node, partition=partition, features=())
        text = json.dumps(np.to_dict(), sort_keys=True)
        again = NodePolicy.from_dict(json.loads(text))
        assert again == np
        assert json.dumps(again.to_dict(), sort_keys=True) == text


def test_cached_node_policy_of_another_format_is_refused():
    np = resolve(load_policy(EXAMPLE, require_trusted=False), node="n", partition=None, features=())
    data = np.to_dict()
    data["format"] = 0
    with pytest.raises(ConfigError, match="cached node policy has format 0, expected 1"):
        NodePolicy.from_dict(data)


def test_reading_a_cached_node_policy_imports_no_yaml(tmp_path):
    """The per-rank path: NodePolicy.from_dict must not pull in yaml/jsonschema/hostlist."""
    np = resolve(load_policy(EXAMPLE, require_trusted=False), node="gpu001", partition=None,
                 features=())
    cached = tmp_path / "node-policy.json"
    cached.write_text(json.dumps(np.to_dict()))
    code = (
        "import json, sys\n"
        "from uctr_batch.policy.model import NodePolicy\n"
        "from uctr_batch.policy.paths import current_fingerprint\n"
        f"np = NodePolicy.from_dict(json.load(open({str(cached)!r})))\n"
        "current_fingerprint()\n"
        "print(np.class_name, sorted(m for m in ('yaml', 'jsonschema', 'hostlist', 'requests',"
        " 'uctr_batch.policy.load') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    assert out == "gpu []\n"
