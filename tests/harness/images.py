"""The suite's test images, built offline as OCI layouts and pushed with skopeo.

busybox    one gzip layer: busybox-static plus applet symlinks, /etc/passwd, /etc/group
layers     synthetic multi-layer image exercising whiteouts, links, odd modes and media types
layers-zstd  the same rootfs with the last layer in zstd (umoci cannot read it: compare
           against umoci's unpack of "layers")
debian     Debian bookworm minbase from mmdebstrap, cached between runs (see debian.py)
multiarch  OCI index: amd64 (busybox + marker layer) and arm64/v8 (marker layer only)

TestImage objects point at the layout directory so tests can hand it to umoci or skopeo
directly. ImageSet builds each image the first time it is asked for.
"""

import json
import os
import random
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .oci import TAG, ImageConfig, Layer, LayerBuilder, LayoutWriter, MT_INDEX

BUSYBOX_BINARY = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "sh", "true", "false", "echo", "cat", "id", "env", "sleep", "ls", "pwd", "whoami", "stat",
    "printf", "kill", "wc", "head", "dd", "seq", "test", "[", "mkdir", "rm", "touch", "uname",
    "hostname", "readlink", "sha256sum", "grep", "tr", "ln", "cp", "mv", "chmod", "tail",
    "date", "nproc", "timeout", "mkfifo", "find",
)
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


@dataclass(frozen=True)
class TestImage:
    """An image as an OCI layout directory plus the tag naming it in index.json."""

    __test__ = False  # not a pytest test class

    name: str
    layout: Path
    tag: str = TAG

    @property
    def oci_ref(self) -> str:
        """The reference skopeo and umoci understand: oci:DIR:TAG."""
        return f"oci:{self.layout}:{self.tag}"

    def blob(self, digest: str) -> bytes:
        return (self.layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()

    def top_descriptor(self) -> dict:
        index = json.loads((self.layout / "index.json").read_text())
        for entry in index["manifests"]:
            if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == self.tag:
                return entry
        raise KeyError(f"tag {self.tag} not in {self.layout}/index.json")

    def platform_ref(self, architecture: str) -> str:
        """oci:DIR:TAG-ARCH, the single-platform manifest of a multi-platform image."""
        return f"oci:{self.layout}:{self.tag}-{architecture}"

    @property
    def is_index(self) -> bool:
        return self.top_descriptor()["mediaType"] == MT_INDEX

    def manifest_digest(self, architecture: Optional[str] = None) -> str:
        """Digest of the image manifest (of an index: its ARCHITECTURE entry, default amd64)."""
        top = self.top_descriptor()
        if top["mediaType"] != MT_INDEX:
            return top["digest"]
        wanted = architecture or "amd64"
        for entry in json.loads(self.blob(top["digest"]))["manifests"]:
            if entry["platform"]["architecture"] == wanted:
                return entry["digest"]
        raise KeyError(f"{self.name} has no {wanted} entry")

    def manifest(self, architecture: Optional[str] = None) -> dict:
        return json.loads(self.blob(self.manifest_digest(architecture)))

    def config(self, architecture: Optional[str] = None) -> dict:
        return json.loads(self.blob(self.manifest(architecture)["config"]["digest"]))

    def layer_digests(self, architecture: Optional[str] = None) -> List[str]:
        return [layer["digest"] for layer in self.manifest(architecture)["layers"]]


# -- recipes ---------------------------------------------------------------------------------
def busybox_layer(accounts: bool = True) -> LayerBuilder:
    """busybox-static with its applet links; /etc/passwd and /etc/group unless not ACCOUNTS
    (for images that ship their own, hostile ones)."""
    layer = LayerBuilder()
    for directory, mode in (("bin", 0o755), ("etc", 0o755), ("root", 0o700), ("tmp", 0o1777),
                            ("usr", 0o755), ("usr/bin", 0o755), ("var", 0o755)):
        layer.dir(directory, mode)
    layer.file("bin/busybox", BUSYBOX_BINARY.read_bytes(), 0o755)
    for applet in BUSYBOX_APPLETS:
        layer.symlink(f"bin/{applet}", "busybox")
    if accounts:
        layer.file("etc/passwd", PASSWD.encode())
        layer.file("etc/group", GROUP.encode())
    return layer


def readable_layout(layout: Path, config: ImageConfig, layer: LayerBuilder) -> str:
    """Write a one-layer OCI layout that every user can read (tests run it as the test
    user); its oci: reference."""
    writer = LayoutWriter(layout)
    writer.tag(writer.add_image(config, [Layer.build(layer)]), TAG)
    for root, _dirs, files in os.walk(layout):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return f"oci:{layout}:{TAG}"


def build_busybox(layout: Path) -> None:
    writer = LayoutWriter(layout)
    config = ImageConfig(cmd=["/bin/sh"], labels={"org.uctr.test": "busybox"})
    writer.tag(writer.add_image(config, [Layer.build(busybox_layer())]), TAG)


def marker_layer(architecture: str) -> LayerBuilder:
    return LayerBuilder().file("arch-marker", f"{architecture}\n".encode())


def build_multiarch(layout: Path) -> None:
    writer = LayoutWriter(layout)
    amd64 = writer.add_image(
        ImageConfig(architecture="amd64", cmd=["/bin/cat", "/arch-marker"]),
        [Layer.build(busybox_layer()), Layer.build(marker_layer("amd64"))])
    arm64 = writer.add_image(
        ImageConfig(architecture="arm64", variant="v8", cmd=["/bin/cat", "/arch-marker"]),
        [Layer.build(marker_layer("arm64"))])
    writer.tag(writer.add_index([amd64, arm64]), TAG)
    # umoci 0.4 cannot pick a platform from an index: name each manifest too (oracle use).
    writer.tag(amd64, f"{TAG}-amd64")
    writer.tag(arm64, f"{TAG}-arm64")


def _pseudo_random(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) for _ in range(size))


