"""A damaged or hostile shared cache (red team rt3): a blob, ref file, lock file, partial
download or cache subdirectory replaced by a FIFO, a symlink to /dev/zero or to another
file, a directory, garbage or a truncated copy. Every image command (images, inspect,
verify, gc, create, pull, rmi) must end with a documented exit code, `error:` + `hint:` on
failure, no traceback, no hang, bounded memory; and `uctr verify --remove` or a re-pull
must repair what a pull can repair.

Before these fixes: a FIFO blob hung `uctr verify`; a FIFO ref file hung every command; a
config symlinked to /dev/zero was read without end (`uctr inspect` OOM-killed); a FIFO or
/dev/zero lock file hung or crashed `uctr gc`; a directory at a blob, ref, lock or partial
name, or a cache subdirectory that is a file, was a traceback (exit 70)."""

import io
import os
import resource
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.harness.fakeregistry import FakeRegistry
from uctr_batch.errors import EXIT_CODES

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("bin/hello", b"#!/bin/sh\necho hi\n"), ("etc/x", b"x" * 3000)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def registry():
    with FakeRegistry() as fake:
        doc = fake.image(layers=(layer_tar(),))
        yield fake, doc


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # an unbounded read dies here


def uctr(env, *args):
    try:
        result = subprocess.run([sys.executable, "-m", "uctr_batch", *args], env=env,
                                capture_output=True, text=True, timeout=40,
                                preexec_fn=_limits)
    except subprocess.TimeoutExpired:
        pytest.fail(f"uctr {' '.join(args)} hung")
    assert "Traceback" not in result.stderr, (args, result.stderr)
    assert result.returncode in EXIT_CODES and result.returncode != 70, (args, result.stderr)
    if result.returncode:
        lines = result.stderr.splitlines()
        assert any(line.startswith("error: ") for line in lines), (args, result.stderr)
        assert any(line.startswith("hint: ") for line in lines), (args, result.stderr)
    return result


def blob(cache, digest):
    return cache / "blobs" / "sha256" / digest.split(":")[1]


def plant(path: Path, kind: str) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        os.symlink("/dev/zero", path)
    elif kind == "other":
        os.symlink("/etc/passwd", path)
    elif kind == "dir":
        path.mkdir()
        (path / "x").write_text("x")
    elif kind == "file":
        path.write_text("x")


def manifest_digest(cache, doc):
    known = {doc["config"]["digest"].split(":")[1], doc["layers"][0]["digest"].split(":")[1]}
    names = [n for n in os.listdir(cache / "blobs" / "sha256") if n not in known]
    assert len(names) == 1
    return "sha256:" + names[0]


def target(cache, doc, where):
    layer = doc["layers"][0]["digest"]
    if where == "layer":
        return blob(cache, layer)
    if where == "config":
        return blob(cache, doc["config"]["digest"])
    if where == "manifest":
        return blob(cache, manifest_digest(cache, doc))
    if where == "ref":
        return next((cache / "refs").iterdir())
    if where == "lock":
        return cache / "locks" / (layer.split(":")[1] + ".lock")
    if where == "partial":
        blob(cache, layer).unlink()  # a pull must resume or restart it
        return cache / "tmp" / (layer.split(":")[1] + ".partial")
    return cache / where  # a cache subdirectory


DAMAGES = [(w, k) for w in ("layer", "config", "manifest") for k in ("fifo", "zero", "other",
                                                                      "dir")]
DAMAGES += [("ref", k) for k in ("fifo", "zero", "dir")]
DAMAGES += [("lock", k) for k in ("fifo", "zero", "dir")]
DAMAGES += [("partial", k) for k in ("fifo", "zero", "dir")]
# a cache subdirectory that is not one: a clear error naming it (not repaired by itself)
BROKEN_LAYOUT = [("refs", "file"), ("blobs/sha256", "file"), ("tmp", "fifo"), ("locks", "zero")]


@pytest.fixture
def env(registry, tmp_path):
    fake, doc = registry
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO),
           "UCTR_CACHE": str(tmp_path / "cache"), "UCTR_CONFIG_DIR": str(tmp_path / "cfg"),
           "UCTR_LOCAL_DIR": str(tmp_path / "local"), "UCTR_INSECURE_REGISTRIES": fake.host,
           "UCTR_RETRIES": "0", "UCTR_STALL_TIMEOUT": "5"}
    ref = f"{fake.host}/img:1"
    assert uctr(env, "pull", ref).returncode == 0
    return env, ref, doc, tmp_path / "cache"


@pytest.mark.parametrize("where,kind", DAMAGES, ids=[f"{w}-{k}" for w, k in DAMAGES])
def test_damaged_cache_entry_every_command_then_repair(env, where, kind):
    env, ref, doc, cache = env
    plant(target(cache, doc, where), kind)
    for args in (["images"], ["inspect", ref], ["verify"], ["gc"], ["create", "--no-pull", ref],
                 ["rmi", ref]):
        uctr(env, *args)
    uctr(env, "verify", "--remove")
    assert uctr(env, "pull", ref).returncode == 0
    assert uctr(env, "verify").returncode == 0  # every blob is whole again
    assert uctr(env, "create", "--no-pull", ref).returncode == 0


@pytest.mark.parametrize("where,kind", DAMAGES[:12], ids=[f"{w}-{k}" for w, k in DAMAGES[:12]])
def test_a_pull_alone_repairs_a_damaged_blob(env, where, kind):
    env, ref, doc, cache = env
    plant(target(cache, doc, where), kind)
    assert uctr(env, "pull", ref).returncode == 0
    assert uctr(env, "verify").returncode == 0
    assert uctr(env, "create", ref).returncode == 0


@pytest.mark.parametrize("where,kind", BROKEN_LAYOUT, ids=[f"{w}-{k}" for w, k in BROKEN_LAYOUT])
def test_cache_subdirectory_that_is_not_one(env, where, kind):
    env, ref, doc, cache = env
    plant(cache / where, kind)
    for args in (["images"], ["inspect", ref], ["verify"], ["gc"], ["pull", ref],
                 ["create", ref], ["rmi", ref]):
        result = uctr(env, *args)
        assert result.returncode == 1 and "is not a directory" in result.stderr
    os.unlink(cache / where)  # what the hint says
    assert uctr(env, "pull", ref).returncode == 0


def test_garbage_config_is_refetched_not_blamed_on_the_registry(env):
    env, ref, doc, cache = env
    blob(cache, doc["config"]["digest"]).write_bytes(b"not json at all")
    result = uctr(env, "pull", ref)
    assert result.returncode == 0, result.stderr
    assert uctr(env, "verify").returncode == 0


@pytest.mark.parametrize("kind", ["fifo", "zero", "dir", "file"])
def test_a_planted_lock_of_any_type_is_broken_once_stale(tmp_path, kind):
    """A lock file nobody heartbeats (here a FIFO, a /dev/zero link, a directory or junk)
    is judged stale after stale_after and broken; the blob is then fetched."""
    from uctr_batch.image.store import Store

    store = Store(tmp_path / "cache", stale_after=0.5, lock_timeout=60)
    data = b"blob bytes"
    digest = "sha256:" + __import__("hashlib").sha256(data).hexdigest()
    plant(store.lock_path(digest.split(":")[1]), kind)

    def fetch(partial):
        Path(partial).write_bytes(data)

    assert store.ingest_blob(digest, fetch, len(data)) in ("downloaded", "waited", "cached")
    assert store.read_blob(digest) == data
    assert not os.path.lexists(store.lock_path(digest.split(":")[1]))
