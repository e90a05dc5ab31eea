"""Write OCI image layouts with the standard library only (tarfile, gzip, json).

The suite builds its images with this code, never with uctr_batch, so a bug in the project's
own writer/reader cannot hide itself.
"""

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = MT_LAYER_TAR + "+gzip"
MT_LAYER_ZSTD = MT_LAYER_TAR + "+zstd"
TAG = "1"  # the tag every test image carries in its layout
FIXED_MTIME = 1700000000  # reproducible layers: same recipe, same digests, across sessions


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class LayerBuilder:
    """Collects tar members in order; .blob(compression) gives the layer bytes."""

    def __init__(self):
        self._buffer = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=tarfile.PAX_FORMAT)
        self._tar_bytes: Optional[bytes] = None

    def _info(self, path: str, kind: bytes, mode: int, uid: int = 0,
              gid: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path.lstrip("/"))
        info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
        info.mtime = FIXED_MTIME
        info.uname = info.gname = "root" if uid == 0 else ""
        return info

    def file(self, path: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0):
        info = self._info(path, tarfile.REGTYPE, mode, uid, gid)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))
        return self

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0):
        self._tar.addfile(self._info(path, tarfile.DIRTYPE, mode, uid, gid))
        return self

    def symlink(self, path: str, target: str):
        info = self._info(path, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self._tar.addfile(info)
        return self

    def hardlink(self, path: str, target: str):
        """A hard link to TARGET, a path from this or an earlier layer (no leading '/')."""
        info = self._info(path, tarfile.LNKTYPE, 0o644)
        info.linkname = target.lstrip("/")
        self._tar.addfile(info)
        return self

    def fifo(self, path: str, mode: int = 0o644):
        self._tar.addfile(self._info(path, tarfile.FIFOTYPE, mode))
        return self

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o666):
        info = self._info(path, tarfile.CHRTYPE, mode)
        info.devmajor, info.devminor = major, minor
        self._tar.addfile(info)
        return self

    def whiteout(self, path: str):
        """Delete PATH of a lower layer: an empty file named .wh.<basename> beside it."""
        parent, _, name = path.strip("/").rpartition("/")
        return self.file(f"{parent}/.wh.{name}" if parent else f".wh.{name}")

    def opaque(self, directory: str):
        """Hide everything a lower layer put in DIRECTORY."""
        return self.file(f"{directory.strip('/')}/.wh..wh..opq")

    def tar_bytes(self) -> bytes:
        if self._tar_bytes is None:
            self._tar.close()
            self._tar_bytes = self._buffer.getvalue()
        return self._tar_bytes


def compress(tar: bytes, compression: str) -> bytes:
    if compression == "gzip":
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=6) as gz:
            gz.write(tar)
        return out.getvalue()
    if compression == "zstd":
        return subprocess.run(["zstd", "-q", "-c", "-3"], input=tar, check=True,
                              capture_output=True).stdout
    if compression == "none":
        return tar
    raise ValueError(f"unknown compression {compression!r}")


LAYER_MEDIA_TYPES = {"gzip": MT_LAYER_GZIP, "zstd": MT_LAYER_ZSTD, "none": MT_LAYER_TAR}


@dataclass
class Layer:
    blob: bytes
    media_type: str
    diff_id: str

    @classmethod
    def from_tar(cls, tar: bytes, compression: str = "gzip") -> "Layer":
        return cls(compress(tar, compression), LAYER_MEDIA_TYPES[compression], sha256_digest(tar))

    @classmethod
    def build(cls, builder: LayerBuilder, compression: str = "gzip") -> "Layer":
        return cls.from_tar(builder.tar_bytes(), compression)


@dataclass
class ImageConfig:
    architecture: str = "amd64"
    os: str = "linux"
    variant: Optional[str] = None
    env: List[str] = field(default_factory=lambda: [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    cmd: Optional[List[str]] = None
    entrypoint: Optional[List[str]] = None
    working_dir: str = "/"
    user: str = ""
    labels: Dict[str, str] = field(default_factory=dict)

    def document(self, layers: List[Layer]) -> dict:
        config = {"Env": self.env, "WorkingDir": self.working_dir}
        if self.cmd is not None:
            config["Cmd"] = self.cmd
        if self.entrypoint is not None:
            config["Entrypoint"] = self.entrypoint
        if self.user:
            config["User"] = self.user
        if self.labels:
            config["Labels"] = self.labels
        doc = {
            "created": "2023-11-14T22:13:20Z",
            "architecture": self.architecture, "os": self.os, "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "uctr test harness"}
                        for _ in layers],
        }
        if self.variant:
            doc["variant"] = self.variant
        return doc


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class LayoutWriter:
    """An OCI image layout directory: blobs/sha256/*, oci-layout, index.json."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def add_blob(self, data: bytes, media_type: str, **extra) -> dict:
        digest = sha256_digest(data)
        path = self.root / "blobs" / "sha256" / digest.split(":", 1)[1]
        if not path.exists():
            path.write_bytes(data)
        return dict({"mediaType": media_type, "digest": digest, "size": len(data)}, **extra)

    def add_image(self, config: ImageConfig, layers: List[Layer]) -> dict:
        """Store config, layers and manifest; return the manifest descriptor (with platform)."""
        config_desc = self.add_blob(_canonical(config.document(layers)), MT_CONFIG)
        manifest = {
            "schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config_desc,
            "layers": [self.add_blob(layer.blob, layer.media_type) for layer in layers],
        }
        platform = {"architecture": config.architecture, "os": config.os}
        if config.variant:
            platform["variant"] = config.variant
        return self.add_blob(_canonical(manifest), MT_MANIFEST, platform=platform)

    def add_index(self, manifests: List[dict]) -> dict:
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests}
        return self.add_blob(_canonical(index), MT_INDEX)

    def tag(self, descriptor: dict, tag: str) -> None:
        """Name DESCRIPTOR as TAG in index.json (platform dropped: it is a top-level entry)."""
        path = self.root / "index.json"
        index = json.loads(path.read_text()) if path.exists() else {"schemaVersion": 2,
                                                                    "manifests": []}
        entry = {k: v for k, v in descriptor.items() if k != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
        index["manifests"] = [m for m in index["manifests"]
                              if m.get("annotations", {}).get(
                                  "org.opencontainers.image.ref.name") != tag] + [entry]
        path.write_text(json.dumps(index, indent=1))