def layers_layer1() -> LayerBuilder:
    """Base layer (gzip): everything later layers delete, replace or link to."""
    layer = LayerBuilder()
    layer.file("toplevel-file", b"removed by a top-level whiteout\n")
    layer.dir("toplevel-dir").file("toplevel-dir/child", b"gone with its dir\n")
    layer.dir("a").file("a/keep", b"keep v1\n").file("a/gone", b"whited out\n")
    layer.dir("opaque").file("opaque/old1", b"hidden by opaque\n")
    layer.dir("opaque/sub").file("opaque/sub/old2", b"hidden by opaque\n")
    layer.file("file-to-dir", b"becomes a directory\n")
    layer.dir("dir-to-file").file("dir-to-file/x", b"dir becomes a file\n")
    layer.dir("data").file("data/file1", b"hard-linked content\n")
    layer.hardlink("data/hard1", "data/file1")
    layer.file("data/random.bin", _pseudo_random(256 * 1024, seed=1))
    layer.file("data/empty", b"")
    layer.dir("links")
    layer.symlink("links/rel", "../data/file1")
    layer.symlink("links/abs", "/data/file1")
    layer.symlink("links/dangling", "/nonexistent/target")
    layer.symlink("links/dir", "../data")
    layer.symlink("links/replaced", "../data/file1")
    layer.file("secret", b"mode 0000\n", mode=0o000)
    layer.dir("locked", mode=0o500)
    layer.file("locked/child", b"inside a 0500 dir\n")
    layer.dir("locked/sub", mode=0o755).file("locked/sub/deep", b"deeper\n")
    layer.dir("bin")
    layer.file("bin/suid", b"#!/bin/sh\necho suid\n", mode=0o4755)
    layer.file("bin/sgid", b"#!/bin/sh\necho sgid\n", mode=0o2755)
    layer.file("owned-by-1234", b"uid 1234\n", uid=1234, gid=1234)
    layer.dir("fifo").fifo("fifo/pipe")
    layer.dir("names")
    layer.file("names/" + "long-" * 30 + "name", b"pax long name\n")
    layer.file("names/caf\u00e9-\u65e5\u672c", b"utf-8 name\n")
    return layer


def layers_layer2() -> LayerBuilder:
    """Uncompressed layer: whiteouts (explicit, opaque, top level), type changes, cross links."""
    layer = LayerBuilder()
    layer.whiteout("toplevel-file")
    layer.whiteout("toplevel-dir")
    layer.whiteout("a/gone")
    layer.opaque("opaque").file("opaque/new", b"after opaque\n")
    layer.dir("file-to-dir").file("file-to-dir/inner", b"now a dir\n")
    layer.file("dir-to-file", b"now a file\n")
    layer.dir("other")
    layer.hardlink("other/hard-lower", "data/file1")  # link to a file of a lower layer
    return layer


