"""uctr-exec's lookup of staged images: the node-local index, the prolog's readiness record,
in-use marks that quota eviction respects, and what waiting ranks see when staging fails
or takes too long. (Real staging under concurrency: tests/integration/test_uctr_exec.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from uctr_batch.batch import readiness, stage
from uctr_batch.errors import StorageError, UctrError
from uctr_batch.image import rootfs as bundles
from uctr_batch.launch import staged
from uctr_batch.launch.nodelock import NodeLock, open_private_dir

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def make_bundle(local_dir, digest=DIGEST, config=None):
    """A complete bundle as image.rootfs lays it out (marker written last)."""
    bundle = local_dir / "bundles" / digest.split(":")[1]
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "image.json").write_text(json.dumps({
        "reference": "example.org/img:1", "manifest_digest": digest,
        "config": config or {"Env": ["PATH=/bin"], "Cmd": ["sh"]}}))
    (bundle / bundles.MARKER).write_text(digest + "\n")
    return bundle


def index(local_dir, image, bundle, ref=None):
    entry = staged._staged_from_bundle(image, str(bundle), str(bundle / "rootfs"), "staged")
    fd = open_private_dir(staged.launch_dir(str(local_dir)))
    try:
        staged.write_marshal(fd, "img-%s.idx" % staged.image_key(image), entry.entry(ref))
    finally:
        os.close(fd)


def lookup(local_dir, image):
    fd = open_private_dir(staged.launch_dir(str(local_dir)))
    try:
        return staged.lookup(fd, staged.image_key(image), image)
    finally:
        os.close(fd)


def test_constants_match_their_owners():
    assert staged.MARKER == bundles.MARKER
    assert staged.INUSE_DIR == stage.INUSE_DIR


def test_index_hit_and_what_invalidates_it(tmp_path):
    bundle = make_bundle(tmp_path)
    ref_file = tmp_path / "ref.json"
    ref_file.write_text("{}")
    st = ref_file.stat()
    index(tmp_path, "img:1", bundle, (str(ref_file), st.st_mtime_ns, st.st_size, st.st_ino))
    hit = lookup(tmp_path, "img:1")
    assert (hit.rootfs, hit.manifest_digest, hit.config["Cmd"], hit.source) == (
        str(bundle / "rootfs"), DIGEST, ["sh"], "index")
    assert lookup(tmp_path, "img:2") is None  # another image text
    ref_file.write_text('{"moved": 1}')  # `uctr pull` moved the tag in the shared cache
    assert lookup(tmp_path, "img:1") is None
    index(tmp_path, "img:1", bundle)
    assert lookup(tmp_path, "img:1") is not None
    (bundle / bundles.MARKER).write_text(OTHER)  # replaced by another image's unpack
    assert lookup(tmp_path, "img:1") is None
    (bundle / bundles.MARKER).unlink()  # evicted
    assert lookup(tmp_path, "img:1") is None


def test_in_use_marks_are_batch_stage_references(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        staged.mark_in_use(str(tmp_path), DIGEST)
        path = os.path.join(staged.inuse_dir(str(tmp_path), DIGEST), "pid-%d" % os.getpid())
        os.rename(path, os.path.join(os.path.dirname(path), "pid-%d" % child.pid))
        assert stage.live_references(tmp_path, DIGEST) == ["pid-%d" % child.pid]
        json.loads(open(os.path.join(os.path.dirname(path), "pid-%d" % child.pid)).read())
    finally:
        child.kill()
        child.wait()
    assert stage.live_references(tmp_path, DIGEST) == []
    assert staged.prune_dead_pids(str(tmp_path), DIGEST) == 1
    assert os.listdir(staged.inuse_dir(str(tmp_path), DIGEST)) == []


def test_a_live_mark_keeps_the_bundle_from_eviction(tmp_path):
    make_bundle(tmp_path)
    (tmp_path / "locks").mkdir()
    staged.mark_in_use(str(tmp_path), DIGEST)  # this process: alive
    assert stage.enforce_quota(tmp_path, 0) == []
    os.unlink(os.path.join(staged.inuse_dir(str(tmp_path), DIGEST), "pid-%d" % os.getpid()))
    assert stage.enforce_quota(tmp_path, 0) == [DIGEST]


def test_waiting_ranks_see_the_failure_of_the_staging_rank(tmp_path):
    fd = open_private_dir(staged.launch_dir(str(tmp_path)))
    try:
        before = time.time()
        staged._record_failure(fd, "k", UctrError("cannot pull x: not found", "check the name"))
        with pytest.raises(UctrError) as info:
            staged._raise_recorded_failure(fd, "k", before)
        assert "cannot pull x: not found" in info.value.message
        assert info.value.hint == "check the name"
        staged._raise_recorded_failure(fd, "k", time.time() + 1)  # older failure: try again
    finally:
        os.close(fd)


def test_stage_wait_times_out_with_a_clear_error(tmp_path):
    launch = staged.launch_dir(str(tmp_path))
    fd = open_private_dir(launch)
    r, w = os.pipe()
    holder = os.fork()
    if holder == 0:  # a rank stuck staging
        try:
            NodeLock(fd, "img-%s.lock" % staged.image_key("img:1")).acquire(5)
            os.write(w, b"x")
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        assert os.read(r, 1) == b"x"
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            staged.ensure("img:1", str(tmp_path), policy={}, timeout=0.5)
        assert time.monotonic() - started < 5
        assert "s waiting for img:1 to be staged on this node" in info.value.message
        assert "(pid %d is still at it)" % holder in info.value.message
        assert "UCTR_STAGE_TIMEOUT" in info.value.hint
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="readiness records are written by root")
def test_prolog_readiness_record_is_used_and_indexed(tmp_path):
    env = {"UCTR_RUN_DIR": str(tmp_path / "run")}
    bundle = make_bundle(tmp_path / "local")
    readiness.write_readiness("41", os.getuid(), {
        "status": "ok", "image": "img:1", "reference": "example.org/img:1",
        "rootfs": str(bundle / "rootfs"), "bundle": str(bundle), "manifest_digest": DIGEST}, env)
    got = staged.ensure("img:1", str(tmp_path / "local"), policy={}, timeout=1, job_id="41",
                        env=env)
    assert (got.rootfs, got.source) == (str(bundle / "rootfs"), "readiness")
    assert lookup(tmp_path / "local", "img:1").rootfs == got.rootfs  # indexed for the others
    readiness.write_readiness("42", os.getuid(), {
        "status": "error", "image": "bad:1", "message": "cannot pull bad:1: not found",
        "hint": "check the name"}, env)
    with pytest.raises(UctrError) as info:
        staged.ensure("bad:1", str(tmp_path / "local"), policy={}, timeout=1, job_id="42",
                      env=env)
    assert info.value.message == "cannot pull bad:1: not found"
