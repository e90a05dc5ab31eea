"""The "debian" test image: Debian bookworm minbase made by mmdebstrap, cached between runs.

The cache lives in $UCTR_TEST_DEBIAN_CACHE, else /var/cache/uctr-tests (root), else
~/.cache/uctr-tests, under a directory named by a hash of the recipe, so a changed recipe
builds a new image and an unchanged one is reused. Concurrent sessions serialise on a lock
file; the layout appears by an atomic rename, so a half-built image is never used.
"""

import fcntl
import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import List

from .oci import FIXED_MTIME, TAG, ImageConfig, Layer, LayoutWriter, MT_LAYER_GZIP

SUITE = "bookworm"
RECIPE_VERSION = "1"  # bump when the conversion below changes
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def host_mirror() -> str:
    """The Debian mirror the host's apt uses (the only network this suite may reach)."""
    if os.environ.get("UCTR_TEST_DEBIAN_MIRROR"):
        return os.environ["UCTR_TEST_DEBIAN_MIRROR"]
    candidates: List[str] = []
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("URIs:"):
                candidates += line.split()[1:]
    try:
        for line in Path("/etc/apt/sources.list").read_text(errors="replace").splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb":
                candidates.append(next(w for w in words[1:] if not w.startswith("[")))
    except (OSError, StopIteration):
        pass
    for uri in candidates:
        if "security" not in uri and "/debian" in uri:
            return uri
    return DEFAULT_MIRROR


def mmdebstrap_argv(output: Path, mirror: str) -> List[str]:
    return ["mmdebstrap", "--quiet", "--variant=minbase", "--format=tar", SUITE, str(output),
            mirror]


def cache_root() -> Path:
    if os.environ.get("UCTR_TEST_DEBIAN_CACHE"):
        return Path(os.environ["UCTR_TEST_DEBIAN_CACHE"])
    system = Path("/var/cache/uctr-tests")
    if os.geteuid() == 0:
        return system
    return Path.home() / ".cache" / "uctr-tests"


def recipe_key(mirror: str) -> str:
    recipe = "\n".join([RECIPE_VERSION, " ".join(mmdebstrap_argv(Path("OUT"), mirror)), TAG])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def cached_debian_layout() -> Path:
    """The cached layout, built first if missing."""
    mirror = host_mirror()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    layout = root / f"debian-{SUITE}-{recipe_key(mirror)}"
    if (layout / "index.json").exists():
        return layout
    with open(root / "debian.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building the same image
        if not (layout / "index.json").exists():
            staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
            try:
                build_debian_layout(staging / "layout", mirror)
                _make_world_readable(staging / "layout")
                os.rename(staging / "layout", layout)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return layout


def build_debian_layout(layout: Path, mirror: str = "") -> None:
    mirror = mirror or host_mirror()
    with tempfile.TemporaryDirectory(prefix="uctr-mmdebstrap-") as tmp:
        rootfs_tar = Path(tmp) / "rootfs.tar"
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(FIXED_MTIME))
        result = subprocess.run(mmdebstrap_argv(rootfs_tar, mirror), env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed ({result.returncode}):\n{result.stderr[-4000:]}")
        layer_file = Path(tmp) / "layer.tar.gz"
        diff_id = _repack_without_dev(rootfs_tar, layer_file)
        layer = Layer(layer_file.read_bytes(), MT_LAYER_GZIP, diff_id)
    writer = LayoutWriter(layout)
    config = ImageConfig(cmd=["bash"], labels={"org.uctr.test": "debian"})
    writer.tag(writer.add_image(config, [layer]), TAG)


class _HashingWriter:
    """File-like sink that hashes what passes through (the layer's diff_id)."""

    def __init__(self, sink):
        self.sink, self.sha = sink, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.sink.write(data)


def _repack_without_dev(source: Path, dest: Path) -> str:
    """Copy the rootfs tar into a gzip layer, leaving /dev empty; return sha256 of the tar.

    mmdebstrap in root mode records real device nodes under /dev, which an unprivileged
    unpacker cannot create; registry images ship an empty /dev, as debuerreotype's do.
    """
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        hashing = _HashingWriter(gz)
        with tarfile.open(source, mode="r|") as src, \
                tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as out:
            for member in src:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name.startswith("dev/") and name.rstrip("/") != "dev":
                    continue
                if member.isfile():
                    out.addfile(member, src.extractfile(member))
                else:
                    out.addfile(member)
    return "sha256:" + hashing.sha.hexdigest()


def _make_world_readable(path: Path) -> None:
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
