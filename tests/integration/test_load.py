"""`uctr load` and oci:/oci-archive:/docker-archive: references, with archives made by skopeo."""

import hashlib
import io
import os
import json
import shutil
import subprocess
import tarfile

import pytest


def skopeo_copy(src, dest, *extra):
    argv = ["skopeo", "--insecure-policy", "copy", "--quiet", *extra, src, dest]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def archives(tmp_path_factory, test_images):
    """busybox as a docker-archive and an OCI archive; multiarch as an OCI archive (index)."""
    d = tmp_path_factory.mktemp("archives")
    busybox, multiarch = test_images["busybox"], test_images["multiarch"]
    skopeo_copy(busybox.oci_ref,
                f"docker-archive:{d}/busybox-docker.tar:example.org/team/busybox:1")
    skopeo_copy(busybox.oci_ref, f"oci-archive:{d}/busybox-oci.tar:1", "--preserve-digests")
    skopeo_copy(multiarch.oci_ref, f"oci-archive:{d}/multiarch-oci.tar:1",
                "--preserve-digests", "--all")
    return d


def ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


def inspect(uctr, ref, *extra):
    return json.loads(ok(uctr("inspect", *extra, ref)))


def test_load_docker_archive(uctr, archives, test_images):
    busybox = test_images["busybox"]
    out = ok(uctr("load", "-v", archives / "busybox-docker.tar"))
    ref, digest = out.split()
    assert ref == "example.org/team/busybox:1" and digest.startswith("sha256:")
    info = inspect(uctr, ref)
    # layers are stored uncompressed: their digests are the image's diff_ids
    assert [la["digest"] for la in info["layers"]] == busybox.config()["rootfs"]["diff_ids"]
    assert {la["compression"] for la in info["layers"]} == {"none"}
    assert info["config"]["config"]["Cmd"] == busybox.config()["config"]["Cmd"]
    assert info["platform"] == "linux/amd64"

    again = uctr("load", "-v", archives / "busybox-docker.tar")
    assert ok(again) == out  # same synthesised manifest
    assert "cached" in again.stderr and "downloaded" not in again.stderr
    assert ok(uctr("verify")) == ""


def test_docker_archive_reference_selects_by_name(uctr, archives):
    path = archives / "busybox-docker.tar"
    out = ok(uctr("load", f"docker-archive:{path}:example.org/team/busybox:1"))
    assert out.split()[0] == f"docker-archive:{path}:example.org/team/busybox:1"
    bad = uctr("load", f"docker-archive:{path}:example.org/team/other:2")
    assert bad.returncode == 1
    assert "no image example.org/team/other:2" in bad.stderr
    assert "example.org/team/busybox:1" in bad.stderr  # the hint lists what is there


def test_load_oci_archive_keeps_digests(uctr, archives, test_images):
    busybox = test_images["busybox"]
    out = ok(uctr("load", archives / "busybox-oci.tar", "--tag", "local/busybox:oci"))
    ref, digest = out.split()
    assert ref == "docker.io/local/busybox:oci" and digest == busybox.manifest_digest()
    info = inspect(uctr, "local/busybox:oci")
    assert [la["digest"] for la in info["layers"]] == busybox.layer_digests()


@pytest.mark.parametrize("platform,arch", [(None, "amd64"), ("linux/arm64", "arm64")])
def test_oci_archive_index_selects_platform(uctr, archives, test_images, platform, arch):
    multiarch = test_images["multiarch"]
    ref = f"oci-archive:{archives / 'multiarch-oci.tar'}:1"
    extra = ["--platform", platform] if platform else []
    out = ok(uctr("load", ref, *extra))
    assert out.split() == [ref, multiarch.manifest_digest(arch)]
    info = inspect(uctr, ref, *extra)
    assert [la["digest"] for la in info["layers"]] == multiarch.layer_digests(arch)
    assert info["index_digest"] == multiarch.top_descriptor()["digest"]


