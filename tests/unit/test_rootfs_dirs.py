"""Node-local bundles: a safe base directory, the atomic temp-sibling protocol, reuse, --dest,
ps/rm, a SIGKILL in the middle of an unpack, and one unpack for concurrent creates."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import pytest

from tests.harness import users
from tests.unit.layer_tars import compress, dir_, layer_for, reg, sym, tar
from uctr_batch import fsutil
from uctr_batch.errors import DigestMismatch, LayerRejected, StorageError, UsageError
from uctr_batch.image import flatten, manifest, rootfs
from uctr_batch.image.store import Store, digest_of_bytes
from uctr_batch.records import replace

REPO = Path(__file__).resolve().parents[2]


def make_image(
    store: Store, *layer_tars: bytes, reference: str = "example.org/test/img:1", cmd=("/bin/sh",)
) -> manifest.ImageRecord:
    """Put layers, config and manifest into STORE; return the record ensure_image would give."""
    layers = []
    for data in layer_tars:
        blob = compress(data, "gzip")
        layer = layer_for(blob)
        store.put_bytes(layer.digest, blob)
        layers.append(layer)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": list(cmd),
            "WorkingDir": "/work",
            "Labels": {"a": "b"},
            "ExposedPorts": {"80/tcp": {}},
        },
        "rootfs": {"type": "layers", "diff_ids": [digest_of_bytes(t) for t in layer_tars]},
    }
    config_bytes = json.dumps(config).encode()
    store.put_bytes(digest_of_bytes(config_bytes), config_bytes)
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": manifest.OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of_bytes(config_bytes), "size": len(config_bytes)},
        "layers": [
            {"digest": la.digest, "mediaType": la.media_type, "size": la.size} for la in layers
        ],
    }
    manifest_bytes = json.dumps(manifest_doc).encode()
    store.put_bytes(digest_of_bytes(manifest_bytes), manifest_bytes)
    return manifest.ImageRecord(
        reference=reference,
        manifest_digest=digest_of_bytes(manifest_bytes),
        config_digest=digest_of_bytes(config_bytes),
        layers=tuple(layers),
        platform="linux/amd64",
        config=config,
    )


@pytest.fixture
def local(tmp_path, monkeypatch):
    base = tmp_path / "local"
    monkeypatch.setenv("UCTR_LOCAL_DIR", str(base))
    return base


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "cache")


@pytest.fixture
def image(store):
    return make_image(
        store,
        tar(
            dir_("bin"),
            reg("bin/sh", b"#!sh", mode=0o755),
            dir_("locked", mode=0o500),
            reg("locked/f", b"f"),
        ),
        tar(reg("etc/hostname", b"test\n"), sym("lib", "usr/lib")),
    )


def bundle_of(local: Path, record) -> Path:
    return local / "bundles" / record.manifest_digest.split(":")[1]


def work_dirs(parent: Path):
    return sorted(n for n in os.listdir(parent) if n.startswith((".tmp-", ".rm-")))


# -- the base directory -----------------------------------------------------------------------
def test_base_directory_is_created_private(local):
    rootfs.BundleStore().prepare()
    assert local.stat().st_mode & 0o777 == 0o700
    assert (local / "bundles").is_dir() and (local / "locks").is_dir()


def test_symlink_planted_at_the_base_path_is_refused(local, tmp_path):
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir(mode=0o777)
    local.symlink_to(elsewhere)
    with pytest.raises(StorageError, match="symbolic link") as info:
        rootfs.BundleStore().prepare()
    assert "UCTR_LOCAL_DIR" in info.value.hint
    assert os.listdir(elsewhere) == []


@pytest.mark.skipif(os.geteuid() != 0 or not users.can_switch_user(), reason="needs root to chown")
def test_directory_owned_by_another_user_is_refused(local):
    local.mkdir(mode=0o700)
    shutil.chown(local, users.TEST_USER)
    with pytest.raises(StorageError, match=f"belongs to {users.TEST_USER}"):
        rootfs.BundleStore().prepare()
    assert os.listdir(local) == []


@pytest.mark.skipif(
    os.geteuid() != 0 or not users.can_switch_user(), reason="needs root and uctrtest"
)
def test_unprivileged_user_refuses_a_directory_planted_by_root(tmp_path):
    """The real attack: someone else (here root) made /tmp/uctr-$UID before the user did."""
    base = Path(f"/tmp/uctr-planted-{os.getpid()}")
    base.mkdir(mode=0o755)
    try:
        script = "from uctr_batch.image import rootfs\nrootfs.BundleStore().prepare()\n"
        result = users.run_as(
            users.TEST_USER,
            [sys.executable, "-c", script],
            env={"PYTHONPATH": str(REPO), "UCTR_LOCAL_DIR": str(base), "PATH": os.environ["PATH"]},
            cwd="/",
        )
        assert result.returncode != 0
        assert "it belongs to root, not to you" in result.stderr
    finally:
        base.rmdir()


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o720])
def test_group_or_world_writable_directory_is_refused(local, mode):
    local.mkdir()
    local.chmod(mode)
    with pytest.raises(StorageError, match="writable by others"):
        rootfs.BundleStore().prepare()


def test_base_path_that_is_a_file_is_refused(local):
    local.write_text("not a dir")
    with pytest.raises(StorageError, match="not a directory"):
        rootfs.BundleStore().prepare()


def test_existing_private_directory_is_accepted(local):
    local.mkdir(mode=0o700)
    (local / "other").write_text("kept")
    rootfs.BundleStore().prepare()
    assert (local / "other").read_text() == "kept"


# -- create -----------------------------------------------------------------------------------
def test_create_unpacks_once_then_reuses(local, store, image, monkeypatch):
    calls = []
    real = flatten.unpack_layers
    monkeypatch.setattr(flatten, "unpack_layers", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    path = rootfs.create(image, store)
    bundle = bundle_of(local, image)
    assert path == bundle / "rootfs"
    assert (path / "bin/sh").read_bytes() == b"#!sh"
    assert os.readlink(path / "lib") == "usr/lib"
    assert (path / "locked").stat().st_mode & 0o777 == 0o500
    meta = rootfs.read_image_json(bundle)
    assert meta["config"] == {
        "Env": ["PATH=/bin"],
        "Cmd": ["/bin/sh"],
        "WorkingDir": "/work",
        "Labels": {"a": "b"},
    }
    assert (meta["reference"], meta["manifest_digest"]) == (image.reference, image.manifest_digest)
    assert meta["layers"] == image.layer_digests() and meta["size"] == 4 + 1 + 5
    assert (bundle / rootfs.MARKER).read_text().strip() == image.manifest_digest
    os.utime(bundle / rootfs.MARKER, (1, 1))
    assert rootfs.create(image, store) == path
    assert calls == [1]
    assert os.stat(bundle / rootfs.MARKER).st_mtime > 1  # last use recorded
    assert work_dirs(local / "bundles") == []


def test_failed_unpack_leaves_no_bundle_and_no_temp(local, store, image):
    blob = store.blob_path(image.layers[1].digest)
    blob.chmod(0o600)
    blob.write_bytes(compress(tar(reg("evil", b"x")), "gzip"))  # cache damaged after the pull
    with pytest.raises(DigestMismatch):
        rootfs.create(image, store)
    assert os.listdir(local / "bundles") == []
    assert rootfs.BundleStore().complete_bundles() == []


def test_stale_temp_siblings_are_removed_and_incomplete_bundles_ignored(local, store, image):
    bundles = rootfs.BundleStore().prepare().bundles
    dead = _dead_pid()
    stale = bundles / rootfs.work_name("tmp", "ab" * 32, dead)
    (stale / "rootfs" / "locked").mkdir(parents=True)
    (stale / "rootfs" / "locked" / "f").write_text("x")
    (stale / "rootfs" / "locked").chmod(0o500)
    stale_rm = bundles / rootfs.work_name("rm", "cd" * 32, dead)
    other_host = bundles / f".tmp-{'12' * 32}@another-node.{dead}"  # its pid means nothing here
    other_host.mkdir()
    stale_rm.mkdir()
    live = bundles / rootfs.work_name("tmp", "ef" * 32, os.getppid())
    live.mkdir()
    half = bundles / ("12" * 32)
    (half / "rootfs").mkdir(parents=True)  # no marker: never listed
    assert rootfs.BundleStore().complete_bundles() == []
    rootfs.create(image, store)
    assert work_dirs(bundles) == sorted([live.name, other_host.name])
    assert rootfs.BundleStore().complete_bundles() == [bundle_of(local, image)]


def test_incomplete_bundle_at_the_target_is_replaced(local, store, image):
    bundle = bundle_of(local, image)
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "rootfs" / "junk").write_text("half")
    path = rootfs.create(image, store)
    assert not (path / "junk").exists() and (path / "bin/sh").exists()


def test_missing_layer_blob(local, store, image):
    store.blob_path(image.layers[0].digest).unlink()
    with pytest.raises(rootfs.ImageNotFound, match="missing from the cache"):
        rootfs.create(image, store)


# -- --dest -----------------------------------------------------------------------------------
def test_dest_new_empty_reused_and_refused(tmp_path, local, store, image):
    dest = tmp_path / "jobs" / "mybundle"
    assert rootfs.create(image, store, dest) == dest / "rootfs"
    assert (dest / "rootfs/etc/hostname").read_text() == "test\n"
    assert rootfs.create(image, store, dest) == dest / "rootfs"  # same image: reused
    other = make_image(store, tar(reg("other", b"o")), reference="example.org/other:1")
    with pytest.raises(StorageError, match="holds another image"):
        rootfs.create(other, store, dest)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (rootfs.create(other, store, empty) / "other").read_bytes() == b"o"
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine").write_text("precious")
    with pytest.raises(StorageError, match="not empty"):
        rootfs.create(other, store, full)
    assert (full / "mine").read_text() == "precious"
    assert work_dirs(tmp_path) == [] and not (local / "bundles").exists()
    symlinked = tmp_path / "symlinked"
    symlinked.symlink_to(empty)
    with pytest.raises(StorageError, match="not a directory"):
        rootfs.create(image, store, symlinked)


# -- ps / rm ----------------------------------------------------------------------------------
def test_ps_and_rm(tmp_path, local, store, image, capsys):
    path = rootfs.create(image, store)
    second = make_image(store, tar(reg("x", b"x")), reference="example.org/second:2")
    rootfs.create(second, store)
    rootfs.cmd_ps(Namespace(json=True))
    listed = json.loads(capsys.readouterr().out)
    assert sorted(b["reference"] for b in listed) == [
        "example.org/second:2",
        "example.org/test/img:1",
    ]
    entry = next(b for b in listed if b["reference"] == image.reference)
    assert entry["rootfs"] == str(path) and entry["manifest_digest"] == image.manifest_digest
    assert entry["size"] == 10 and entry["created"] and entry["last_used"]
    rootfs.cmd_ps(Namespace(json=False))
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["ID", "REFERENCE", "SIZE"] and len(table) == 3
    # by id prefix, then by rootfs path; a 0500 dir inside does not stop removal
    rootfs.cmd_rm(Namespace(bundle=[entry["id"][:12]]))
    assert not path.parent.exists()
    second_path = rootfs.create(second, store)
    rootfs.cmd_rm(Namespace(bundle=[str(second_path)]))
    assert rootfs.BundleStore().complete_bundles() == []
    assert work_dirs(local / "bundles") == []


def test_rm_refuses_what_is_not_a_bundle(tmp_path, local, store, image):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data").write_text("keep")
    with pytest.raises(UsageError, match="not a uctr bundle"):
        rootfs.cmd_rm(Namespace(bundle=[str(victim)]))
    with pytest.raises(UsageError, match="no such bundle"):
        rootfs.cmd_rm(Namespace(bundle=["deadbeef"]))
    assert (victim / "data").read_text() == "keep"
    dest = tmp_path / "dest-bundle"
    rootfs.create(image, store, dest)
    rootfs.cmd_rm(Namespace(bundle=[str(dest)]))  # outside the store, but it has the marker
    assert not dest.exists()


def test_ps_creates_nothing_and_refuses_an_unsafe_base(local, capsys):
    rootfs.cmd_ps(Namespace(json=True))
    assert json.loads(capsys.readouterr().out) == [] and not local.exists()
    local.mkdir(mode=0o777)
    local.chmod(0o777)
    with pytest.raises(StorageError, match="writable by others"):
        rootfs.cmd_ps(Namespace(json=True))
    with pytest.raises(StorageError, match="writable by others"):
        rootfs.cmd_rm(Namespace(bundle=["abcd"]))


def test_rm_by_reference(local, store, image):
    path = rootfs.create(image, store)
    rootfs.cmd_rm(Namespace(bundle=[image.reference]))
    assert not path.exists()


# -- processes --------------------------------------------------------------------------------
CREATE = r"""
import json, os, sys, time
from uctr_batch import log
from uctr_batch.image import flatten, manifest, rootfs
from uctr_batch.image.store import Store
log.setup(1)
spec = json.loads(sys.argv[2])
record = manifest.ImageRecord(reference=spec["reference"], manifest_digest=spec["manifest"],
    config_digest=spec["config"], config=spec["config_doc"],
    layers=tuple(manifest.Layer(*layer) for layer in spec["layers"]))
