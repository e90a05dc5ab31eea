"""Trust: root-owned, not group/world-writable files and directories only; fingerprints."""

import os
import shutil

import pytest

from uctr_batch.errors import ConfigError
from uctr_batch.policy import (
    current_fingerprint, load_policy, policy_fingerprint, resolve, untrusted_reason,
    watched_paths,
)
from uctr_batch.policy.load import TRUST_HINT

from policy_util import needs_root, user_ids, write_policy

POLICY = """
    version: 1
    defaults:
      modes: [P1]
      user_modes: []
"""


def _user_owns_file(d):
    uid, gid = user_ids()
    p = write_policy(d, POLICY)
    os.chown(p, uid, gid)
    return p, f"is owned by uid {uid}, not root"


def _group_writable(d):
    p = write_policy(d, POLICY)
    p.chmod(0o664)
    return p, "is writable by group (mode 0664)"


def _world_writable(d):
    p = write_policy(d, POLICY)
    p.chmod(0o646)
    return p, "is writable by others (mode 0646)"


def _user_owns_directory(d):
    uid, gid = user_ids()
    etc = d / "etc"
    p = write_policy(etc, POLICY)
    os.chown(etc, uid, gid)
    return p, f"its directory {etc} is owned by uid {uid}, not root"


def _writable_directory(d):
    etc = d / "etc"
    p = write_policy(etc, POLICY)
    etc.chmod(0o775)
    return p, f"its directory {etc} is writable by group (mode 0775)"


def _symlink_to_user_file(d):
    target, _ = _user_owns_file(d / "home")
    link = d / "etc" / "policy.yaml"
    link.parent.mkdir()
    link.symlink_to(target)
    uid, _ = user_ids()
    return link, f"is owned by uid {uid}, not root"


def _user_owns_dropin(d):
    uid, gid = user_ids()
    write_policy(d, POLICY)
    dropin = write_policy(d, "version: 1\ndefaults: {user_modes: [N1, R1, P1]}\n",
                          "conf.d/50-me.yaml")
    os.chown(dropin, uid, gid)
    return dropin, f"is owned by uid {uid}, not root"


UNTRUSTED = [_user_owns_file, _group_writable, _world_writable, _user_owns_directory,
             _writable_directory, _symlink_to_user_file, _user_owns_dropin]


@needs_root
def test_root_owned_policy_is_trusted(tmp_path):
    path = write_policy(tmp_path, POLICY)
    assert untrusted_reason(path) is None
    policy = load_policy(path, euid=1001)
    assert not policy.builtin and policy.defaults["modes"] == ["P1"]


@needs_root
def test_sticky_world_writable_parent_is_accepted(tmp_path):
    shared = tmp_path / "shared"
    path = write_policy(shared, POLICY)
    shared.chmod(0o1777)  # like /tmp: nobody can replace root's entry below it
    assert untrusted_reason(path) is None
    shared.chmod(0o777)
    assert untrusted_reason(path) == f"its directory {shared} is writable by group (mode 0777)"


@needs_root
@pytest.mark.parametrize("setup", UNTRUSTED, ids=[f.__name__.strip("_") for f in UNTRUSTED])
def test_untrusted_policy_is_refused_as_root(tmp_path, setup):
    bad, reason = setup(tmp_path)
    main = bad if bad.parent.name != "conf.d" else bad.parent.parent / "policy.yaml"
    with pytest.raises(ConfigError) as info:
        load_policy(main, euid=0)
    assert info.value.message == f"untrusted policy file: {bad}: {reason}"
    assert info.value.hint == TRUST_HINT


@needs_root
@pytest.mark.parametrize("setup", UNTRUSTED, ids=[f.__name__.strip("_") for f in UNTRUSTED])
def test_untrusted_policy_is_ignored_for_users(tmp_path, setup):
    bad, reason = setup(tmp_path)
    main = bad if bad.parent.name != "conf.d" else bad.parent.parent / "policy.yaml"
    uid, _ = user_ids()
    policy = load_policy(main, euid=uid)
    assert policy.builtin
    assert policy.notes == (
        f"ignored untrusted policy file {bad}: {reason}; built-in defaults apply",)
    np = resolve(policy, node="n1", partition=None, features=())
    assert np.modes == ("N1", "R1", "P1", "P2", "F1", "S1")  # not the file's [P1]
    # Tests (and `uctr policy check`) may read it without trusting it.
    assert load_policy(main, require_trusted=False).defaults["modes"] == ["P1"]


def test_fingerprint_follows_every_change(tmp_path):
    path = write_policy(tmp_path, POLICY)
    watched = lambda: watched_paths(path)  # noqa: E731 - re-listed: drop-ins come and go
    seen = {policy_fingerprint(watched())}
    assert policy_fingerprint(watched()) in seen  # stable while nothing changes

    def changed() -> bool:
        fp = policy_fingerprint(watched())
        new = fp not in seen
        seen.add(fp)
        return new

    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert changed(), "mtime"
    path.write_text(path.read_text() + "# longer\n")
    assert changed(), "size"
    replacement = tmp_path / "new.yaml"
    shutil.copy2(path, replacement)
    os.replace(replacement, path)
    assert changed(), "inode (atomic replace, same mtime and size)"
    path.chmod(0o600)
    assert changed(), "ctime (chmod changes trust, not mtime)"
    write_policy(tmp_path, "version: 1\n", "conf.d/10-x.yaml")
    assert changed(), "drop-in added"
    (tmp_path / "conf.d" / "10-x.yaml").unlink()
    assert changed(), "drop-in removed"
    path.unlink()
    assert changed(), "policy removed"


def test_node_policy_carries_the_fingerprint(tmp_path):
    path = write_policy(tmp_path, POLICY)
    env = {"UCTR_POLICY": str(path)}
    policy = load_policy(env=env, require_trusted=False)
    np = resolve(policy, node="n1", partition=None, features=())
    assert np.fingerprint == current_fingerprint(env)
    assert np.sources == (str(path),)
    path.write_text(POLICY + "# edited\n")
    assert np.fingerprint != current_fingerprint(env)
