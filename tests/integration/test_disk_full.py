"""A shared cache that fills up (bytes or inodes) while `uctr pull` or `uctr load` writes it:
the real registry, the real CLI, the cache on a small size-limited tmpfs (needs root).

At every fill point the command must say `error: ... no space left on ...` with a hint and
exit 1 (errors.NoSpace), keep nothing half-made that a later command would trust (every blob
in blobs/ hashes to its name, no reference points at a missing blob, no temp files), not retry
the full disk like a network error, and succeed once space is freed."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

PAGE = 4096


def _round(n: int) -> int:
    return -(-n // PAGE) * PAGE


@pytest.fixture
def small_fs(tmp_path):
    """mount(size, inodes=None) -> Path of a fresh tmpfs with those limits."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mounted = []

    def mount(size: int, inodes=None) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(point: Path, leave: int) -> Path:
    """Allocate a filler file so that about LEAVE bytes stay free on POINT."""
    filler = point / "filler"
    size = max(0, free_bytes(point) - leave)
    if size:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    return filler


def assert_no_space(result):
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    error = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert error and ("no space left on" in error[0] or "quota" in error[0]), result.stderr
    assert "corrupt" not in result.stderr
    assert any(ln.startswith("hint:") for ln in result.stderr.splitlines()), result.stderr
    assert "retry" not in result.stderr  # -v shows every retry: a full disk is not retried


def assert_nothing_half_made(cache: Path):
    """What a later pull trusts: blobs (by name) and references (by the blobs they name)."""
    if not cache.exists():
        return
    blobs = cache / "blobs" / "sha256"
    names = set(os.listdir(blobs)) if blobs.is_dir() else set()
    for name in names:
        assert hashlib.sha256((blobs / name).read_bytes()).hexdigest() == name, name
    refs = cache / "refs"
    for ref in (os.listdir(refs) if refs.is_dir() else ()):
        entry = json.loads((refs / ref).read_text())
        for key in ("manifest_digest", "config_digest"):
            assert entry[key].split(":")[1] in names, (ref, key)
        manifest = json.loads((blobs / entry["manifest_digest"].split(":")[1]).read_bytes())
        for layer in manifest["layers"]:
            assert layer["digest"].split(":")[1] in names, (ref, layer)
    for sub in ("tmp", "locks", "refs"):
        directory = cache / sub
        leftovers = [n for n in (os.listdir(directory) if directory.is_dir() else ())
                     if n.endswith(".tmp") or n.startswith("pull-")]
        assert not leftovers, (sub, leftovers)
    locks = cache / "locks"
    held = [n for n in (os.listdir(locks) if locks.is_dir() else ()) if n.endswith(".lock")]
    assert not held, held  # the failed process released what it took


def image_bytes(image) -> int:
    """Pages the image's blobs take on tmpfs (manifest, config, layers)."""
    manifest = image.manifest()
    sizes = [len(image.blob(image.manifest_digest())), manifest["config"]["size"]]
    sizes += [layer["size"] for layer in manifest["layers"]]
    return sum(map(_round, sizes))


def pull_into_full_cache(uctr, small_fs, pushed, image, leave=None, inodes=None):
    size = _round(image_bytes(image) * 3 + (1 << 20))
    point = small_fs(size, inodes)
    cache = point / "cache"
    filler = fill(point, leave) if leave is not None else None
    env = {"UCTR_CACHE": cache, "UCTR_PARALLEL": 1, "UCTR_RETRIES": 3}
    return point, cache, filler, env


@pytest.mark.parametrize("where", ["first-write", "manifest-and-config", "first-layer",
                                   "last-chunk"])
