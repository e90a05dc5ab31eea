"""Node-local staging: one unpack per image, in-use references, LRU quota, error classes.

Real images (OCI layouts written by the harness), the real store and rootfs code; the
images come from oci: references, so no registry and no network are needed.
"""

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.harness.images import build_busybox, build_layers
from uctr_batch import errors, fsutil
from uctr_batch.batch import stage
from uctr_batch.policy.load import Policy
from uctr_batch.policy.resolver import resolve


def node_policy(tmp_path, **storage):
    storage.setdefault("cache_dir", str(tmp_path / "cache"))
    storage.setdefault("local_dir", str(tmp_path / "local"))
    return resolve(Policy(path=tmp_path / "policy.yaml", defaults={"storage": storage}),
                   node="n1", partition=None, features=())


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    build_busybox(root / "busybox")
    build_layers(root / "layers")
    return {"busybox": f"oci:{root / 'busybox'}:1", "layers": f"oci:{root / 'layers'}:1"}


@pytest.fixture(autouse=True)
def own_env(monkeypatch):
    # stage() points the pipeline's defaults at the policy's dirs through the environment
    for name in ("UCTR_CACHE", "UCTR_LOCAL_DIR"):
        monkeypatch.delenv(name, raising=False)


def bundle_names(np):
    return sorted(p.name for p in (Path(np.storage.local_dir) / "bundles").iterdir()
                  if not p.name.startswith("."))


def test_stage_unpacks_once_then_reuses(tmp_path, layouts):
    np = node_policy(tmp_path)
    first = stage.stage(layouts["busybox"], job_id="11", node_policy=np)
    assert first.unpacked and (first.rootfs / "bin" / "busybox").is_file()
    assert first.bundle == Path(np.storage.local_dir) / "bundles" / first.manifest_digest.split(":")[1]
    second = stage.stage(layouts["busybox"], job_id="12", node_policy=np)
    assert not second.unpacked and second.rootfs == first.rootfs
    refs = stage.live_references(Path(np.storage.local_dir), first.manifest_digest)
    assert sorted(refs) == ["job-11", "job-12"]


def test_release_job_drops_only_that_jobs_reference(tmp_path, layouts):
    np = node_policy(tmp_path)
    result = stage.stage(layouts["busybox"], job_id="21", node_policy=np)
    stage.stage(layouts["busybox"], job_id="22", node_policy=np)
    assert stage.release_job("21", node_policy=np) == {"references": 1, "evicted": [],
                                                      "containers": 0}
    assert stage.live_references(Path(np.storage.local_dir), result.manifest_digest) == ["job-22"]
    assert stage.release_job("21", node_policy=np)["references"] == 0  # missing state is fine


def test_quota_evicts_lru_bundle_without_live_references(tmp_path, layouts):
    np = node_policy(tmp_path)
    busybox = stage.stage(layouts["busybox"], job_id="31", node_policy=np)
    stage.release_job("31", node_policy=np)
    size = stage.bundle_size(busybox.bundle)
    small = node_policy(tmp_path, local_quota=size)
    layers = stage.stage(layouts["layers"], job_id="32", node_policy=small)
    assert bundle_names(small) == [layers.manifest_digest.split(":")[1]]


def test_bundles_in_use_are_kept_over_quota(tmp_path, layouts):
    np = node_policy(tmp_path)
    busybox = stage.stage(layouts["busybox"], job_id="41", node_policy=np)
    small = node_policy(tmp_path, local_quota=stage.bundle_size(busybox.bundle))
    layers = stage.stage(layouts["layers"], job_id="42", node_policy=small)
    assert bundle_names(small) == sorted(r.manifest_digest.split(":")[1] for r in (busybox, layers))
    # job 42 ends first: its bundle is the one nobody uses, so it goes
    assert stage.release_job("42", node_policy=small)["evicted"] == [layers.manifest_digest]
    assert bundle_names(small) == [busybox.manifest_digest.split(":")[1]]


def test_image_larger_than_the_quota_is_a_user_error(tmp_path, layouts):
    np = node_policy(tmp_path, local_quota=1024)
    with pytest.raises(errors.StorageError, match="more than this node's quota") as info:
        stage.stage(layouts["busybox"], job_id="51", node_policy=np)
    assert stage.classify(info.value, Path(np.storage.local_dir)) == stage.USER
    assert bundle_names(np) == []


