"""The content-addressed cache: layout, ingest, references, gc, verify, and its commands."""

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uctr_batch import cli
from uctr_batch.errors import DigestMismatch, ImageNotFound, StorageError
from uctr_batch.image import manifest as mt
from uctr_batch.image import platforms
from uctr_batch.image.store import CACHED, DOWNLOADED, WAITED, Store, build_record

ROOT = Path(__file__).resolve().parents[2]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def writer(data: bytes):
    """A fetch_fn that writes `data` and verifies nothing (the store tests own the checks)."""
    def fetch(partial: Path) -> None:
        partial.write_bytes(data)
    return fetch


def add_image(store: Store, reference: str, arch="amd64", variant=None, layers=(b"layer-one",),
              record=True):
    """Put a small image into the store the way a pull does; return its record."""
    config = {"architecture": arch, "os": "linux", "config": {"Env": ["A=1"]},
              "rootfs": {"type": "layers", "diff_ids": [digest(x) for x in layers]}}
    if variant:
        config["variant"] = variant
    config_bytes = json.dumps(config, sort_keys=True).encode()
    for data in layers:
        store.ingest_blob(digest(data), writer(data))
    store.put_bytes(digest(config_bytes), config_bytes)
    manifest = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                "config": {"mediaType": mt.OCI_CONFIG, "digest": digest(config_bytes),
                           "size": len(config_bytes)},
                "layers": [{"mediaType": mt.OCI_LAYER_TAR, "digest": digest(x), "size": len(x)}
                           for x in layers]}
    manifest_bytes = json.dumps(manifest).encode()
    store.put_bytes(digest(manifest_bytes), manifest_bytes)
    rec = build_record(reference, digest(manifest_bytes), manifest, config)
    if record:
        store.record(rec)
    return rec


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "cache")


# -- layout and root ----------------------------------------------------------------------

def test_new_root_is_private_and_laid_out(store):
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    for sub in ("blobs/sha256", "refs", "tmp", "locks"):
        assert (store.root / sub).is_dir()
    d = digest(b"x")
    assert store.blob_path(d) == store.root / "blobs" / "sha256" / d.split(":")[1]


@pytest.mark.parametrize("bad", ["sha256:../../etc/passwd", "sha256:" + "A" * 64, "md5:" + "0" * 32,
                                 "sha256:" + "0" * 63, "sha256/" + "0" * 64, ""])
def test_bad_digests_never_become_paths(store, bad):
    with pytest.raises(StorageError):
        store.blob_path(bad)


def test_world_writable_root_is_refused(tmp_path):
    root = tmp_path / "open"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(StorageError, match="writable by everyone"):
        Store(root)


def test_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(StorageError, match="not a directory"):
        Store(tmp_path / "f")


def test_group_shared_root_keeps_its_mode_on_subdirectories(tmp_path):
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o2770)
    store = Store(root)
    for sub in ("blobs", "blobs/sha256", "refs", "tmp", "locks"):
        assert stat.S_IMODE((store.root / sub).stat().st_mode) == 0o2770


def test_sticky_world_writable_root_is_refused_too(tmp_path):
    root = tmp_path / "tmpish"
    root.mkdir()
    root.chmod(0o1777)
    with pytest.raises(StorageError, match="writable by everyone"):
        Store(root)


# -- blobs --------------------------------------------------------------------------------

def test_ingest_fetches_once_then_reports_cached(store):
    calls = []
    data = b"hello"

    def fetch(partial):
        calls.append(partial)
        partial.write_bytes(data)

    assert store.ingest_blob(digest(data), fetch, size=5) == DOWNLOADED
    assert store.ingest_blob(digest(data), fetch) == CACHED
    assert len(calls) == 1 and calls[0] == store.partial_path(digest(data))
    assert store.read_blob(digest(data)) == data
    assert not any((store.root / "tmp").iterdir()) and not any((store.root / "locks").iterdir())


def test_failed_fetch_leaves_nothing_in_blobs(store):
    d = digest(b"good")

    def bad(partial):
        partial.write_bytes(b"evil")
        partial.unlink()
        raise DigestMismatch("wrong bytes")

    with pytest.raises(DigestMismatch):
        store.ingest_blob(d, bad)
    assert not store.has_blob(d)
    with pytest.raises(DigestMismatch, match="5 bytes"):
        store.ingest_blob(d, writer(b"short"), size=4)
    assert not store.has_blob(d) and not store.partial_path(d).exists()


