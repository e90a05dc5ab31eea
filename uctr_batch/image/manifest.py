"""OCI / Docker manifest vocabulary shared by registry, store, archive and flatten.

This module is the contract between the image pipeline's parts; it does no I/O.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import os

from uctr_batch.records import Frozen

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


class Platform(Frozen):
    __slots__ = ("os", "architecture", "variant")
    _DEFAULTS = {"variant": None}

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
    machine = os.uname().machine  # platform.machine(), without importing platform
    arch, variant = _MACHINE_TO_ARCH.get(machine, (machine, None))
    return Platform("linux", arch, variant)


class Layer(Frozen):
    __slots__ = ("digest", "media_type", "size")  # digest: "sha256:<hex>"

    @property
    def compression(self) -> str:
        """'gzip', 'zstd' or 'none'; unknown types are sniffed from magic bytes by flatten."""
        return LAYER_COMPRESSION.get(self.media_type, "unknown")


class ImageRecord(Frozen):
    """What the cache knows about one resolved (single-platform) image."""

    __slots__ = (
        "reference",  # canonical reference string it was pulled/loaded as
        "manifest_digest",  # digest of the single-platform manifest: keys node-local rootfs
        "config_digest",
        "layers",  # tuple of Layer
        "platform",
        "index_digest",  # set when resolved through an index / manifest list
        "config",  # the parsed image config: not compared, not hashed
    )
    _DEFAULTS = {"platform": None, "index_digest": None, "config": dict}
    _NOT_COMPARED = ("config",)

    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]


# -- reading untrusted JSON documents ------------------------------------------------------------
# Every JSON document uctr reads from a registry or an image archive (index, manifest, config,
# token response, error body, tag list, docker-archive manifest.json, OCI index.json and
# oci-layout) goes through parse_document() and one of the checks below before any field is
# used. The bounds below belong to the security model (docs/admin-guide.md).

MAX_DOCUMENT = 4 << 20  # manifests, indexes, tokens, tag lists: containerd's manifest cap
MAX_CONFIG = 8 << 20  # image configs (a long history makes them larger than manifests)
MAX_DEPTH = 32  # JSON nesting; real image documents nest 5 levels at most
MAX_LAYERS = 1000  # layers per image (Docker and overlayfs stop at 128)
MAX_INDEX_ENTRIES = 1000  # manifests per index / manifest list
MAX_BLOB_SIZE = 1 << 40  # a single layer declared bigger than 1 TiB is refused
MAX_STRING_LIST = 10000  # Env, Cmd, Entrypoint, RepoTags entries
_DIGEST_RE = None  # compiled on first use (keeps this module import-light)
_MEDIA_TYPE_RE = None


class InvalidDocument(ValueError):
    """A JSON document that breaks a rule; callers wrap it in their own UctrError with the
    document's name (RegistryError for registries, ArchiveError for archives)."""


