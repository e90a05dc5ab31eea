"""The batch hooks' memory of validated policy bytes (policy/validated.py): a hit skips only
parsing and validation of the very bytes that passed before; trust is still checked on
every load, a change of content is never missed (not even one that keeps size and mtime),
an invalid policy is never kept, and an entry someone else could have written is not read."""

import marshal
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uctr_batch.errors import ConfigError
from uctr_batch.policy import PolicyInvalid, load_policy, validated

from policy_util import REPO, needs_root, user_ids, write_policy

POLICY = """
    version: 1
    defaults:
      modes: [P1, R1]
      user_modes: [R1]
"""
INVALID = POLICY.replace("user_modes: [R1]", "user_modez: [R1]")  # same size, unknown key


def _load(policy: Path, cache: Path):
    return load_policy(policy, euid=os.geteuid(), validated_dir=cache)


def _fields(p):
    return (p.path, p.defaults, p.classes, p.mpi_profiles, p.sources, p.fingerprint, p.builtin)


def test_a_hit_is_the_same_policy_as_a_fresh_validation(tmp_path):
    policy, cache = write_policy(tmp_path / "etc", POLICY), tmp_path / "run-policy"
    fresh = load_policy(policy, euid=os.geteuid())
    assert _fields(_load(policy, cache)) == _fields(fresh)  # miss: validated, then kept
    assert (cache / validated.NAME).is_file()
    assert _fields(_load(policy, cache)) == _fields(fresh)  # hit


def test_a_hit_imports_neither_yaml_nor_jsonschema(tmp_path):
    """What the cache is for: the warm prolog and epilog skip the YAML and schema stacks."""
    policy, cache = write_policy(tmp_path / "etc", POLICY), tmp_path / "run-policy"
    code = ("import sys; from uctr_batch.policy import load_policy; "
            f"p = load_policy({str(policy)!r}, euid={os.geteuid()}, "
            f"validated_dir={str(cache)!r}); "
            "print(p.defaults['user_modes'], 'yaml' in sys.modules, 'jsonschema' in sys.modules)")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, check=True).stdout.split() for _ in range(2)]
    assert runs[0] == ["['R1']", "True", "True"]  # the first load validates
    assert runs[1] == ["['R1']", "False", "False"]


def test_changed_bytes_are_validated_again_even_with_the_same_size_and_mtime(tmp_path):
    policy, cache = write_policy(tmp_path / "etc", POLICY), tmp_path / "run-policy"
    _load(policy, cache)
    st = os.stat(policy)
    write_policy(tmp_path / "etc", INVALID)
    os.utime(policy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(policy).st_size == st.st_size
    with pytest.raises(PolicyInvalid):
        _load(policy, cache)
    write_policy(tmp_path / "etc", POLICY.replace("user_modes: [R1]", "user_modes: [P1]"))
    assert _load(policy, cache).defaults["user_modes"] == ["P1"]


def test_a_drop_in_added_later_is_seen(tmp_path):
    policy, cache = write_policy(tmp_path / "etc", POLICY), tmp_path / "run-policy"
    _load(policy, cache)
    write_policy(tmp_path / "etc", "version: 1\ndefaults: {user_modes: [P1]}\n", "conf.d/50.yaml")
    assert _load(policy, cache).defaults["user_modes"] == ["P1"]


def test_an_invalid_policy_is_never_kept(tmp_path):
    policy, cache = write_policy(tmp_path / "etc", INVALID), tmp_path / "run-policy"
    for _ in range(2):
        with pytest.raises(PolicyInvalid):
            _load(policy, cache)
    assert not (cache / validated.NAME).exists()


@needs_root
def test_trust_is_checked_on_every_load(tmp_path):
    """A hit never stands in for the trust check: a policy (or its directory) made
    writable by others after it was validated is refused as root."""
    etc = tmp_path / "etc"
    policy, cache = write_policy(etc, POLICY), tmp_path / "run-policy"
    load_policy(policy, euid=0, validated_dir=cache)
    policy.chmod(0o664)
    with pytest.raises(ConfigError, match="writable by group"):
        load_policy(policy, euid=0, validated_dir=cache)
    policy.chmod(0o644)
    etc.chmod(0o777)
    with pytest.raises(ConfigError, match=f"its directory {etc} is writable"):
        load_policy(policy, euid=0, validated_dir=cache)


def _forged_entry(policy: Path) -> bytes:
    """An entry under the right key that grants every mode to users."""
    wanted = validated.key([(str(policy), policy.read_text())])
    forged = ({"modes": ["P1", "R1"], "user_modes": ["N1", "R1", "P1", "P2", "F1"]}, [], {})
    return marshal.dumps({"key": wanted, "merged": forged})


@needs_root
@pytest.mark.parametrize("how", ["dir-of-another-user", "group-writable-dir",
                                 "file-of-another-user", "symlink", "hard-link"])
def test_an_entry_someone_else_could_write_is_not_read(tmp_path, how):
    uid, gid = user_ids()
    policy, cache = write_policy(tmp_path / "etc", POLICY), tmp_path / "run-policy"
    cache.mkdir(mode=0o755)
    entry = cache / validated.NAME
    if how == "symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.write_bytes(_forged_entry(policy))
        elsewhere.chmod(0o600)
        entry.symlink_to(elsewhere)
    elif how == "hard-link":
        entry.write_bytes(_forged_entry(policy))
        entry.chmod(0o600)
        os.link(entry, tmp_path / "second-name")
    else:
        entry.write_bytes(_forged_entry(policy))
        entry.chmod(0o600)
        if how == "dir-of-another-user":
            os.chown(cache, uid, gid)
        elif how == "group-writable-dir":
            cache.chmod(0o775)
        else:
            os.chown(entry, uid, gid)
    assert load_policy(policy, euid=0, validated_dir=cache).defaults["user_modes"] == ["R1"]


@needs_root
def test_root_own_entry_is_what_a_hit_returns(tmp_path):
    """The control for the test above: the same forged entry, root's own in root's own
    directory, is read (so the refusals there come from the checks, not from the key)."""
    policy, cache = write_policy(tmp_path / "etc", POLICY), tmp_path / "run-policy"
    cache.mkdir(mode=0o755)
    (cache / validated.NAME).write_bytes(_forged_entry(policy))
    (cache / validated.NAME).chmod(0o600)
    assert "F1" in load_policy(policy, euid=0, validated_dir=cache).defaults["user_modes"]
