"""OCI / Docker manifest vocabulary shared by registry, store, archive and flatten.

This module is the contract between the image pipeline's parts; it does no I/O.
"""

import platform as _platform
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# Manifests
DOCKER_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
INDEX_TYPES = (DOCKER_MANIFEST_LIST, OCI_INDEX)
MANIFEST_TYPES = (DOCKER_MANIFEST_V2, OCI_MANIFEST)
ACCEPT_ALL = ", ".join(INDEX_TYPES + MANIFEST_TYPES)

# Configs
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"

# Layers
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_COMPRESSION = {
    DOCKER_LAYER_GZIP: "gzip",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_TAR: "none",
    OCI_LAYER_ZSTD: "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: Optional[str] = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


_MACHINE_TO_ARCH = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
    "i686": ("386", None),
}


def host_platform() -> Platform:
    arch, variant = _MACHINE_TO_ARCH.get(_platform.machine(), (_platform.machine(), None))
    return Platform("linux", arch, variant)


@dataclass(frozen=True)
class Layer:
    digest: str  # "sha256:<hex>"
    media_type: str
    size: int

    @property
    def compression(self) -> str:
        """'gzip', 'zstd' or 'none'; unknown types are sniffed from magic bytes by flatten."""
        return LAYER_COMPRESSION.get(self.media_type, "unknown")


@dataclass(frozen=True)
class ImageRecord:
    """What the cache knows about one resolved (single-platform) image."""

    reference: str  # canonical reference string it was pulled/loaded as
    manifest_digest: str  # digest of the single-platform manifest: keys node-local rootfs
    config_digest: str
    layers: Tuple[Layer, ...]
    platform: Optional[str] = None
    index_digest: Optional[str] = None  # set when resolved through an index / manifest list
    config: Dict = field(default_factory=dict, compare=False, hash=False)  # parsed image config

    def layer_digests(self) -> List[str]:
        return [layer.digest for layer in self.layers]