if len(sys.argv) > 3:  # hang after the first layer is written: the test kills us there
    real = flatten._Writer.apply
    def apply_then_hang(self, *args):
        real(self, *args)
        print("mid-unpack", flush=True)
        time.sleep(3600)
    flatten._Writer.apply = apply_then_hang
print(rootfs.create(record, Store(sys.argv[1])), flush=True)
"""


def _spec(record) -> str:
    return json.dumps(
        {
            "reference": record.reference,
            "manifest": record.manifest_digest,
            "config": record.config_digest,
            "config_doc": record.config,
            "layers": [[la.digest, la.media_type, la.size] for la in record.layers],
        }
    )


def _create_process(store, record, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CREATE, str(store.root), _spec(record), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_sigkill_during_unpack_never_leaves_a_usable_bundle(local, store, image, capsys):
    proc = _create_process(store, image, "hang")
    try:
        assert proc.stdout.readline().strip() == "mid-unpack"
        bundles = local / "bundles"
        temps = work_dirs(bundles)
        assert temps == [rootfs.work_name("tmp", image.manifest_digest.split(":")[1], proc.pid)]
        assert (bundles / temps[0] / "rootfs/bin/sh").exists()  # layer 1 is on disk
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    assert rootfs.BundleStore().complete_bundles() == []
    assert not bundle_of(local, image).exists()
    rootfs.cmd_ps(Namespace(json=True))
    assert json.loads(capsys.readouterr().out) == []
    start = time.monotonic()
    path = rootfs.create(image, store)  # the dead holder's lock is broken at once
    assert time.monotonic() - start < 30
    assert (path / "etc/hostname").read_text() == "test\n"
    assert work_dirs(local / "bundles") == []


def test_concurrent_creates_unpack_once(local, store, image):
    procs = [_create_process(store, image) for _ in range(8)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [o[1] for o in outputs]
    paths = {out.strip() for out, _ in outputs}
    assert paths == {str(bundle_of(local, image) / "rootfs")}
    unpacks = sum(err.count("\nunpacking ") + err.startswith("unpacking ") for _, err in outputs)
    assert unpacks == 1
    assert work_dirs(local / "bundles") == []


# -- issue 10, class 4: deep trees and leftovers never break a later create or rm ---------------
def deep_tree(top: Path, levels: int, mode: int = 0o500) -> None:
    """LEVELS nested directories under TOP (made through directory fds: the path is far
    beyond PATH_MAX), each with a file, a symlink out of the tree, and mode MODE."""
    os.makedirs(top, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            os.symlink("/etc", "out", dir_fd=fd)
            os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o400, dir_fd=fd))
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.fchmod(fd, mode)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


@pytest.mark.deep
def test_remove_tree_handles_any_depth_and_never_follows_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    top = tmp_path / "tree"
    deep_tree(top, 5000, mode=0o000)
    os.symlink(outside, top / "link-out")
    fsutil.remove_tree(top)
    assert not top.exists() and (outside / "keep").read_text() == "keep"
    with pytest.raises(OSError):
        os.symlink(outside, tmp_path / "alink")
        fsutil.remove_tree(tmp_path / "alink")  # a symlink is never a tree to remove
    assert (outside / "keep").read_text() == "keep"


@pytest.mark.deep
def test_deep_leftover_of_a_killed_create_is_cleaned_by_the_next(local, store, image):
    """A 2500-level temp tree left by a killed unpack made every later create exit 70."""
    rootfs.BundleStore().prepare()
    key = image.manifest_digest.split(":")[1]
    leftover = local / "bundles" / rootfs.work_name("tmp", key, _dead_pid())
    deep_tree(leftover / "rootfs", 2500)
    other = make_image(store, tar(reg("x", b"x")))
    stale_other = local / "bundles" / rootfs.work_name("rm", "f" * 64, _dead_pid())
    deep_tree(stale_other, 1500)
    path = rootfs.create(image, store)
    assert (path / "etc/hostname").read_text() == "test\n"
    assert rootfs.create(other, store).is_dir()
    assert work_dirs(local / "bundles") == []


@pytest.mark.deep
def test_rm_of_a_bundle_holding_a_deep_tree(local, store, image):
    """What a payload left in its rootfs (any depth, 0500 dirs) never stops `uctr rm`."""
    path = rootfs.create(image, store)
    deep_tree(path / "tmp-deep", 2500)
    local_store = rootfs.BundleStore().existing()
    rootfs.remove(path.parent, local_store)
    assert not path.parent.exists() and work_dirs(local / "bundles") == []


def test_image_without_diff_ids_is_rejected(local, store):
    record = make_image(store, tar(reg("f", b"f")))
    record = replace(record, config={k: v for k, v in record.config.items() if k != "rootfs"})
    with pytest.raises(LayerRejected, match="diff_ids"):
        rootfs.create(record, store)
    assert work_dirs(local / "bundles") == []


def test_image_whose_diff_ids_do_not_match_is_rejected(local, store):
    record = make_image(store, tar(reg("f", b"f")))
    config = dict(record.config, rootfs={"type": "layers", "diff_ids": ["sha256:" + "0" * 64]})
    with pytest.raises(LayerRejected, match="diff_id"):
        rootfs.create(replace(record, config=config), store)
    assert work_dirs(local / "bundles") == []
    assert rootfs.create(record, store).is_dir()  # the good one still works after


REMOVE_AS_USER = r"""
import os, sys
from pathlib import Path
from uctr_batch import fsutil
base = Path(sys.argv[1])
outside = base / "outside"
outside.mkdir(mode=0o500)
top = base / "tree"
top.mkdir()
fd = os.open(top, os.O_RDONLY)
for level in range(3000):
    os.mkdir("d", dir_fd=fd)
    os.symlink(str(outside), "out", dir_fd=fd)
    os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0, dir_fd=fd))
    child = os.open("d", os.O_RDONLY, dir_fd=fd)
    os.fchmod(fd, 0o000 if level % 2 else 0o500)
    os.close(fd)
    fd = child