def test_oci_layout_dir_needs_a_tag_when_it_holds_several(uctr, test_images):
    layout = test_images["multiarch"].layout
    result = uctr("load", layout)
    assert result.returncode == 1
    assert "holds 3 images" in result.stderr and "1-arm64" in result.stderr
    bad = uctr("load", f"oci:{layout}:1", "--platform", "linux/s390x")
    assert bad.returncode != 0 and "linux/amd64" in bad.stderr and "linux/arm64" in bad.stderr


def test_corrupt_oci_blob_is_rejected_and_not_cached(uctr, tmp_path, test_images):
    busybox = test_images["busybox"]
    layout = tmp_path / "layout"
    shutil.copytree(busybox.layout, layout)
    layer = layout / "blobs" / "sha256" / busybox.layer_digests()[0].split(":")[1]
    data = bytearray(layer.read_bytes())
    data[100] ^= 0xFF
    layer.chmod(0o644)
    layer.write_bytes(bytes(data))
    result = uctr("load", f"oci:{layout}:1")
    assert result.returncode == 1 and "is corrupt" in result.stderr
    blobs = uctr.dirs().cache / "blobs" / "sha256"
    assert busybox.layer_digests()[0].split(":")[1] not in os_listdir(blobs)
    assert ok(uctr("images", "--json")).strip() == "[]"


def os_listdir(path):
    return [p.name for p in path.iterdir()] if path.exists() else []


def _tar_with(path, files):
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("config_name", ["../../etc/passwd", "/etc/passwd", "a/../../x.json"])
def test_docker_archive_names_escaping_the_archive_are_refused(uctr, tmp_path, config_name):
    manifest = [{"Config": config_name, "RepoTags": ["evil:1"], "Layers": []}]
    path = tmp_path / "evil.tar"
    _tar_with(path, {"manifest.json": json.dumps(manifest).encode(), "x.json": b"{}"})
    result = uctr("load", path)
    assert result.returncode == 1
    assert "unsafe member name" in result.stderr and "Traceback" not in result.stderr


def test_docker_archive_layer_not_matching_diff_id_is_refused(uctr, tmp_path):
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}).encode()
    manifest = [{"Config": "c.json", "RepoTags": ["bad:1"], "Layers": ["l.tar"]}]
    path = tmp_path / "bad.tar"
    _tar_with(path, {"manifest.json": json.dumps(manifest).encode(), "c.json": config,
                     "l.tar": b"\0" * 1024})
    result = uctr("load", path)
    assert result.returncode == 1 and "does not match its diff_id" in result.stderr
    assert not (uctr.dirs().cache / "blobs" / "sha256" / ("0" * 64)).exists()


def test_missing_archive_is_a_clean_error(uctr, tmp_path):
    result = uctr("load", tmp_path / "nope.tar")
    assert result.returncode == 1 and "no such file or directory" in result.stderr


# -- malformed archive documents: error + hint, exit 1, never a traceback -------------------

GOOD_CONFIG = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
DEEP = b'{"a":' * 5000 + b"{}" + b"}" * 5000


def assert_clean_failure(result, words):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error:") and words in lines[0], result.stderr
    assert any(line.startswith("hint:") for line in lines), result.stderr


@pytest.mark.parametrize("manifest,config,words", [
    (b'[{"Config": 1, "Layers": []}]', GOOD_CONFIG, "Config is not a string"),
    (b'[{"Config": "c.json", "Layers": "l.tar"}]', GOOD_CONFIG, "Layers is not a list"),
    (b'[{"Config": "c.json", "Layers": [], "RepoTags": "a:1"}]', GOOD_CONFIG,
     "RepoTags is not a list"),
    (b'{"Config": "c.json"}', GOOD_CONFIG, "is not a list"),
    (b'[]', GOOD_CONFIG, "lists no images"),
    (DEEP, GOOD_CONFIG, "nested deeper"),
    (b'[{"Config": "c.json", "Layers": []}]', [1], "is not a JSON object"),
    (b'[{"Config": "c.json", "Layers": []}]', {"rootfs": "x"}, "rootfs is not a JSON object"),
    (b'[{"Config": "c.json", "Layers": []}]', {"config": {"Env": "A=1"}}, "Env is not a list"),
    (b'[{"Config": "c.json", "Layers": []}]', DEEP, "nested deeper"),
    (b'[{"Config": "c.json", "Layers": []}]', b"x" * (9 << 20), "larger than"),
])
def test_malformed_docker_archive_documents(uctr, tmp_path, manifest, config, words):
    config_bytes = config if isinstance(config, bytes) else json.dumps(config).encode()
    path = tmp_path / "bad.tar"
    _tar_with(path, {"manifest.json": manifest, "c.json": config_bytes})
    assert_clean_failure(uctr("load", path), words)


