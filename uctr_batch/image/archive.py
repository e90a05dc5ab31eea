"""Import images from files: `docker save` tars, OCI archives and OCI layout directories.

Used by `uctr load FILE` and for `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]` and
`docker-archive:FILE[:NAME]` references. Every blob goes through the store's ingest path:
OCI blobs are verified against their digests; docker-archive layers (uncompressed tars)
are verified against the config's diff_ids, and an OCI manifest is synthesised for them.
Member names read from the archive are checked before use (no absolute paths, no '..').
"""

import json
import os
import stat
import sys
import tarfile
from typing import List, Optional, Sequence, Tuple

from uctr_batch import log
from uctr_batch.errors import DigestMismatch, ImageNotFound, UctrError
from uctr_batch.image import manifest as mt
from uctr_batch.image import platforms
from uctr_batch.image import reference as references
from uctr_batch.image.store import Store, build_record, canonical, digest_of_bytes, split_digest
from uctr_batch.records import replace

_log = log.get("archive")

OCI_REF_NAME = "org.opencontainers.image.ref.name"
_MAX_INDEX_DEPTH = 4  # index -> index -> manifest nesting we follow
MAX_MEMBERS = 100000  # tar members of an image archive (docker save: ~4 per layer)
_GZIP_MAGIC = b"\x1f\x8b"
_EXPORT_HINT = ("the archive is broken or was not made by an image tool; export the image "
                "again (docker save, skopeo copy ... oci-archive:)")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ArchiveError(UctrError):
    """A malformed, corrupt or ambiguous image archive (exit 1: fix the input)."""


def safe_name(name: str, source: str) -> str:
    """A member name from an archive's own metadata, normalised; reject escapes."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ArchiveError(f"invalid member name {str(name)[:200]!r} in {source}", _EXPORT_HINT)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or not parts:
        raise ArchiveError(f"unsafe member name {name!r} in {source}",
                           "the archive refers outside itself; it may be malicious")
    return "/".join(parts)


class _Source:
    """Read-only access to the files of an image archive or layout directory."""

    def __init__(self, path: str):
        self.path = path

    def open(self, name: str):
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def read(self, name: str, limit: int = mt.MAX_DOCUMENT) -> bytes:
        """The content of NAME, which must not exceed LIMIT bytes (only JSON documents and
        configs are read into memory; layers are streamed)."""
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ArchiveError(f"{name} in {self.path} is larger than {limit} bytes",
                               "no image document is that large; the archive is broken")
        return data

    def read_json(self, name: str, check, limit: int = mt.MAX_DOCUMENT):
        return parse_checked(self.read(name, limit), check, f"{name} in {self.path}")

    def blob_name(self, digest: str) -> str:
        algo, hexpart = split_digest(digest)
        return f"blobs/{algo}/{hexpart}"

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _DirSource(_Source):
    def _path(self, name: str) -> str:
        return os.path.join(self.path, safe_name(name, self.path))

    def open(self, name: str):
        try:
            f = open(self._path(name), "rb")
        except FileNotFoundError:
            raise ArchiveError(f"{name} missing from {self.path}", _EXPORT_HINT) from None
        except OSError as e:
            raise ArchiveError(f"cannot read {name} in {self.path}: {e.strerror}",
                               "check the files' permissions in the layout") from None
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # a device or FIFO never ends
            f.close()
            raise ArchiveError(f"{name} in {self.path} is not a regular file",
                               "an OCI layout holds regular files only")
        return f

    def size(self, name: str) -> int:
        with self.open(name) as f:
            return os.fstat(f.fileno()).st_size

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))


class _TarSource(_Source):
    def __init__(self, path: str):
        super().__init__(path)
        try:
            self._tar = tarfile.open(path, "r:*")
            self._members = {}
            for count, m in enumerate(self._tar, 1):  # bounded: each member costs memory
                if count > MAX_MEMBERS:
                    self._tar.close()
                    raise ArchiveError(f"{path} has more than {MAX_MEMBERS} members",
                                       "an image archive holds a few files per layer; this "
                                       "one is not an image archive")
                key = "/".join(p for p in m.name.split("/") if p not in ("", "."))
                self._members.setdefault(key, m)
        except (tarfile.TarError, OSError) as e:
            raise ArchiveError(
                f"cannot read archive {path}: {e}",
                "give a tar made by `docker save` or `skopeo copy ... oci-archive:`") from e

    def _member(self, name: str) -> tarfile.TarInfo:
        member = self._members.get(safe_name(name, self.path))
        if member is None or not (member.isfile() or member.islnk() or member.issym()):
            raise ArchiveError(f"{name} missing from {self.path}", _EXPORT_HINT)
        return member

    def open(self, name: str):
        try:
            f = self._tar.extractfile(self._member(name))  # links resolve inside the archive only
        except KeyError:
            f = None
        if f is None:
            raise ArchiveError(f"{name} in {self.path} is a link to nothing in the archive",
                               _EXPORT_HINT)
        return f

    def size(self, name: str) -> int:
        member = self._member(name)
        if member.islnk() or member.issym():
            with self.open(name) as f:
                return f.seek(0, os.SEEK_END)
        return member.size

    def exists(self, name: str) -> bool:
        return safe_name(name, self.path) in self._members

    def close(self) -> None:
        self._tar.close()


def parse_checked(data: bytes, check, what: str, limit: int = mt.MAX_CONFIG):
    """A JSON document of an archive, bounded and checked (manifest.parse_document and a
    manifest.check_* function); ArchiveError naming WHAT and the broken rule."""
    try:
        return check(mt.parse_document(data, limit))
    except mt.InvalidDocument as e:
        raise ArchiveError(f"malformed {what}: {e}",
                           "the archive is broken or was not made by an image tool; "
                           "export the image again") from None


def _check_docker_manifest(doc, where: str = "manifest.json") -> list:
    """docker save's manifest.json: [{"Config": NAME, "Layers": [NAME...], "RepoTags": [...]}]"""
    for i, entry in enumerate(mt.check_list(doc, where, mt.MAX_INDEX_ENTRIES)):
        mt.check_object(entry, f"{where}[{i}]")
        mt.check_string(entry.get("Config"), f"{where}[{i}].Config", empty=False)
        mt.check_strings(entry.get("Layers"), f"{where}[{i}].Layers", mt.MAX_LAYERS, null=False)
        for j, layer in enumerate(entry["Layers"]):
            mt.check_string(layer, f"{where}[{i}].Layers[{j}]", 4096, empty=False)
        mt.check_strings(entry.get("RepoTags"), f"{where}[{i}].RepoTags")
    if not doc:
        raise mt.InvalidDocument(f"{where} lists no images")
    return doc