def layers_layer3() -> LayerBuilder:
    """Last layer: overwrite, symlink replaced by a file, a child added to the 0500 dir."""
    layer = LayerBuilder()
    layer.file("a/keep", b"keep v3\n")
    layer.file("links/replaced", b"was a symlink\n")
    layer.file("locked/late", b"added to a 0500 dir by a later layer\n")
    layer.file("top-new", b"added in layer 3\n")
    return layer


def build_layers(layout: Path, compression=("gzip", "none", "gzip")) -> None:
    """Three layers: gzip, uncompressed, gzip (umoci 0.4, the oracle, cannot read zstd)."""
    writer = LayoutWriter(layout)
    builders = (layers_layer1(), layers_layer2(), layers_layer3())
    layers = [Layer.build(b, c) for b, c in zip(builders, compression)]
    config = ImageConfig(cmd=["/bin/suid"], entrypoint=None, working_dir="/data",
                         labels={"org.uctr.test": "layers"})
    writer.tag(writer.add_image(config, layers), TAG)


def build_layers_zstd(layout: Path) -> None:
    """The "layers" image with its last layer zstd-compressed: same rootfs as "layers"."""
    build_layers(layout, compression=("gzip", "none", "zstd"))


def build_debian(layout: Path) -> None:
    from .debian import build_debian_layout  # only when asked: it runs mmdebstrap
    build_debian_layout(layout)


def build_mpi(flavour: str) -> Callable[[Path], None]:
    def build(layout: Path) -> None:
        from .mpi_images import build_mpi_layout
        build_mpi_layout(flavour, layout)
    return build


RECIPES: Dict[str, Callable[[Path], None]] = {
    "busybox": build_busybox,
    "layers": build_layers,
    "layers-zstd": build_layers_zstd,
    "debian": build_debian,
    "multiarch": build_multiarch,
    "debian-openmpi": build_mpi("debian-openmpi"),  # slow the first time: see mpi_images.py
    "debian-mpich": build_mpi("debian-mpich"),
}


class ImageSet(Mapping):
    """name -> TestImage, each built on first access into WORKDIR/NAME (debian: cached)."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self._built: Dict[str, TestImage] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> TestImage:
        if name not in RECIPES:
            raise KeyError(name)
        with self._lock:
            if name not in self._built:
                self._built[name] = self._build(name)
            return self._built[name]

    def _build(self, name: str) -> TestImage:
        if name == "debian":
            from .debian import cached_debian_layout
            return TestImage(name, cached_debian_layout())
        if name.startswith("debian-"):
            from .mpi_images import cached_mpi_layout
            return TestImage(name, cached_mpi_layout(name))
        layout = self.workdir / name
        if not (layout / "index.json").exists():
            RECIPES[name](layout)
        return TestImage(name, layout)

    def __iter__(self):
        return iter(RECIPES)

    def __len__(self) -> int:
        return len(RECIPES)


def push(image: TestImage, registry, repo: Optional[str] = None, tag: Optional[str] = None) -> str:
    """skopeo copy the layout to REGISTRY as REPO:TAG (default: image name and tag); return the ref.

    --preserve-digests keeps every blob byte-identical (no recompression of the uncompressed or
    zstd layers), so the digests in the layout are the digests in the registry.
    """
    ref = f"{registry.host}/{repo or image.name}:{tag or image.tag}"
    argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--preserve-digests",
            *(["--all"] if image.is_index else []), *registry.skopeo_args("dest"),
            image.oci_ref, f"docker://{ref}"]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stderr}")
    return ref


class PushedSet(Mapping):
    """name -> reference on REGISTRY, pushed on first access."""

    def __init__(self, registry, images: ImageSet):
        self.registry, self.images = registry, images
        self._refs: Dict[str, str] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> str:
        with self._lock:
            if name not in self._refs:
                self._refs[name] = push(self.images[name], self.registry)
            return self._refs[name]

    def __iter__(self):
        return iter(RECIPES)

    def __len__(self) -> int:
        return len(RECIPES)
