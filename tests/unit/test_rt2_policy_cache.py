"""Red-team regressions (issue 10, second pass): uctr-exec's per-user policy cache in a
node-local directory that another user planted. What the cache says steers every rank
(modes, binds, storage), so a cache another user can place must never be read, and with
the fallback root prepared for the user the cache lives there instead."""

import marshal
import os
from pathlib import Path

import pytest

from uctr_batch.batch import location, privdrop
from uctr_batch.launch import policy_cache

from policy_util import write_policy

NOBODY, USER = 65534, "uctrtest"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plants other users' files: root")


@pytest.fixture
def node():
    import pwd
    import shutil
    import tempfile

    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"needs the user {USER}")
    tmp_path = Path(tempfile.mkdtemp(prefix="uctr-rt2-"))  # pytest's is 0700: the user
    tmp_path.chmod(0o755)  # must read the policy
    yield from _node(tmp_path, user)
    shutil.rmtree(tmp_path, ignore_errors=True)


def _node(tmp_path, user):
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    policy = write_policy(tmp_path / "etc", "version: 1\ndefaults:\n  modes: [N1]\n")
    env = {"UCTR_POLICY": str(policy), "UCTR_LOCAL_DIR": str(shared / f"uctr-{user.pw_uid}"),
           "UCTR_RUN_DIR": str(tmp_path / "run"), "SLURMD_NODENAME": "cn01"}
    yield shared, user, env


def forged(env) -> bytes:
    """A cache entry that passes every content check, as another user would write it."""
    return marshal.dumps({"key": policy_cache._identity(env),
                          "watch": policy_cache.stat_rows(policy_cache.watched_paths(
                              env["UCTR_POLICY"])),
                          "policy": {"modes": ["FORGED"], "storage": {"local_dir": "/evil"}}})


def as_user(user, func, *args):
    return privdrop.run_as(privdrop.Identity.of(user.pw_uid), func, *args, timeout=30)


def _read(env):
    return policy_cache.read_cached(env)


def test_a_cache_in_a_local_dir_another_user_planted_is_not_read(node):
    shared, user, env = node
    base = Path(env["UCTR_LOCAL_DIR"])
    base.mkdir(mode=0o777)
    base.chmod(0o777)
    os.chown(base, NOBODY, NOBODY)
    (base / "policy").mkdir()
    os.chown(base / "policy", NOBODY, NOBODY)
    entry = base / "policy" / "cn01.marshal"
    # the user's own file under another user's directory: linked in (protected_hardlinks=0)
    # or renamed in from elsewhere; root stands in for that here
    entry.write_bytes(forged(env))
    os.chown(entry, user.pw_uid, user.pw_gid)
    assert as_user(user, _read, env) is None  # was {"modes": ["FORGED"], ...}


def test_the_users_own_private_cache_is_read(node):
    shared, user, env = node
    base = Path(env["UCTR_LOCAL_DIR"])
    (base / "policy").mkdir(parents=True, mode=0o700)
    entry = base / "policy" / "cn01.marshal"
    entry.write_bytes(forged(env))
    for p in (base, base / "policy", entry):
        os.chown(p, user.pw_uid, user.pw_gid)
    assert as_user(user, _read, env)["modes"] == ["FORGED"]  # the checks above are not moot


def test_a_hard_linked_cache_entry_is_not_read(node):
    shared, user, env = node
    base = Path(env["UCTR_LOCAL_DIR"])
    (base / "policy").mkdir(parents=True, mode=0o700)
    for d in (base, base / "policy"):
        os.chown(d, user.pw_uid, user.pw_gid)
    elsewhere = shared / "blob"  # a file of the user's whose bytes someone else chose
    elsewhere.write_bytes(forged(env))
    os.chown(elsewhere, user.pw_uid, user.pw_gid)
    os.link(elsewhere, base / "policy" / "cn01.marshal")
    assert as_user(user, _read, env) is None


def _store_and_read(env):
    policy_cache.resolve_and_store(env)
    return policy_cache.cache_stem(env), policy_cache.read_cached(env)


def test_with_a_planted_local_dir_the_cache_lives_in_the_fallback(node):
    shared, user, env = node
    base = Path(env["UCTR_LOCAL_DIR"])
    base.mkdir()
    os.chown(base, NOBODY, NOBODY)
    mine = location.prepare_fallback(str(shared), user.pw_uid, user.pw_gid, env)
    stem, cached = as_user(user, _store_and_read, env)
    assert stem.startswith(mine + "/")
    assert cached is not None and cached["modes"] == ["N1"]
    assert os.listdir(base) == []  # the plant is left alone