def test_an_image_over_the_quota_is_stopped_before_it_is_unpacked(tmp_path, layouts):
    # issue 10, class 10: the quota bounds the unpack itself (before: the whole image was
    # written, possibly filling the disk, and only then measured against the quota)
    np = node_policy(tmp_path, local_quota=1024)
    with pytest.raises(errors.StorageError, match=r"cannot unpack layer .*quota") as info:
        stage.stage(layouts["busybox"], job_id="52", node_policy=np)
    assert stage.classify(info.value, Path(np.storage.local_dir)) == stage.USER
    assert bundle_names(np) == []


@pytest.mark.deep
def test_disk_usage_of_a_tree_deeper_than_the_recursion_limit(tmp_path):
    top = tmp_path / "deep"
    fd = os.open(tmp_path, os.O_RDONLY)
    expected = 0
    try:
        os.mkdir("deep", dir_fd=fd)
        for _ in range(1500):  # relative steps: the full path is longer than PATH_MAX
            child = os.open("deep", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
            os.mkdir("deep", dir_fd=fd)
        bottom = os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(bottom, b"x" * 65536)
        os.fsync(bottom)
        os.close(bottom)
        expected = os.stat("f", dir_fd=fd).st_blocks * 512
    finally:
        os.close(fd)
    expected += sum(os.stat(p).st_blocks * 512 for p in _dirs_below(top))
    assert fsutil.disk_usage(top) == expected
    fsutil.remove_tree(top)


def _dirs_below(top: Path):
    """Every directory under TOP (TOP excluded), by fd-relative steps."""
    fd = os.open(top, os.O_RDONLY)
    try:
        while True:
            try:
                child = os.open("deep", os.O_RDONLY, dir_fd=fd)
            except FileNotFoundError:
                return
            os.close(fd)
            fd = child
            yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def test_pid_references_live_as_long_as_the_process(tmp_path):
    local = tmp_path / "local"
    digest = "sha256:" + "b" * 64
    child = subprocess.Popen(["sleep", "30"])
    try:
        stage.add_reference(local, digest, f"pid-{child.pid}", pid=child.pid)
        assert stage.live_references(local, digest) == [f"pid-{child.pid}"]
    finally:
        child.kill()
        child.wait()
    assert stage.live_references(local, digest) == []


def test_stage_outcome_reports_instead_of_raising(tmp_path):
    np = node_policy(tmp_path)
    outcome = stage.stage_outcome(f"oci:{tmp_path / 'nothing-here'}:1", job_id="61", node_policy=np)
    assert outcome["status"] == "error" and outcome["fault"] == stage.USER
    assert outcome["message"]


@pytest.mark.parametrize("exc", [
    errors.ConfigError("image refused by the site policy: x"),
    errors.AuthError("unauthorized"),
    errors.ImageNotFound("not found"),
    errors.LayerRejected("bad member"),
    errors.ReferenceError_("bad reference"),
    errors.InternalError("bug"),  # staging runs on the user's input: a bug fails the job
    KeyError("bug"),
    errors.NoSpace("no space left on tmpfs (/tmp): needed ~2 GiB, free 1 MiB"),
])
def test_whatever_goes_wrong_while_staging_is_the_jobs(tmp_path, exc):
    assert stage.classify(exc, tmp_path / "local") == stage.USER


def storage_error_from(err: OSError) -> errors.StorageError:
    try:
        raise errors.StorageError("cannot unpack") from err
    except errors.StorageError as e:
        return e


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS])
def test_errors_in_the_users_own_local_dir_never_make_a_node_fault(tmp_path, code):
    # a too large image or another user filling /tmp; EIO/EROFS from a FUSE mount or a
    # symlink the user put in their own directory: all of it can be caused by a user
    local = tmp_path / "local"
    local.mkdir(mode=0o700)
    err = OSError(code, os.strerror(code), str(local / "bundles" / "x"))
    assert stage.classify(storage_error_from(err), local) == stage.USER


@pytest.fixture
def read_only_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_only_a_root_owned_place_the_user_cannot_use_is_a_node_fault(read_only_fs):
    exc = errors.StorageError("cannot create the node-local directory")
    assert stage.classify(exc, read_only_fs / "uctr-1000") == stage.NODE


def test_a_usable_local_dir_is_not_a_fault(tmp_path):
    from uctr_batch.batch import location

    assert location.check(tmp_path / "local") is None
    assert stage.classify(errors.StorageError("x"), tmp_path / "local") == stage.USER


# -- location: a node-local dir someone else planted (issue 10, class 11) -------------------
NOBODY = 65534