def test_put_bytes_checks_the_digest(store):
    with pytest.raises(DigestMismatch):
        store.put_bytes(digest(b"a"), b"b")
    assert not store.has_blob(digest(b"a"))
    store.put_bytes(digest(b"a"), b"a")
    assert store.read_blob(digest(b"a")) == b"a"


def test_ingest_stream_verifies_or_computes(store, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"stream data")
    with open(src, "rb") as f:
        assert store.ingest_stream(f) == (digest(b"stream data"), DOWNLOADED)
    with open(src, "rb") as f:
        with pytest.raises(DigestMismatch):
            store.ingest_stream(f, digest(b"something else"))
    assert not store.has_blob(digest(b"something else"))
    assert not any((store.root / "tmp").iterdir())


def test_partial_left_by_a_killed_downloader_is_handed_to_the_next(store):
    data = b"0123456789"
    store.partial_path(digest(data)).write_bytes(data[:4])  # as if SIGKILLed mid-download

    def resume(partial):
        have = partial.read_bytes()
        assert have == data[:4]
        with open(partial, "ab") as f:
            f.write(data[len(have):])

    assert store.ingest_blob(digest(data), resume) == DOWNLOADED
    assert store.read_blob(digest(data)) == data


INGESTER = r"""
import sys, time
from pathlib import Path
from uctr_batch.image.store import Store
root, data, log = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
def fetch(partial):
    with open(log, "a") as f:
        f.write("fetch\n")
    time.sleep(0.5)
    Path(partial).write_bytes(data)
import hashlib
print(Store(root).ingest_blob("sha256:" + hashlib.sha256(data).hexdigest(), fetch))
"""


def test_concurrent_processes_fetch_a_blob_once(store, tmp_path):
    log = tmp_path / "fetches"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", INGESTER, str(store.root), "shared", str(log)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    outcomes = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outcomes.append(out.strip())
    assert log.read_text() == "fetch\n"
    assert outcomes.count(DOWNLOADED) == 1
    assert set(outcomes) <= {DOWNLOADED, WAITED, CACHED}
    assert store.read_blob(digest(b"shared")) == b"shared"


# -- references ---------------------------------------------------------------------------

def test_record_and_lookup_roundtrip(store):
    rec = add_image(store, "docker.io/library/busybox:1")
    got = store.lookup("busybox:1", platforms.parse("linux/amd64"))
    assert got == rec and got.config["config"]["Env"] == ["A=1"]
    assert store.lookup("busybox:2", platforms.parse("linux/amd64")) is None
    assert store.missing_blobs(got) == []


def test_lookup_picks_the_platform(store):
    add_image(store, "r.example/multi:1", arch="amd64", layers=(b"amd",))
    add_image(store, "r.example/multi:1", arch="arm64", variant="v8", layers=(b"arm",))
    arm = store.lookup("r.example/multi:1", platforms.parse("linux/arm64"))
    assert arm.layer_digests() == [digest(b"arm")]
    amd = store.lookup("r.example/multi:1", platforms.parse("linux/amd64"))
    assert amd.layer_digests() == [digest(b"amd")]
    assert store.lookup("r.example/multi:1", platforms.parse("linux/s390x")) is None
    assert len(store.find("r.example/multi:1")) == 2


def test_remove_ref_by_name_and_by_digest(store):
    a = add_image(store, "r.example/a:1", layers=(b"a",))
    add_image(store, "r.example/b:1", layers=(b"b",))
    assert store.remove_ref("r.example/a:1") == 1
    assert store.lookup("r.example/a:1") is None
    assert store.has_blob(a.layers[0].digest)  # blobs wait for gc
    b = store.find("r.example/b:1")[0]
    assert store.remove_ref(b.manifest_digest[:19]) == 1
    assert store.entries() == []
    assert store.remove_ref("r.example/none:1") == 0


# -- gc -----------------------------------------------------------------------------------

def _age_all_blobs(store, seconds=3600):
    for _, path in store.blobs():
        age(path, seconds)


