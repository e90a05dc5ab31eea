"""Red-team regressions (issue 10, second pass): the node-local directory a uctr-exec rank
uses. A rank used to carry on in a directory location.check() had refused (when root had
prepared no fallback): it created launch/ inside another user's directory, and ran the
root filesystem its index named from a directory others can rename entries of."""

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from tests.unit.test_launch_staged import index, make_bundle
from uctr_batch.batch import location, privdrop
from uctr_batch.errors import StorageError
from uctr_batch.launch import staged

NOBODY, USER = 65534, "uctrtest"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plants other users' files: root")


@pytest.fixture
def shared():
    import pwd

    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"needs the user {USER}")
    top = Path(tempfile.mkdtemp(prefix="uctr-rt2-"))
    top.chmod(0o755)
    tmp = top / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    yield tmp, user
    shutil.rmtree(top, ignore_errors=True)


def _usable(local, env):
    try:
        return staged.usable_local_dir(local, env)
    except StorageError as e:
        return "refused: " + e.message


def as_user(user, func, *args):
    return privdrop.run_as(privdrop.Identity.of(user.pw_uid), func, *args, timeout=30)


def _chown_tree(top, uid, gid):
    for dirpath, dirs, files in os.walk(top):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirs + files]:
            os.lchown(name, uid, gid)


def test_a_rank_refuses_another_users_dir_and_creates_nothing_in_it(shared):
    tmp, user = shared
    planted = tmp / f"uctr-{user.pw_uid}"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    os.chown(planted, NOBODY, NOBODY)
    got = as_user(user, _usable, str(planted), {"UCTR_RUN_DIR": str(tmp.parent / "run")})
    assert got.startswith("refused: ") and "belongs to nobody" in got  # was the path itself
    assert os.listdir(planted) == []


def test_a_rank_does_not_run_an_indexed_rootfs_from_a_dir_others_can_write(shared):
    tmp, user = shared
    local = tmp / f"uctr-{user.pw_uid}"
    local.mkdir(mode=0o700)
    bundle = make_bundle(local)
    index(local, "img:1", bundle)
    _chown_tree(local, user.pw_uid, user.pw_gid)
    local.chmod(0o777)  # the user's own mistake: now anyone may swap bundles/ for their own
    got = as_user(user, _usable, str(local), {"UCTR_RUN_DIR": str(tmp.parent / "run")})
    assert got.startswith("refused: ") and "writable by others" in got


def test_a_rank_uses_the_fallback_root_prepared(shared):
    tmp, user = shared
    planted = tmp / f"uctr-{user.pw_uid}"
    planted.mkdir()
    os.chown(planted, NOBODY, NOBODY)
    env = {"UCTR_RUN_DIR": str(tmp.parent / "run")}
    mine = location.prepare_fallback(str(tmp), user.pw_uid, user.pw_gid, env)
    assert as_user(user, _usable, str(planted), env) == mine
    assert stat.S_IMODE(os.stat(mine).st_mode) == 0o700