def _check_layout(doc, where: str = "oci-layout") -> dict:
    mt.check_object(doc, where)
    mt.check_string(doc.get("imageLayoutVersion"), f"{where}.imageLayoutVersion", 64)
    return doc


def _check_index_or_manifest(doc, where: str = "document") -> dict:
    mt.check_object(doc, where)
    if doc.get("mediaType") in mt.INDEX_TYPES or "manifests" in doc:
        return mt.check_index(doc, "index")
    return mt.check_image_manifest(doc, "manifest")


def open_source(path: str) -> _Source:
    if os.path.isdir(path):
        return _DirSource(path)
    if not os.path.exists(path):
        raise ImageNotFound(f"no such file or directory: {path}",
                            "give the path of a `docker save` tar, an OCI archive or an OCI "
                            "layout directory")
    if not os.path.isfile(path):  # /dev/zero, a FIFO: never read one as an archive
        raise ImageNotFound(f"not a regular file or directory: {path}",
                            "give the path of a `docker save` tar, an OCI archive or an OCI "
                            "layout directory")
    return _TarSource(path)


# -- loading --------------------------------------------------------------------------------

def load(path: str, store: Store, names: Sequence[str] = (), tag: Optional[str] = None,
         platform=None) -> List:
    """Import the image at `path` (archive or layout dir). `tag` selects an image inside an
    OCI layout (its ref.name) or a docker-archive (a RepoTag); `names` are the references to
    record it under (default: a docker-archive's RepoTags, else the transport reference,
    e.g. oci-archive:PATH:TAG). Returns the records."""
    path = os.path.abspath(path)
    wanted = platform or platforms.wanted_or_host(None)
    with open_source(path) as src:
        if src.exists("manifest.json"):
            return _load_docker(src, store, names, tag, wanted)
        if src.exists("index.json"):
            transport = references.OCI if os.path.isdir(path) else references.OCI_ARCHIVE
            names = names or [str(references.ImageRef(transport=transport, path=path, tag=tag))]
            return _load_oci(src, store, names, tag, wanted)
    raise ArchiveError(f"not an image archive or OCI layout: {path}",
                       "expected manifest.json (docker save) or index.json (OCI layout)")


def _record_all(store: Store, names: Sequence[str], manifest_digest: str, manifest: dict,
                config: dict, index_digest: Optional[str] = None) -> List:
    records = []
    for name in names:
        rec = build_record(name, manifest_digest, manifest, config, index_digest=index_digest)
        store.record(rec)
        records.append(rec)
    return records


# docker-archive

