"""The shared content-addressed cache, and the commands that look after it.

Layout under the cache root (the only code that computes these paths is ``Store``)::

    blobs/sha256/<hex>      manifests, configs and layers, exactly as the registry served them
    refs/<name>#<plat>.json reference + platform -> manifest digest, one small file each
    tmp/<hex>.partial       a download in progress, owned by the holder of locks/<hex>.lock
    tmp/pull-<id>.json      digests a pull in progress is about to use (kept by gc)
    locks/                  FileLock files (NFS-safe; see lock.py)

The cache is meant to live on Lustre/GPFS/NFS and be used by many nodes at once: a blob is
only ever renamed into blobs/ after its digest was verified, each blob has at most one
downloader at a time (its lock), and everything else is written to a temp name and renamed.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import errno
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from uctr_batch import fsutil, log, settings
from uctr_batch.errors import DigestMismatch, ImageNotFound, StorageError, UctrError
from uctr_batch.image import platforms
from uctr_batch.image import reference as references
from uctr_batch.image.lock import FileLock
from uctr_batch.image.manifest import ImageRecord, Layer, Platform
from uctr_batch.records import Record, replace

_log = log.get("store")

LOCK_TIMEOUT = 3600.0  # a waiter gives up after this long even if the holder is alive
STALE_AFTER = 60.0  # no heartbeat for this long: the holder is gone
GC_GRACE = 600.0  # gc keeps unreferenced blobs and partials younger than this
PENDING_TTL = 86400.0  # a pull marker older than this belongs to a killed pull
_CHUNK = 1 << 20
_MAX_SMALL_BLOB = 8 << 20  # manifests and configs (manifest.MAX_CONFIG)
_HASHES = {"sha256": 64, "sha512": 128}

# ingest_blob outcomes, for -v logging
CACHED, DOWNLOADED, WAITED = "cached", "downloaded", "waited for another downloader"


def _unique() -> str:
    """A random name part for temp files (uuid is imported only here: a warm lookup, as in
    the Slurm prolog on a node that has the image, makes no temp file)."""
    import uuid

    return uuid.uuid4().hex


def split_digest(digest: str) -> tuple[str, str]:
    """'sha256:<hex>' -> ('sha256', '<hex>'); StorageError for anything else (a digest
    becomes a file name, so it must never carry '/' or '..')."""
    algo, _, hexpart = (digest or "").partition(":")
    if _HASHES.get(algo) != len(hexpart) or not all(c in "0123456789abcdef" for c in hexpart):
        raise StorageError(f"invalid digest: {digest!r}",
                           "a digest is sha256: and 64 lowercase hex digits")
    return algo, hexpart


def _hasher(algo: str, data: bytes = b""):
    import hashlib  # here only: a warm lookup (the hooks on a warm node) hashes no blob

    return hashlib.new(algo, data)


def digest_of_bytes(data: bytes, algo: str = "sha256") -> str:
    return f"{algo}:{_hasher(algo, data).hexdigest()}"


def copy_hashing(src, dst, algo: str = "sha256") -> tuple[str, int]:
    """Copy file object src to file object dst; return (digest, size)."""
    h, size = _hasher(algo), 0
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            return f"{algo}:{h.hexdigest()}", size
        h.update(chunk)
        dst.write(chunk)
        size += len(chunk)


class NotRegular(OSError):
    """A cache entry that should be a regular file is something else (a symlink, a FIFO, a
    device, a directory): never read it, it may block or never end."""


def open_regular(path, limit: int | None = None):
    """Open PATH for reading only if it is a regular file (not through a symlink; a FIFO is
    not waited on); NotRegular otherwise, or when it is larger than LIMIT bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegular(e.errno, "is a symbolic link", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(errno.EINVAL, "is not a regular file", str(path))
        if limit is not None and st.st_size > limit:
            raise NotRegular(errno.EFBIG, f"is larger than {limit} bytes", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def hash_file(path, algo: str = "sha256") -> str:
    h = _hasher(algo)
    with open_regular(path) as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return f"{algo}:{h.hexdigest()}"
            h.update(chunk)


def _fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, what: str = "") -> None:
    # 0644 under the cache root's own permissions: a group-shared cache stays readable
    try:
        fsutil.write_atomic(path, data, 0o644, fsync=True)  # removes its temp file on failure
    except OSError as e:
        _raise_no_space(e, path.parent, len(data), what or f"write {path.name}")
        raise


def _raise_no_space(exc: OSError, directory, needed: int | None, what: str) -> None:
    """Raise the NoSpace error for EXC if the disk, quota or inodes ran out; else return."""
    full = fsutil.no_space(exc, directory, needed, what)
    if full is not None:
        raise full from exc


def build_record(reference: str, manifest_digest: str, manifest: dict, config: dict,
                 platform: str | None = None, index_digest: str | None = None) -> ImageRecord:
    """An ImageRecord from a parsed single-platform manifest and its parsed config (both are
    checked again here: a cache entry may predate the checks on the way in)."""
    from uctr_batch.image import manifest as mt

    try:
        mt.check_image_manifest(manifest)
        mt.check_image_config(config)
    except mt.InvalidDocument as e:
        raise StorageError(f"malformed image {manifest_digest} of {reference}: {e}",
                           "remove it (uctr rmi) and pull or load it again") from None
    layers = tuple(Layer(d["digest"], d.get("mediaType", ""), d["size"])
                   for d in manifest.get("layers") or ())
    config_digest = manifest["config"]["digest"]
    if platform is None:
        found = platforms.from_json(config)
        platform = str(found) if found else None
    return ImageRecord(reference=reference, manifest_digest=manifest_digest,
                       config_digest=config_digest, layers=layers, platform=platform,
                       index_digest=index_digest, config=config)


def canonical(ref) -> str:
    """Canonical text of a reference; path transports get an absolute path."""
    if isinstance(ref, str):
        ref = references.parse(ref)
    if ref.transport in references.PATH_TRANSPORTS and ref.path:
        ref = replace(ref, path=os.path.abspath(ref.path))
    return str(ref)


class GcReport(Record):
    __slots__ = ("blobs", "partials", "kept_young")
    # blobs: (digest, size) removed; kept_young: unreferenced but inside the grace period
    _DEFAULTS = {"blobs": list, "partials": list, "kept_young": 0}

    @property
    def freed(self) -> int:
        return sum(size for _, size in self.blobs)


class VerifyReport(Record):
    __slots__ = ("checked", "bad", "removed", "missing")
    # bad: (digest, actual); missing: (digest, reference)
    _DEFAULTS = {"checked": 0, "bad": list, "removed": list, "missing": list}


class Store:
    """A cache root. Creating a Store creates the root (0700 for a new per-user cache)."""

    def __init__(self, root=None, *, lock_timeout: float = LOCK_TIMEOUT,
                 stale_after: float = STALE_AFTER, gc_grace: float = GC_GRACE):
        self.root = Path(root if root is not None else settings.default_cache_dir())
        self.lock_timeout = lock_timeout
        self.stale_after = stale_after
        self.gc_grace = gc_grace
        self._prepare()

    # -- layout: the only place cache paths are computed ------------------------------
    def blob_path(self, digest: str) -> Path:
        algo, hexpart = split_digest(digest)
        return self.root / "blobs" / algo / hexpart

    def partial_path(self, digest: str) -> Path:
        algo, hexpart = split_digest(digest)
        return self.root / "tmp" / f"{hexpart}.partial"

    def lock_path(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"

    def _ref_dir(self) -> Path:
        return self.root / "refs"

    def _ref_file(self, reference: str, platform: str | None) -> Path:
        plat = (platform or "any").replace("/", "_")
        return self._ref_dir() / f"{references.parse(reference).for_path()}#{plat}.json"

    def _prepare(self) -> None:
        """Create the root (0700) and its subdirectories; refuse a root others control."""
        root = self.root
        if not root.exists():
            try:
                root.parent.mkdir(parents=True, exist_ok=True)
                os.mkdir(root, 0o700)
            except FileExistsError:
                pass  # another process won the race
            except OSError as e:
                _raise_no_space(e, root.parent, None, "create the cache")
                raise StorageError(f"cannot create the cache directory {root}: {e.strerror}",
                                   "set UCTR_CACHE to a directory you can write") from e
        try:
            st = os.stat(root)  # an admin-provided shared root may be a symlink: follow it
        except OSError as e:  # e.g. UCTR_CACHE=/dev/null/x: a file in the path
            raise StorageError(f"cannot use the cache directory {root}: {e.strerror}",
                               "set UCTR_CACHE to a directory you can write") from e
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"cache path is not a directory: {root}",
                               "set UCTR_CACHE to a directory")
        self._check_trusted(st)
        mode = stat.S_IMODE(st.st_mode)
        for sub in ("blobs", "blobs/sha256", "refs", "tmp", "locks"):
            path = root / sub
            if not path.is_dir():
                try:
                    os.mkdir(path, 0o700)
                    os.chmod(path, mode)  # a group-shared cache keeps its group bits below too
                except FileExistsError:
                    pass  # another process won the race
                except OSError as e:
                    _raise_no_space(e, root, None, "create the cache")
                    raise StorageError(f"cannot create {path}: {e.strerror}",
                                       "set UCTR_CACHE to a directory you can write") from e
        for sub in ("blobs/sha256", "refs", "tmp", "locks"):
            if not (root / sub).is_dir():
                raise StorageError(f"the cache is damaged: {root / sub} is not a directory",
                                   f"remove it (rm {root / sub}); uctr creates it again")
        if not os.access(root, os.W_OK | os.X_OK):
            raise StorageError(
                f"cache directory is not writable: {root}",
                "ask the owner for write access or set UCTR_CACHE to your own directory")

    def _check_trusted(self, st: os.stat_result) -> None:
        """Trust a root owned by us or root, or a group-shared one we belong to; never one
        that anyone can write, sticky or not: a stranger's ref file could point our images
        at their manifest."""
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_IWOTH:
            raise StorageError(f"cache directory is writable by everyone: {self.root}",
                               f"chmod o-w {self.root}; to share a cache, use a group directory "
                               "(chgrp GROUP DIR; chmod 2770 DIR)")
        if st.st_uid in (os.getuid(), 0):
            return
        if mode & stat.S_IWGRP and st.st_gid in os.getgroups() + [os.getgid()]:
            return
        raise StorageError(
            f"cache directory belongs to another user (uid {st.st_uid}): {self.root}",
            "set UCTR_CACHE to a directory you own")

    # -- blobs ------------------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        """A blob is present when its name is a regular file (a symlink, FIFO or directory
        planted there counts as missing: the next pull renames a good copy over it)."""
        try:
            return stat.S_ISREG(os.lstat(self.blob_path(digest)).st_mode)
        except OSError:
            return False

    def touch_blob(self, digest: str) -> None:
        """Mark a blob as just used, so a concurrent gc's grace period protects it."""
        try:
            os.utime(self.blob_path(digest))
        except OSError:
            pass  # not ours to touch on a shared cache: pending markers protect it anyway

    def blob_lock(self, digest: str) -> FileLock:
        return FileLock(self.lock_path(split_digest(digest)[1]), timeout=self.lock_timeout,
                        stale_after=self.stale_after, what=f"blob {digest}")

    def ingest_blob(self, digest: str, fetch_fn: Callable[[Path], None],
                    size: int | None = None) -> str:
        """Make blob `digest` present. Returns CACHED, DOWNLOADED or WAITED.

        fetch_fn(partial_path) must leave the complete blob at partial_path and verify its
        digest (it may resume a partial left by a killed downloader); it runs under the
        blob's lock, so at most one process on any node fetches a blob at a time."""
        if self.has_blob(digest):
            self.touch_blob(digest)
            return CACHED
        lock = self.blob_lock(digest)
        waited = not lock.try_acquire()
        if waited:
            holder = lock.holder()
            who = holder.describe() if holder else "another process"
            log.verbose("waiting for %s to finish %s", who, digest)
            lock.acquire()
        try:
            if self.has_blob(digest):  # another process or node finished it meanwhile
                self.touch_blob(digest)
                return WAITED if waited else CACHED
            partial = self.partial_path(digest)
            try:
                st = os.lstat(partial)
            except FileNotFoundError:
                st = None
            if st is not None and (not stat.S_ISREG(st.st_mode)
                                   or not os.access(partial, os.W_OK)):
                # left by another user of a group cache (we cannot resume it), or planted:
                # a FIFO, symlink or directory is never resumed from
                self._remove_bad(partial)
            fetch_fn(partial)  # a full disk raises NoSpace (kept: a retry resumes the partial)
            self._commit(partial, digest, size)
            return DOWNLOADED
        finally:
            lock.release()

    def _commit(self, partial: Path, digest: str, size: int | None) -> None:
        """fsync a verified partial and rename it into blobs/ (atomic)."""
        actual = partial.stat().st_size
        if size is not None and actual != size:
            partial.unlink()
            raise DigestMismatch(f"blob {digest} has {actual} bytes, the manifest says {size}",
                                 "the source is corrupt; retry, or ask its maintainer")
        try:
            _fsync_path(partial)  # NFS and quotas may report a full disk only here
            self._rename_into(partial, digest)
        except OSError as e:
            _raise_no_space(e, self.root, actual, f"store blob {digest}")
            raise

    def _rename_into(self, src: Path, digest: str) -> None:
        """Rename a verified file to blob DIGEST. Whatever was planted at that name (a
        symlink, a FIFO: replaced by rename; a directory: removed first) gives way."""
        target = self.blob_path(digest)
        try:
            os.rename(src, target)
            return
        except OSError as e:
            if e.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise
        try:
            fsutil.remove_tree(target)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot replace the damaged cache entry {target}: "
                               f"{e.strerror or e}",
                               "remove it by hand or ask the cache's owner to, then retry") from e
        os.rename(src, target)

    def put_bytes(self, digest: str, data: bytes) -> None:
        """Store a small blob (manifest, config) after checking its digest."""
        algo, _ = split_digest(digest)
        actual = digest_of_bytes(data, algo)
        if actual != digest:
            raise DigestMismatch(f"content of {digest} hashes to {actual}",
                                 "the source served wrong bytes; retry, or check the image")
        if self.has_blob(digest):
            self.touch_blob(digest)
            return
        tmp = self.root / "tmp" / f"{digest.split(':')[1]}.{_unique()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._rename_into(tmp, digest)
        except BaseException as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            if isinstance(e, OSError):
                _raise_no_space(e, self.root, len(data), f"store {digest}")
            raise

    def ingest_stream(self, src, digest: str | None = None,
                      size: int | None = None) -> tuple[str, str]:
        """Copy file object `src` into the store. With `digest`, a present blob is not read
        again and a mismatch raises DigestMismatch; without, the digest is computed.
        Returns (digest, outcome)."""
        if digest is not None:
            def fetch(partial: Path) -> None:
                try:
                    with open(partial, "wb") as dst:  # a stream cannot resume: start over
                        actual, _ = copy_hashing(src, dst, split_digest(digest)[0])
                except BaseException as e:
                    partial.unlink(missing_ok=True)  # a part of a stream is worth nothing
                    if isinstance(e, OSError):
                        _raise_no_space(e, self.root, size, f"store blob {digest}")
                    raise
                if actual != digest:
                    partial.unlink()
                    raise DigestMismatch(f"content of {digest} hashes to {actual}",
                                         "the source is corrupt; nothing was kept")
            return digest, self.ingest_blob(digest, fetch, size)
        tmp = self.root / "tmp" / f"stream-{_unique()}.tmp"
        try:
            with open(tmp, "wb") as dst:
                actual, _ = copy_hashing(src, dst)
            if self.has_blob(actual):
                self.touch_blob(actual)
                return actual, CACHED
            _fsync_path(tmp)
            self._rename_into(tmp, actual)  # same bytes whoever wins: no lock needed
            return actual, DOWNLOADED
        except OSError as e:
            _raise_no_space(e, self.root, size, "store a blob")
            raise
        finally:
            if tmp.exists():
                tmp.unlink()

    def read_blob(self, digest: str, limit: int = _MAX_SMALL_BLOB) -> bytes:
        """A small cached blob (manifest, config) of at most LIMIT bytes, read only from a
        regular file; StorageError when it is something else or unreadable."""
        path = self.blob_path(digest)
        try:
            with open_regular(path, limit) as f:
                return f.read(limit + 1)
        except FileNotFoundError:
            raise ImageNotFound(f"blob {digest} is missing from the cache: {self.root}",
                                "pull the image again") from None
        except OSError as e:
            raise StorageError(f"cached blob {digest} cannot be read: {path} "
                               f"{e.strerror or e}",
                               "run `uctr verify --remove` (it removes damaged blobs), then "
                               "pull or load the image again") from None

    def read_json(self, digest: str) -> dict:
        """A cached manifest or config, parsed with the bounds of manifest.parse_document."""
        from uctr_batch.image.manifest import MAX_CONFIG, InvalidDocument, parse_document

        try:
            doc = parse_document(self.read_blob(digest, MAX_CONFIG), MAX_CONFIG)
        except InvalidDocument as e:
            raise StorageError(f"cached blob {digest} is not an image document ({e})",
                               "run `uctr verify --remove`, then pull or load the image again") from None
        if not isinstance(doc, dict):
            raise StorageError(f"cached blob {digest} is not a JSON object",
                               "run `uctr verify --remove`, then pull or load the image again")
        return doc

    def remove_blob(self, digest: str) -> None:
        """Remove a damaged blob (whatever sits at its name); StorageError if we cannot."""
        path = self.blob_path(digest)
        if not self._remove_bad(path):
            raise StorageError(f"cannot remove the damaged cache entry {path}",
                               "remove it by hand or ask the cache's owner to, then retry")

    def blobs(self) -> Iterator[tuple[str, Path]]:
        for algo in _HASHES:
            directory = self.root / "blobs" / algo
            if directory.is_dir():
                for entry in os.scandir(directory):
                    if len(entry.name) == _HASHES[algo]:
                        yield f"{algo}:{entry.name}", Path(entry.path)

    def missing_blobs(self, record: ImageRecord) -> list[str]:
        wanted = [record.manifest_digest, record.config_digest] + record.layer_digests()
        return [d for d in wanted if not self.has_blob(d)]

    # -- references -------------------------------------------------------------------
    def record(self, rec: ImageRecord) -> None:
        """Point rec.reference (+ its platform) at its manifest; atomic replace."""
        entry = {
            "reference": rec.reference,
            "platform": rec.platform,
            "manifest_digest": rec.manifest_digest,
            "index_digest": rec.index_digest,
            "config_digest": rec.config_digest,
            "size": self._image_size(rec),
            "pulled": time.time(),
        }
        data = json.dumps(entry, indent=1).encode()
        path = self._ref_file(rec.reference, rec.platform)
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):  # planted or damaged: rename cannot replace it
                fsutil.remove_tree(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot replace the damaged cache entry {path}: {e.strerror}",
                               "remove it by hand or ask the cache's owner to, then retry") from e
        _write_atomic(path, data, f"record {rec.reference}")

    def _image_size(self, rec: ImageRecord) -> int:
        config = self.blob_path(rec.config_digest)
        config_size = config.stat().st_size if config.exists() else 0
        return sum(layer.size for layer in rec.layers) + config_size

    def entries(self, reference: str | None = None) -> list[dict]:
        """Ref index entries, all or those of one canonical reference."""
        prefix = f"{references.parse(reference).for_path()}#" if reference else ""
        found = []
        names = sorted(n for n in os.listdir(self._ref_dir())
                       if n.startswith(prefix) and n.endswith(".json"))
        from uctr_batch.image.manifest import InvalidDocument, parse_document

        for path in (self._ref_dir() / n for n in names):
            try:
                with open_regular(path, _MAX_REF_FILE) as f:  # never a planted FIFO or device
                    entry = parse_document(f.read(_MAX_REF_FILE + 1), _MAX_REF_FILE)
            except (OSError, InvalidDocument):
                continue  # removed meanwhile, not a regular file, or not ours
            if not isinstance(entry, dict) or not _valid_entry(entry):
                continue
            if reference is None or entry.get("reference") == reference:
                entry["_file"] = path
                found.append(entry)
        return found

    def lookup(self, ref, platform: Platform | None = None) -> ImageRecord | None:
        """The cached record best serving `platform` (default: this host), or None."""
        wanted = platform or platforms.wanted_or_host(None)
        best, best_rank = None, None
        for entry in self.entries(canonical(ref)):
            have = platforms.parse(entry["platform"]) if entry.get("platform") else None
            r = platforms.rank(wanted, have) if have else 99  # unknown platform: last resort
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = entry, r
        return self.load_record(best) if best else None

    def find(self, ref) -> list[ImageRecord]:
        """All cached platforms of a reference."""
        return [self.load_record(e) for e in self.entries(canonical(ref))]

    def load_record(self, entry: dict) -> ImageRecord:
        manifest = self.read_json(entry["manifest_digest"])
        described = manifest.get("config")
        digest = described.get("digest") if isinstance(described, dict) else None
        config = self.read_json(digest if isinstance(digest, str) else entry["config_digest"])
        return build_record(entry["reference"], entry["manifest_digest"], manifest, config,
                            entry.get("platform"), entry.get("index_digest"))

    def remove_ref(self, ref_or_digest: str) -> int:
        """Remove index entries of a reference (all platforms) or of a manifest digest
        (full or a prefix of at least 12 hex digits). Blobs stay until gc."""
        if ref_or_digest.startswith("sha256:"):
            matched = [e for e in self.entries() if _digest_matches(ref_or_digest, e)]
        else:
            matched = self.entries(canonical(ref_or_digest))
        for entry in matched:
            try:
                entry["_file"].unlink()
            except FileNotFoundError:
                pass
        return len(matched)

    # -- pulls in progress ------------------------------------------------------------
    def pending(self, digests: Sequence[str]) -> "_Pending":
        """Context manager: protect `digests` from gc while a pull is using them."""
        return _Pending(self.root / "tmp" / f"pull-{_unique()}.json", digests)

    def _pending_digests(self, now: float) -> set[str]:
        keep: set[str] = set()
        for path in (self.root / "tmp").glob("pull-*.json"):
            try:
                if now - path.stat().st_mtime > PENDING_TTL:
                    path.unlink()
                    continue
                keep.update(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return keep

    # -- maintenance ------------------------------------------------------------------
    def referenced(self) -> set[str]:
        keep: set[str] = set()
        for entry in self.entries():
            for key in ("manifest_digest", "index_digest", "config_digest"):
                if entry.get(key):
                    keep.add(entry[key])
            keep.update(self._layer_digests(entry))
        return keep

    def gc(self, dry_run: bool = False) -> GcReport:
        """Delete blobs no reference or running pull uses, and abandoned partials. Blobs and
        partials younger than the grace period are kept: a concurrent pull may own them."""
        report = GcReport()
        with FileLock(self.lock_path("gc"), timeout=self.lock_timeout, stale_after=self.stale_after,
                      what="cache garbage collection"):
            now = time.time()
            keep = self.referenced() | self._pending_digests(now)
            for digest, path in self.blobs():
                if digest in keep:
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                if now - st.st_mtime < self.gc_grace:
                    report.kept_young += 1
                    continue
                if not dry_run:
                    path.unlink()
                report.blobs.append((digest, st.st_size))
            report.partials = self._sweep_tmp(now, dry_run)
            if not dry_run:
                self._sweep_locks(now)
        return report

    def _sweep_tmp(self, now: float, dry_run: bool) -> list[str]:
        removed = []
        for entry in os.scandir(self.root / "tmp"):
            name = entry.name
            if name.startswith("pull-"):
                continue
            try:
                if now - entry.stat().st_mtime < self.gc_grace:
                    continue
            except FileNotFoundError:
                continue
            if name.endswith(".partial"):
                lock = FileLock(self.lock_path(name[:-len(".partial")]), timeout=0,
                                stale_after=self.stale_after, what=f"partial {name}")
                if not lock.try_acquire():
                    continue  # a downloader is on it
                try:
                    if not dry_run:
                        os.unlink(entry.path)
                finally:
                    lock.release()
            elif not dry_run:
                os.unlink(entry.path)
            removed.append(name)
        return removed

    def _sweep_locks(self, now: float) -> None:
        """Leftovers of killed lockers: temp and set-aside files, and locks whose holder is
        gone (taking such a lock breaks it; a live holder's lock is left alone)."""
        for entry in os.scandir(self.root / "locks"):
            name = entry.name
            if name.endswith(".tmp") or ".stale." in name:
                try:
                    if now - entry.stat().st_mtime > PENDING_TTL:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    pass
            elif name.endswith(".lock") and name != "gc.lock" and not name.startswith("."):
                lock = FileLock(entry.path, timeout=0, stale_after=self.stale_after, what=name)
                try:
                    if lock.try_acquire():
                        lock.release()
                except UctrError as e:  # one odd lock file must not stop the whole gc
                    _log.warning("%s", e)

    def verify(self, remove: bool = False,
               progress: Callable[[str, bool], None] | None = None) -> VerifyReport:
        """Re-hash every blob; report (and optionally delete) those whose content does not
        match their name, and list blobs that references need but the cache lacks."""
        report = VerifyReport()
        for digest, path in self.blobs():
            try:
                actual = hash_file(path, digest.split(":")[0])
            except FileNotFoundError:
                continue  # removed by gc meanwhile
            except OSError as e:  # a planted symlink, FIFO or directory; an unreadable file
                actual = f"nothing: it {e.strerror}" if isinstance(e, NotRegular) else \
                    f"nothing: {e.strerror or e}"
            report.checked += 1
            ok = actual == digest
            if not ok:
                report.bad.append((digest, actual))
                if remove and self._remove_bad(path):
                    report.removed.append(digest)
            if progress:
                progress(digest, ok)
        for entry in self.entries():
            for digest in self._entry_digests(entry):
                if not self.has_blob(digest):
                    report.missing.append((digest, entry["reference"]))
        return report

    def _remove_bad(self, path: Path) -> bool:
        """Remove a bad blob (a directory planted in its place too); False if we cannot."""
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                fsutil.remove_tree(path)
            else:
                os.unlink(path)
            return True
        except FileNotFoundError:
            return True
        except (OSError, UctrError) as e:
            _log.warning("cannot remove %s: %s", path, getattr(e, "strerror", None) or e)
            return False

    def _entry_digests(self, entry: dict) -> list[str]:
        return [entry["manifest_digest"], entry["config_digest"]] + self._layer_digests(entry)

    def _layer_digests(self, entry: dict) -> list[str]:
        """The layer digests named by an entry's cached manifest; [] when it is unreadable
        (missing, damaged, not a regular file: read bounded, never blocking)."""
        try:
            manifest = self.read_json(entry["manifest_digest"])
        except (UctrError, KeyError, TypeError):
            return []
        layers = manifest.get("layers")
        return [d["digest"] for d in layers if isinstance(d, dict)
                and isinstance(d.get("digest"), str)] if isinstance(layers, list) else []


_MAX_REF_FILE = 65536  # a reference entry is ~400 bytes


def _valid_entry(entry: dict) -> bool:
    """A reference entry whose fields have the types the commands use (a group-shared cache
    may hold files written by hand or by another tool: those are skipped, not a traceback)."""
    from uctr_batch.image.manifest import InvalidDocument, check_digest

    try:
        check_digest(entry.get("manifest_digest"), "manifest_digest")
        check_digest(entry.get("config_digest"), "config_digest")
        if entry.get("index_digest") is not None:
            check_digest(entry["index_digest"], "index_digest")
    except InvalidDocument:
        return False
    if not (isinstance(entry.get("reference"), str)
            and isinstance(entry.get("platform"), (str, type(None)))
            and type(entry.get("size", 0)) in (int, float)
            and type(entry.get("pulled", 0)) in (int, float)):
        return False
    try:
        references.parse(entry["reference"])
        if entry.get("platform"):
            platforms.parse(entry["platform"])
    except UctrError:
        return False
    return True


def _digest_matches(text: str, entry: dict) -> bool:
    hexpart = text.split(":", 1)[1]
    full = entry.get("manifest_digest", "")
    return len(hexpart) >= 12 and full.startswith(text)


class _Pending:
    def __init__(self, path: Path, digests: Sequence[str]):
        self.path, self.digests = path, list(digests)

    def __enter__(self):
        _write_atomic(self.path, json.dumps(self.digests).encode(), "start the pull")
        return self

    def __exit__(self, *exc):
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


# -- commands ---------------------------------------------------------------------------

def open_default() -> Store:
    """The cache image commands use: UCTR_CACHE, else the site policy's, else the default."""
    from uctr_batch.policy import current_node_policy

    return Store(settings.cache_dir(current_node_policy()))


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"


def _image_row(entry: dict) -> dict[str, str]:
    ref = references.parse(entry["reference"])
    if ref.is_registry or ref.repository:
        repo, tag = ref.name, ref.tag or "<none>"
    else:
        repo, tag = f"{ref.transport}:{ref.path}", ref.tag or "<none>"
    return {"REPOSITORY": repo, "TAG": tag, "DIGEST": entry["manifest_digest"][:19],
            "PLATFORM": entry.get("platform") or "?", "SIZE": human_size(entry.get("size", 0)),
            "PULLED": time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.get("pulled", 0)))}