def test_gc_removes_unreferenced_old_blobs_only(store):
    kept = add_image(store, "r.example/kept:1", layers=(b"kept",))
    gone = add_image(store, "r.example/gone:1", layers=(b"gone",))
    store.remove_ref("r.example/gone:1")
    _age_all_blobs(store)
    store.ingest_blob(digest(b"young"), writer(b"young"))  # e.g. a concurrent pull's new layer

    gone_blobs = {gone.manifest_digest, gone.config_digest, digest(b"gone")}
    dry = store.gc(dry_run=True)
    assert {d for d, _ in dry.blobs} == gone_blobs
    assert store.has_blob(digest(b"gone"))

    report = store.gc()
    assert {d for d, _ in report.blobs} == gone_blobs
    assert report.kept_young == 1 and store.has_blob(digest(b"young"))
    assert store.missing_blobs(kept) == []
    assert not store.has_blob(digest(b"gone"))


def test_gc_keeps_what_a_running_pull_announced(store):
    rec = add_image(store, "r.example/p:1", layers=(b"p",), record=False)
    _age_all_blobs(store)
    with store.pending([rec.manifest_digest, rec.config_digest, digest(b"p")]):
        assert store.gc().blobs == []
    assert {d for d, _ in store.gc().blobs} == {rec.manifest_digest, rec.config_digest,
                                                 digest(b"p")}


def test_gc_sweeps_abandoned_partials_but_not_one_being_written(store):
    busy, idle = digest(b"busy"), digest(b"idle")
    for d in (busy, idle):
        store.partial_path(d).write_bytes(b"x")
        age(store.partial_path(d), 3600)
    with store.blob_lock(busy):
        report = store.gc()
    assert report.partials == [store.partial_path(idle).name]
    assert store.partial_path(busy).exists() and not store.partial_path(idle).exists()


# -- verify -------------------------------------------------------------------------------

def test_verify_reports_then_removes_a_corrupt_blob(store):
    rec = add_image(store, "r.example/v:1", layers=(b"fine", b"will rot"))
    rotten = store.blob_path(digest(b"will rot"))
    rotten.chmod(0o644)
    rotten.write_bytes(b"bit flip")
    report = store.verify()
    assert [d for d, _ in report.bad] == [digest(b"will rot")] and report.removed == []
    assert report.checked == 4 and rotten.exists()
    report = store.verify(remove=True)
    assert report.removed == [digest(b"will rot")] and not rotten.exists()
    assert store.verify().missing == [(digest(b"will rot"), rec.reference)]


# -- commands -----------------------------------------------------------------------------

@pytest.fixture
def cache_env(store, monkeypatch):
    monkeypatch.setenv("UCTR_CACHE", str(store.root))
    return store