def _docker_entry(src: _Source, tag: Optional[str]) -> dict:
    entries = src.read_json("manifest.json", _check_docker_manifest)
    if tag is None:
        if len(entries) > 1:
            raise ArchiveError(f"{src.path} holds {len(entries)} images",
                               "choose one: " + ", ".join(_repo_tags(entries)))
        return entries[0]
    want = canonical(tag)
    for entry in entries:
        if any(_canonical_tag(t) == want for t in entry.get("RepoTags") or ()):
            return entry
    raise ArchiveError(f"no image {tag} in {src.path}",
                       "available: " + (", ".join(_repo_tags(entries)) or "none"))


def _repo_tags(entries) -> List[str]:
    return [t for e in entries for t in (e.get("RepoTags") or ())]


def _canonical_tag(text: str) -> Optional[str]:
    try:
        return canonical(text)
    except UctrError:
        return None


def _sniff(f) -> str:
    head = f.peek(4)[:4] if hasattr(f, "peek") else b""
    if head.startswith(_GZIP_MAGIC):
        return mt.OCI_LAYER_GZIP
    if head.startswith(_ZSTD_MAGIC):
        return mt.OCI_LAYER_ZSTD
    return mt.OCI_LAYER_TAR


def _load_docker(src: _Source, store: Store, names, tag, wanted) -> List:
    entry = _docker_entry(src, tag)
    config_name, layer_names = entry["Config"], list(entry["Layers"])
    config_bytes = src.read(config_name, mt.MAX_CONFIG)
    config = parse_checked(config_bytes, mt.check_image_config, f"{config_name} in {src.path}")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layer_names):
        raise ArchiveError(f"{src.path}: {len(layer_names)} layers but {len(diff_ids)} "
                           "diff_ids in the config", _EXPORT_HINT)
    _check_platform(config, wanted, src.path)
    config_digest = digest_of_bytes(config_bytes)
    with store.pending([config_digest] + list(diff_ids)):
        store.put_bytes(config_digest, config_bytes)
        layers = [_ingest_docker_layer(src, store, name, diff_id)
                  for name, diff_id in zip(layer_names, diff_ids)]
        manifest = {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": mt.OCI_CONFIG, "digest": config_digest,
                       "size": len(config_bytes)},
            "layers": layers,
        }
        manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
        manifest_digest = digest_of_bytes(manifest_bytes)
        store.put_bytes(manifest_digest, manifest_bytes)
        if not names:
            names = [n for n in map(_canonical_tag, entry.get("RepoTags") or ()) if n]
        default = str(references.ImageRef(transport=references.DOCKER_ARCHIVE, path=src.path))
        return _record_all(store, names or [default], manifest_digest, manifest, config)


def _ingest_docker_layer(src: _Source, store: Store, name: str, diff_id: str) -> dict:
    """Store one docker-archive layer. An uncompressed layer's digest is its diff_id, so a
    cached one is not read again; a compressed one is hashed as it is copied."""
    size = src.size(name)
    if store.has_blob(diff_id) and os.path.getsize(store.blob_path(diff_id)) == size:
        store.touch_blob(diff_id)
        log.verbose("layer %s: cached", diff_id)
        return {"mediaType": mt.OCI_LAYER_TAR, "digest": diff_id, "size": size}
    with src.open(name) as f:
        media_type = _sniff(f)
        try:
            if media_type == mt.OCI_LAYER_TAR:
                digest, outcome = store.ingest_stream(f, diff_id, size)
            else:
                digest, outcome = store.ingest_stream(f)
        except DigestMismatch as e:
            raise ArchiveError(f"layer {name} in {src.path} does not match its diff_id {diff_id}",
                               "the archive is corrupt; export it again") from e
    log.verbose("layer %s: %s", digest, outcome)
    return {"mediaType": media_type, "digest": digest, "size": size}


def _check_platform(config: dict, wanted, path: str) -> None:
    have = platforms.from_json(config)
    if have is not None and platforms.rank(wanted, have) is None:
        _log.warning("image in %s is for %s, not %s", path, have, wanted)


# OCI layout / archive

def _oci_descriptor(src: _Source, tag: Optional[str]) -> dict:
    if src.exists("oci-layout"):
        src.read_json("oci-layout", _check_layout, 65536)
    index = src.read_json("index.json", mt.check_index)
    entries = index["manifests"]
    if not entries:
        raise ArchiveError(f"index.json in {src.path} lists no images", _EXPORT_HINT)
    tags = [(e.get("annotations") or {}).get(OCI_REF_NAME) for e in entries]
    if tag is not None:
        for entry, name in zip(entries, tags):
            if name == tag:
                return entry
        raise ArchiveError(f"no image tagged {tag} in {src.path}",
                           "available tags: " + (", ".join(t for t in tags if t) or "none"))
    if len(entries) > 1:
        raise ArchiveError(f"{src.path} holds {len(entries)} images; name one with :TAG",
                           "available tags: " + (", ".join(t for t in tags if t) or "none"))
    return entries[0]