def parse_document(data: bytes, limit: int = MAX_DOCUMENT, depth: int = MAX_DEPTH):
    """json.loads with bounds: at most LIMIT bytes, DEPTH levels of nesting, no NaN/Infinity,
    integers of at most 4300 digits (Python's own limit). InvalidDocument on any violation."""
    if not isinstance(data, (bytes, bytearray, str)):
        raise InvalidDocument("not a document")
    if len(data) > limit:
        raise InvalidDocument(f"larger than {limit} bytes")
    import json

    try:
        doc = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidDocument(f"nested deeper than {depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, int digit limit
        raise InvalidDocument(f"not valid JSON: {str(e)[:200]}") from None
    _check_depth(doc, depth)
    return doc


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_depth(doc, limit: int) -> None:
    stack = [(doc, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        if level > limit:
            raise InvalidDocument(f"nested deeper than {limit} levels")
        stack.extend((child, level + 1) for child in value
                     if isinstance(child, (dict, list)))


def _fail(where: str, what: str):
    raise InvalidDocument(f"{where} {what}")


def check_object(value, where: str) -> dict:
    if not isinstance(value, dict):
        _fail(where, f"is not a JSON object (got {_kind(value)})")
    return value


def check_list(value, where: str, limit: int) -> list:
    if not isinstance(value, list):
        _fail(where, f"is not a list (got {_kind(value)})")
    if len(value) > limit:
        _fail(where, f"has {len(value)} entries (at most {limit} allowed)")
    return value


def check_string(value, where: str, limit: int = 4096, empty: bool = True) -> str:
    if not isinstance(value, str):
        _fail(where, f"is not a string (got {_kind(value)})")
    if len(value) > limit:
        _fail(where, f"is longer than {limit} characters")
    if not empty and not value:
        _fail(where, "is empty")
    if "\0" in value:  # no exec, path or environment can hold one
        _fail(where, "holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON "\ud800": a lone surrogate, not text
        _fail(where, "holds a lone UTF-16 surrogate")
    return value


def check_strings(value, where: str, limit: int = MAX_STRING_LIST, null: bool = True):
    """A list of strings (or null/absent when NULL)."""
    if value is None and null:
        return []
    for i, item in enumerate(check_list(value, where, limit)):
        check_string(item, f"{where}[{i}]", 1 << 20)
    return value


def check_digest(value, where: str) -> str:
    global _DIGEST_RE
    if _DIGEST_RE is None:
        import re

        _DIGEST_RE = re.compile(r"(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\Z")
    if not isinstance(value, str) or not _DIGEST_RE.match(value):
        shown = repr(value)[:80] if isinstance(value, str) else _kind(value)
        _fail(where, f"is not a valid digest ({shown}; expected sha256: and 64 hex digits)")
    return value


def check_size(value, where: str, maximum: int) -> int:
    if type(value) is not int:  # bool and float are not sizes
        _fail(where, f"is not an integer (got {_kind(value)})")
    if value < 0:
        _fail(where, f"is negative ({value})")
    if value > maximum:
        _fail(where, f"is {value} bytes, more than the {maximum} allowed")
    return value


def check_media_type(value, where: str) -> str:
    global _MEDIA_TYPE_RE
    if _MEDIA_TYPE_RE is None:
        import re

        _MEDIA_TYPE_RE = re.compile(
            r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}\Z")
    if not isinstance(value, str) or not _MEDIA_TYPE_RE.match(value):
        _fail(where, f"is not a media type ({repr(value)[:80]})")
    return value


def _kind(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def check_platform(value, where: str) -> dict:
    check_object(value, where)
    for key in ("os", "architecture"):
        check_string(value.get(key), f"{where}.{key}", 64, empty=False)
    if value.get("variant") is not None:
        check_string(value["variant"], f"{where}.variant", 64)
    if value.get("os.version") is not None:
        check_string(value["os.version"], f"{where}.os.version", 256)
    return value


def check_annotations(value, where: str) -> dict:
    check_object(value, where)
    for key, item in value.items():
        check_string(item, f"{where}[{key[:40]!r}]", 1 << 20)
    return value


def check_descriptor(value, where: str, max_size: int, platform: bool = False) -> dict:
    """An OCI content descriptor: digest (required), size (required, 0..MAX_SIZE),
    mediaType (a media type when present), annotations (strings), platform (when asked)."""
    check_object(value, where)
    check_digest(value.get("digest"), f"{where}.digest")
    check_size(value.get("size"), f"{where}.size", max_size)
    if "mediaType" in value:
        check_media_type(value["mediaType"], f"{where}.mediaType")
    if value.get("annotations") is not None:
        check_annotations(value["annotations"], f"{where}.annotations")
    if platform and value.get("platform") is not None:
        check_platform(value["platform"], f"{where}.platform")
    return value


def _check_schema(doc: dict, where: str) -> None:
    if "schemaVersion" in doc and (type(doc["schemaVersion"]) is not int
                                   or doc["schemaVersion"] != 2):
        version = doc["schemaVersion"]
        _fail(where, f"has schemaVersion {repr(version)[:20]}, not 2")
    if "mediaType" in doc:
        check_media_type(doc["mediaType"], f"{where}.mediaType")


def check_index(doc, where: str = "index") -> dict:
    """An OCI image index or Docker manifest list (also an OCI layout's index.json)."""
    check_object(doc, where)
    _check_schema(doc, where)
    entries = check_list(doc.get("manifests"), f"{where}.manifests", MAX_INDEX_ENTRIES)
    for i, entry in enumerate(entries):
        check_descriptor(entry, f"{where}.manifests[{i}]", MAX_CONFIG, platform=True)
    if doc.get("annotations") is not None:
        check_annotations(doc["annotations"], f"{where}.annotations")
    return doc


def check_image_manifest(doc, where: str = "manifest") -> dict:
    """A single-platform OCI or Docker schema 2 manifest: config + layers descriptors."""
    check_object(doc, where)
    _check_schema(doc, where)
    check_descriptor(doc.get("config"), f"{where}.config", MAX_CONFIG)
    layers = doc.get("layers")
    if layers is not None:
        for i, layer in enumerate(check_list(layers, f"{where}.layers", MAX_LAYERS)):
            check_descriptor(layer, f"{where}.layers[{i}]", MAX_BLOB_SIZE)
    return doc


_RUNTIME_LISTS = ("Env", "Entrypoint", "Cmd")
_RUNTIME_STRINGS = ("WorkingDir", "User", "StopSignal")


def check_image_config(doc, where: str = "config") -> dict:
    """The fields of an image config that uctr uses: platform, rootfs.diff_ids and the
    runtime settings (Env, Entrypoint, Cmd, WorkingDir, User, Labels)."""
    check_object(doc, where)
    for key in ("os", "architecture", "variant"):
        if doc.get(key) is not None:
            check_string(doc[key], f"{where}.{key}", 64)
    if doc.get("rootfs") is not None:
        rootfs = check_object(doc["rootfs"], f"{where}.rootfs")
        if rootfs.get("diff_ids") is not None:
            for i, d in enumerate(check_list(rootfs["diff_ids"], f"{where}.rootfs.diff_ids",
                                             MAX_LAYERS)):
                check_digest(d, f"{where}.rootfs.diff_ids[{i}]")
    runtime = doc.get("config")
    if runtime is not None:
        check_object(runtime, f"{where}.config")
        for key in _RUNTIME_LISTS:
            check_strings(runtime.get(key), f"{where}.config.{key}")
        for key in _RUNTIME_STRINGS:
            if runtime.get(key) is not None:
                check_string(runtime[key], f"{where}.config.{key}")
        if runtime.get("Labels") is not None:
            check_annotations(runtime["Labels"], f"{where}.config.Labels")
    return doc