def test_commands_images_inspect_rmi(cache_env, capsys):
    rec = add_image(cache_env, "r.example:5000/team/app:2.1", layers=(b"l1", b"l2"))
    assert cli.main(["images"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "DIGEST", "PLATFORM", "SIZE", "PULLED"]
    assert lines[1].split()[:4] == ["r.example:5000/team/app", "2.1", rec.manifest_digest[:19],
                                    "linux/amd64"]

    assert cli.main(["images", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["manifest_digest"] == rec.manifest_digest and entry["reference"] == rec.reference

    assert cli.main(["inspect", "r.example:5000/team/app:2.1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [la["digest"] for la in info["layers"]] == rec.layer_digests()
    assert info["config"]["config"]["Env"] == ["A=1"] and info["platform"] == "linux/amd64"

    assert cli.main(["rmi", "r.example:5000/team/app:2.1", "r.example/nope:1"]) == 1
    captured = capsys.readouterr()
    assert "untagged r.example:5000/team/app:2.1" in captured.out
    assert "error: no such image in the cache: r.example/nope:1" in captured.err
    assert cli.main(["inspect", "r.example:5000/team/app:2.1"]) == 1


def test_commands_gc_and_verify(cache_env, capsys):
    add_image(cache_env, "r.example/x:1", layers=(b"x",))
    cache_env.remove_ref("r.example/x:1")
    _age_all_blobs(cache_env)
    assert cli.main(["gc", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("would remove sha256:") == 3
    assert cli.main(["gc"]) == 0
    assert capsys.readouterr().out.count("removed sha256:") == 3
    assert list(cache_env.blobs()) == []

    add_image(cache_env, "r.example/y:1", layers=(b"y",))
    cache_env.blob_path(digest(b"y")).write_bytes(b"z")
    assert cli.main(["verify"]) == 1
    captured = capsys.readouterr()
    assert f"bad {digest(b'y')}" in captured.out
    assert "hint: run `uctr verify --remove`" in captured.err
    assert cli.main(["verify", "--remove"]) == 0
    assert f"removed {digest(b'y')}" in capsys.readouterr().out
    assert cli.main(["verify"]) == 0


def test_gc_clears_the_lock_of_a_dead_downloader_but_not_a_live_one(store):
    dead = store.lock_path("a" * 64)
    dead.write_text(json.dumps({"host": os.uname().nodename, "pid": 2 ** 22 + 1,
                                "boot_id": _boot_id(), "token": "t",
                                "pidns": str(os.stat("/proc/self/ns/pid").st_ino)}))
    with store.blob_lock(digest(b"live")):
        store.gc()
        assert store.lock_path(digest(b"live").split(":")[1]).exists()
    assert not dead.exists()


def _boot_id():
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


# -- cache entries written before the documents were checked ------------------------------

def _record_raw(store: Store, reference: str, manifest_bytes: bytes) -> None:
    store.put_bytes(digest(manifest_bytes), manifest_bytes)
    entry = {"reference": reference, "platform": "linux/amd64",
             "manifest_digest": digest(manifest_bytes), "index_digest": None,
             "config_digest": "sha256:" + "0" * 64, "size": 0, "pulled": 0}
    store._ref_file(reference, "linux/amd64").write_text(json.dumps(entry))


@pytest.mark.parametrize("manifest_bytes", [
    b'{"config": ' + b"[" * 50000 + b"]" * 50000 + b"}",  # was a RecursionError traceback
    b"[1, 2]",  # was an AttributeError traceback
    json.dumps({"config": "x", "layers": []}).encode(),
    json.dumps({"config": {"digest": "sha256:" + "0" * 64, "size": 2},
                "layers": [{"digest": "sha256:" + "0" * 64, "size": "5"}]}).encode(),
])
def test_malformed_cached_manifest_is_a_storage_error(store, manifest_bytes):
    _record_raw(store, "example.org/a/b:1", manifest_bytes)
    store.put_bytes(digest(b"{}"), b"{}")
    with pytest.raises((StorageError, ImageNotFound)) as info:
        store.lookup("example.org/a/b:1", mt.Platform("linux", "amd64"))
    assert info.value.hint


@pytest.mark.parametrize("content", [
    b'{"reference": ' + b"[" * 50000 + b"]" * 50000 + b"}",  # RecursionError before
    json.dumps({"reference": 5, "manifest_digest": "x"}).encode(),
    json.dumps({"reference": "example.org/a/b:1", "platform": "x",
                "manifest_digest": "sha256:" + "0" * 64,
                "config_digest": "sha256:" + "0" * 64}).encode(),
    json.dumps({"reference": "example.org/a/b:1", "platform": ["linux"],
                "manifest_digest": "sha256:" + "0" * 64,
                "config_digest": "sha256:" + "0" * 64}).encode(),
    b"x" * 100000,
])
def test_planted_or_broken_reference_entries_are_skipped(store, content):
    """A group-shared cache may hold ref files another member wrote by hand: they are
    skipped by images/lookup/gc, never a traceback."""
    add_image(store, "example.org/a/good:1")
    (store.root / "refs" / "example.org%a%b+1#linux_amd64.json").write_bytes(content)
    assert [e["reference"] for e in store.entries()] == ["example.org/a/good:1"]
    assert store.lookup("example.org/a/b:1", mt.Platform("linux", "amd64")) is None
    store.gc()


@pytest.mark.parametrize("content", [
    b'{"pid": "abc", "since": "yesterday", "token": "t"}',  # ValueError before
    b'{"pid": 1e400, "since": -5}',
    b"[" * 50000,
    b'{"pid": ' + b"[" * 50000 + b"]" * 50000 + b"}",  # RecursionError before
])
def test_planted_lock_files_do_not_break_the_lock(tmp_path, content):
    from uctr_batch.image.lock import FileLock, Holder

    holder = Holder.parse(content.decode())
    assert holder.pid == 0 and holder.since == 0.0
    path = tmp_path / "x.lock"
    path.write_bytes(content)
    old = time.time() - 3600
    os.utime(path, (old, old))  # old enough to be judged stale at first sight
    lock = FileLock(path, timeout=5, stale_after=1)
    lock.acquire()
    lock.release()