def _read_verified(src: _Source, store: Store, digest: str,
                   limit: int = mt.MAX_DOCUMENT) -> bytes:
    data = src.read(src.blob_name(digest), limit)
    try:
        store.put_bytes(digest, data)
    except DigestMismatch as e:
        raise ArchiveError(f"blob {digest} in {src.path} is corrupt: {e}",
                           "export the image again") from e
    return data


def resolve_oci(src: _Source, store: Store, descriptor: dict, wanted,
                image: str) -> Tuple[dict, bytes, Optional[str]]:
    """Follow index descriptors down to one manifest; (descriptor, manifest bytes, index digest)."""
    index_digest = None
    for _ in range(_MAX_INDEX_DEPTH):
        data = _read_verified(src, store, descriptor["digest"])
        doc = parse_checked(data, _check_index_or_manifest, f"blob {descriptor['digest']} of {image}")
        media_type = descriptor.get("mediaType") or doc.get("mediaType")
        if media_type not in mt.INDEX_TYPES and "manifests" not in doc:
            return descriptor, data, index_digest
        if "manifests" not in doc:
            raise ArchiveError(f"{image}: {descriptor['digest']} is said to be an index but "
                               "lists no manifests", "export the image again")
        index_digest = index_digest or descriptor["digest"]
        descriptor = platforms.select(doc["manifests"], wanted, image)
    raise ArchiveError(f"{image}: image indexes nested deeper than {_MAX_INDEX_DEPTH}",
                       _EXPORT_HINT)


def _load_oci(src: _Source, store: Store, names, tag, wanted) -> List:
    top = _oci_descriptor(src, tag)
    image = f"{src.path}" + (f":{tag}" if tag else "")
    descriptor, manifest_bytes, index_digest = resolve_oci(src, store, top, wanted, image)
    manifest = parse_checked(manifest_bytes, mt.check_image_manifest,
                             f"manifest {descriptor['digest']} of {image}")
    layers = manifest.get("layers") or []
    config_digest = manifest["config"]["digest"]
    with store.pending([descriptor["digest"], config_digest] + [la["digest"] for la in layers]):
        config = parse_checked(_read_verified(src, store, config_digest, mt.MAX_CONFIG),
                               mt.check_image_config, f"config {config_digest} of {image}")
        if index_digest is None:
            _check_platform(config, wanted, src.path)
        for layer in layers:
            _ingest_oci_blob(src, store, layer)
        return _record_all(store, names, descriptor["digest"], manifest, config, index_digest)


def _ingest_oci_blob(src: _Source, store: Store, layer: dict) -> None:
    digest = layer["digest"]
    if store.has_blob(digest):
        store.touch_blob(digest)
        log.verbose("layer %s: cached", digest)
        return
    with src.open(src.blob_name(digest)) as f:
        try:
            _, outcome = store.ingest_stream(f, digest, layer["size"])
        except DigestMismatch as e:
            raise ArchiveError(f"layer {digest} in {src.path} is corrupt: {e}",
                               "export the image again") from e
    log.verbose("layer %s: %s", digest, outcome)


# -- references and the command ------------------------------------------------------------

def ensure_local(ref, store: Store, platform=None):
    """The record of an oci:/oci-archive:/docker-archive: reference, imported into the cache
    (blobs already cached are not read again)."""
    if isinstance(ref, str):
        ref = references.parse(ref)
    if ref.transport == references.SQUASHFS:
        from uctr_batch.image import squashfs

        return squashfs.ensure_local(ref, store, platform)
    if ref.transport == references.DOCKER_ARCHIVE:
        tag = ref.name_with_version if ref.repository else None
    else:
        tag = ref.tag
    return load(ref.path, store, names=[canonical(ref)], tag=tag, platform=platform)[0]


def cmd_load(args) -> int:
    """uctr load FILE|DIR|TRANSPORT:PATH[:TAG] [--tag REF] [--platform P]"""
    store = Store()
    wanted = platforms.wanted_or_host(getattr(args, "platform", None))
    names = [canonical(args.tag)] if args.tag else []
    source = args.file
    if source.startswith(tuple(f"{t}:" for t in references.PATH_TRANSPORTS)):
        ref = references.parse(source)
        rec = ensure_local(ref, store, wanted)
        records = [rec] + [_retag(store, rec, name) for name in names]
    else:
        records = load(source, store, names=names, platform=wanted)
    for rec in records:
        sys.stdout.write(f"{rec.reference} {rec.manifest_digest}\n")
    return 0


def _retag(store: Store, rec, name: str):
    new = replace(rec, reference=name)
    store.record(new)
    return new