def _layout(tmp_path, index, blobs=()):
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_bytes(index if isinstance(index, bytes)
                                        else json.dumps(index).encode())
    for data in blobs:
        name = hashlib.sha256(data).hexdigest()
        (layout / "blobs" / "sha256" / name).write_bytes(data)
    return layout


def _desc(data, media_type="application/vnd.oci.image.manifest.v1+json", **extra):
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
            "size": len(data), **extra}


@pytest.mark.parametrize("index,words", [
    ({"schemaVersion": 2, "manifests": [{"digest": "sha256:" + "a" * 64, "size": 1,
                                          "annotations": []}]}, "annotations is not a JSON"),
    ({"schemaVersion": 2, "manifests": "x"}, "manifests is not a list"),
    ({"schemaVersion": 2, "manifests": [{"digest": "sha256:../../../etc/passwd", "size": 1}]},
     "not a valid digest"),
    ({"schemaVersion": 2, "manifests": [{"digest": "sha256:" + "a" * 64}]},
     "size is not an integer"),
    (DEEP, "nested deeper"),
    (b"[1]", "is not a JSON object"),
])
def test_malformed_oci_index(uctr, tmp_path, index, words):
    assert_clean_failure(uctr("load", _layout(tmp_path, index)), words)


def test_malformed_manifest_in_an_oci_layout(uctr, tmp_path):
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": "sha256:" + "a" * 64,
                                                         "size": -1}, "layers": []}).encode()
    layout = _layout(tmp_path, {"schemaVersion": 2, "manifests": [_desc(manifest)]}, [manifest])
    assert_clean_failure(uctr("load", layout), "config.size is negative")


@pytest.fixture
def small_cache(tmp_path):
    """UCTR_CACHE on a 64 MiB tmpfs: a test of an endless input must never fill the real
    disk, whatever the code under test does (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    point = tmp_path / "small"
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    yield point / "cache"
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_oci_layout_blob_that_is_a_device_is_refused(uctr, tmp_path, small_cache):
    """A layout is a directory the user gives; a blob linked to /dev/zero must not be read
    without end (it was: it filled the cache's disk)."""
    config = json.dumps(GOOD_CONFIG | {"rootfs": {"type": "layers",
                                                  "diff_ids": ["sha256:" + "b" * 64]}}).encode()
    layer_digest = "sha256:" + "b" * 64
    manifest = json.dumps({"schemaVersion": 2, "config": _desc(config, "application/vnd.oci.image.config.v1+json"),
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": layer_digest, "size": 1024}]}).encode()
    layout = _layout(tmp_path, {"schemaVersion": 2, "manifests": [_desc(manifest)]},
                     [manifest, config])
    os.symlink("/dev/zero", layout / "blobs" / "sha256" / ("b" * 64))
    result = uctr("load", layout, env={"UCTR_CACHE": small_cache})
    assert_clean_failure(result, "not a regular file")


def test_archive_with_too_many_members_is_refused(uctr, tmp_path, monkeypatch):
    from uctr_batch.image import archive

    path = tmp_path / "many.tar"
    _tar_with(path, {f"f{i}": b"" for i in range(50)})
    monkeypatch.setattr(archive, "MAX_MEMBERS", 20)
    with pytest.raises(archive.ArchiveError, match="more than 20 members") as info:
        archive.open_source(str(path))
    assert info.value.hint