os.fchmod(fd, 0)
os.close(fd)
fsutil.remove_tree(top)
print(top.exists(), oct(outside.stat().st_mode & 0o777))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not users.can_switch_user(), reason="needs root and uctrtest"
)
def test_unprivileged_remove_tree_of_locked_deep_dirs(tmp_path):
    """As a plain user (no CAP_DAC_OVERRIDE): 3000 levels of 0000/0500 directories are
    removed; the symlinked directory outside keeps its mode (chmod goes through an O_PATH
    fd of the entry itself, never through a link)."""
    base = Path(tempfile.mkdtemp(prefix="uctr-rm-user-", dir="/tmp"))
    try:
        base.chmod(0o755)
        shutil.chown(base, users.TEST_USER)
        result = users.run_as(users.TEST_USER,
                              [sys.executable, "-c", REMOVE_AS_USER, str(base)],
                              env={"PYTHONPATH": str(REPO), "PATH": os.environ["PATH"]},
                              cwd="/")
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split() == ["False", "0o500"]
    finally:
        fsutil.remove_tree(base)


@pytest.mark.parametrize("where", ["file", "proc"])
def test_dest_that_cannot_be_created_is_a_user_error(tmp_path, store, image, where):
    """An OSError on the way (here: a parent that is a file, or /proc) was a traceback."""
    if where == "file":
        (tmp_path / "afile").write_text("x")
        dest = tmp_path / "afile" / "bundle"
    else:
        dest = Path("/proc/uctr-no-such-dir/bundle")
    with pytest.raises(StorageError, match="cannot create the bundle of") as info:
        rootfs.create(image, store, dest)
    assert info.value.exit_code == 1