@pytest.fixture
def sticky_tmp(tmp_path):
    """A root-owned sticky world-writable directory, like /tmp (needs root to own it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the planted paths belong to another user")
    tmp_path.chmod(0o755)
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


def _own(path, uid=NOBODY):
    os.lchown(path, uid, uid)


PLANTS = {  # name -> (path under the sticky dir, how it is planted, what check() says)
    "other-users-dir": ("uctr-1001", lambda p: (p.mkdir(), _own(p)), "belongs to nobody"),
    "symlink": ("uctr-1001", lambda p: (p.symlink_to("/etc"), _own(p)), "symbolic link"),
    "file": ("uctr-1001", lambda p: (p.write_text(""), _own(p)), "not a directory"),
    "own-dir-0777": ("uctr-1001", lambda p: (p.mkdir(), p.chmod(0o777), _own(p, 1001)),
                     "writable by others"),
    "own-dir-0000": ("uctr-1001", lambda p: (p.mkdir(mode=0), _own(p, 1001)),
                     "lacks owner permissions"),
    "planted-parent": ("uctr/1001", lambda p: (p.parent.mkdir(), p.parent.chmod(0o777),
                                               _own(p.parent)), "belongs to nobody"),
    "symlinked-parent": ("link/1001", lambda p: (p.parent.symlink_to(p.parent.parent),
                                                 _own(p.parent)),
                         "symbolic link that belongs to nobody"),
}


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_a_planted_local_dir_is_the_users_problem_never_the_nodes(sticky_tmp, name):
    from uctr_batch.batch import location

    where, plant, why = PLANTS[name]
    target = sticky_tmp / where
    plant(target)
    problem = location.check(target, uid=1001)
    assert problem is not None and problem[0] == location.USER, problem
    assert why in problem[1]
    assert location.trusted_base(target) == str(sticky_tmp)
    assert stage.classify(errors.StorageError("refusing to use it"), target) == stage.USER


def test_a_private_dir_of_the_user_is_fine(sticky_tmp):
    from uctr_batch.batch import location

    target = sticky_tmp / "uctr-1001"
    assert location.check(target, uid=1001) is None  # missing: the user creates it
    target.mkdir(mode=0o700)
    os.chown(target, 1001, 1001)
    assert location.check(target, uid=1001) is None


def test_the_fallback_is_root_made_private_and_found_by_its_record(sticky_tmp, tmp_path):
    from uctr_batch.batch import location

    env = {"UCTR_RUN_DIR": str(tmp_path / "run")}
    mine = location.prepare_fallback(str(sticky_tmp), 1001, 1001, env)
    top = os.path.dirname(mine)
    assert os.path.dirname(top) == str(sticky_tmp)
    assert os.path.basename(top).startswith(location.FALLBACK_PREFIX)
    assert (os.stat(top).st_uid, stat.S_IMODE(os.stat(top).st_mode)) == (0, 0o711)
    assert (os.stat(mine).st_uid, stat.S_IMODE(os.stat(mine).st_mode)) == (1001, 0o700)
    assert location.fallback_for(sticky_tmp / "uctr-1001", env, uid=1001) == mine
    # the same directory for the next job; nothing for another user until root makes it
    assert location.prepare_fallback(str(sticky_tmp), 1001, 1001, env) == mine
    assert location.fallback_for(sticky_tmp / "uctr-1002", env, uid=1002) is None
    # a record that points anywhere but a root-made uctr-fallback.* dir is ignored
    record = location.record_path(str(sticky_tmp), env)
    Path(record).write_text(str(tmp_path) + "\n")
    assert location.fallback_for(sticky_tmp / "uctr-1001", env, uid=1001) is None


def test_root_makes_no_fallback_in_a_directory_users_control(sticky_tmp, tmp_path):
    from uctr_batch.batch import location

    theirs = sticky_tmp / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(ValueError):
        location.prepare_fallback(str(theirs), 1001, 1001, {"UCTR_RUN_DIR": str(tmp_path / "r")})
    assert list(theirs.iterdir()) == []


def test_a_read_only_mount_the_user_put_on_their_own_dir_is_theirs(sticky_tmp):
    from uctr_batch.batch import location

    target = sticky_tmp / "uctr-1001"
    target.mkdir(mode=0o700)
    os.chown(target, 1001, 1001)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m,mode=0700,uid=1001", "tmpfs",
                    str(target)], check=True)  # what fusermount lets a user do
    try:
        problem = location.check(target, uid=1001)
        assert problem is not None and problem[0] == location.USER, problem
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_ensure_private_dir_creates_nothing_in_a_parent_another_user_controls(sticky_tmp):
    from uctr_batch import fsutil

    parent = sticky_tmp / "uctr"
    parent.mkdir()
    parent.chmod(0o777)
    os.chown(parent, NOBODY, NOBODY)
    with pytest.raises(errors.StorageError, match="belongs to nobody"):
        fsutil.ensure_private_dir(parent / "0", "the node-local directory")
    assert list(parent.iterdir()) == []