def print_table(rows: list[dict[str, str]], columns: Sequence[str]) -> None:
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in columns}
    for row in [dict(zip(columns, columns))] + rows:
        sys.stdout.write("   ".join(row[c].ljust(widths[c]) for c in columns).rstrip() + "\n")


def cmd_images(args) -> int:
    entries = open_default().entries()
    if getattr(args, "json", False):
        out = [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print_table([_image_row(e) for e in entries],
                 ("REPOSITORY", "TAG", "DIGEST", "PLATFORM", "SIZE", "PULLED"))
    return 0


def _record_for(store: Store, image: str, platform: str | None) -> ImageRecord:
    wanted = platforms.parse(platform) if platform else None
    rec = store.lookup(image, wanted)
    if rec is None and wanted is None:
        found = store.find(image)
        rec = found[0] if found else None
    if rec is None:
        what = canonical(image) + (f" ({platform})" if platform else "")
        raise ImageNotFound(f"image not in the cache: {what}", f"pull it first: uctr pull {image}")
    return rec


def inspect_json(rec: ImageRecord) -> dict:
    return {
        "reference": rec.reference,
        "manifest_digest": rec.manifest_digest,
        "index_digest": rec.index_digest,
        "config_digest": rec.config_digest,
        "platform": rec.platform,
        "layers": [{"digest": la.digest, "mediaType": la.media_type, "size": la.size,
                    "compression": la.compression} for la in rec.layers],
        "config": rec.config,
    }


def cmd_inspect(args) -> int:
    rec = _record_for(open_default(), args.image, getattr(args, "platform", None))
    json.dump(inspect_json(rec), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_rmi(args) -> int:
    store = open_default()
    unknown = []
    for image in args.image:
        count = store.remove_ref(image)
        if count:
            name = image if image.startswith("sha256:") else canonical(image)
            sys.stdout.write(f"untagged {name}\n")
        else:
            unknown.append(image)
    if unknown:
        raise ImageNotFound(f"no such image in the cache: {', '.join(unknown)}",
                            "see `uctr images`")
    return 0


def cmd_gc(args) -> int:
    report = open_default().gc(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for digest, size in report.blobs:
        sys.stdout.write(f"{verb} {digest} ({human_size(size)})\n")
    for name in report.partials:
        sys.stdout.write(f"{verb} partial download {name}\n")
    _log.info("%s %d blobs, %s; %d partials; kept %d recent unreferenced blobs",
              verb, len(report.blobs), human_size(report.freed), len(report.partials),
              report.kept_young)
    return 0


def cmd_verify(args) -> int:
    store = open_default()
    report = store.verify(remove=args.remove)
    for digest, actual in report.bad:
        state = "removed" if digest in report.removed else "bad"
        shown = actual if actual.startswith("nothing") else f"content hashes to {actual}"
        sys.stdout.write(f"{state} {digest} ({shown})\n")
    for digest, ref in report.missing:
        _log.warning("missing %s needed by %s (uctr pull fetches it again)", digest, ref)
    bad, removed = len(report.bad), len(report.removed)
    _log.info("checked %d blobs: %d bad, %d removed", report.checked, bad, removed)
    if bad > removed:
        raise StorageError(f"{bad - removed} corrupt blobs in the cache: {store.root}",
                           "run `uctr verify --remove`, then pull the affected images again")
    return 0

