"""`uctr load` and oci:/oci-archive:/docker-archive: references, with archives made by skopeo."""

import io
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