def test_pull_into_a_full_cache(uctr, small_fs, pushed, test_images, registry_http, where):
    image = test_images["layers"]
    heads = _round(len(image.blob(image.manifest_digest()))) + \
        _round(image.manifest()["config"]["size"])
    total = image_bytes(image)
    leave = {
        "first-write": 0,  # the pull marker, a lock or the manifest: the very first file
        "manifest-and-config": heads // 2,
        "first-layer": heads + 3 * PAGE,  # room for the manifests, not for a layer
        "last-chunk": total - 2 * PAGE,  # every blob but the end of one
    }[where]
    point, cache, filler, env = pull_into_full_cache(uctr, small_fs, pushed, image, leave)
    before = {d: registry_http.blob_gets(d) for d in image.layer_digests()}
    result = uctr("pull", "-v", pushed["layers"], env=env)
    assert_no_space(result)
    assert str(point) in result.stderr
    assert_nothing_half_made(cache)
    # not a retry storm: each layer was asked for at most once
    after = {d: registry_http.blob_gets(d) for d in image.layer_digests()}
    assert all(after[d] - before[d] <= 1 for d in after), (before, after)

    filler.unlink()
    again = uctr("pull", pushed["layers"], env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == [pushed["layers"], image.manifest_digest()]
    assert_nothing_half_made(cache)
    verify = uctr("verify", env=env)
    assert verify.returncode == 0 and verify.stdout == "", verify.stderr


def test_pull_resumes_the_partial_left_by_a_full_disk(uctr, small_fs, pushed, test_images,
                                                      registry_http):
    """The bytes that fitted are kept and verified later: the next pull asks with Range."""
    image = test_images["busybox"]
    layer = image.manifest()["layers"][0]
    heads = _round(len(image.blob(image.manifest_digest()))) + \
        _round(image.manifest()["config"]["size"])
    point, cache, filler, env = pull_into_full_cache(
        uctr, small_fs, pushed, image, leave=heads + _round(layer["size"]) // 2)
    assert_no_space(uctr("pull", "-v", pushed["busybox"], env=env))
    assert_nothing_half_made(cache)
    partial = cache / "tmp" / (layer["digest"].split(":")[1] + ".partial")
    assert partial.exists() and 0 < partial.stat().st_size < layer["size"]
    filler.unlink()
    again = uctr("pull", "-v", pushed["busybox"], env=env)
    assert again.returncode == 0, again.stderr
    assert f"resuming {layer['digest']} after" in again.stderr
    assert_nothing_half_made(cache)


def test_pull_out_of_inodes(uctr, small_fs, pushed, test_images):
    image = test_images["layers"]
    # root + cache + 5 subdirectories + a few files: the 12th inode is refused
    point = small_fs(16 << 20, inodes=12)
    cache = point / "cache"
    env = {"UCTR_CACHE": cache, "UCTR_PARALLEL": 1}
    result = uctr("pull", "-v", pushed["layers"], env=env)
    assert_no_space(result)
    assert " free inodes" in result.stderr and "or inodes" in result.stderr, result.stderr
    assert_nothing_half_made(cache)


# -- uctr load ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def load_archives(tmp_path_factory, test_images):
    d = tmp_path_factory.mktemp("full-archives")
    layers = test_images["layers"]
    for target in (f"docker-archive:{d}/docker.tar:example.org/full/layers:1",
                   f"oci-archive:{d}/oci.tar:1"):
        argv = ["skopeo", "--insecure-policy", "copy", "--quiet", layers.oci_ref, target]
        result = subprocess.run(argv, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    return d


@pytest.mark.parametrize("archive", ["docker.tar", "oci.tar"])
@pytest.mark.parametrize("leave", [0, 64 * 1024, 200 * 1024])
def test_load_into_a_full_cache(uctr, small_fs, test_images, load_archives, archive, leave):
    point = small_fs(8 << 20)
    cache = point / "cache"
    filler = fill(point, leave)
    env = {"UCTR_CACHE": cache}
    result = uctr("load", "-v", load_archives / archive, env=env)
    assert_no_space(result)
    assert_nothing_half_made(cache)
    partials = [n for n in os.listdir(cache / "tmp")] if (cache / "tmp").is_dir() else []
    assert not partials, partials  # a stream cannot resume: no part of it is kept
    filler.unlink()
    again = uctr("load", load_archives / archive, env=env)
    assert again.returncode == 0, again.stderr
    assert_nothing_half_made(cache)
    verify = uctr("verify", env=env)
    assert verify.returncode == 0 and verify.stdout == "", verify.stderr
