"""Flatten image layers into a root filesystem: OCI whiteouts, safety checks, speed.

Validate, then act (Charliecloud's flatten). Each layer goes through three steps:
  1. prepare: decompress the blob once into an unnamed temporary file beside the rootfs,
     verifying the compressed stream's digest in the same pass, and list its members;
  2. plan: check every member and turn it into operations on single names, against an
     in-memory model of the tree (_Tree) -- nothing is written while a layer may still be
     rejected;
  3. act: run the plan (_Writer).

Why one decompression into a temporary file: validation needs the whole member list before
the first write. Reading the layer twice would inflate it twice (zlib is the slowest step:
~1.3 s for the 60 MiB Debian layer, isal ~0.55 s); writing the tar once to node-local
storage costs a fraction of that, lets the member list be read by seeking over the data,
and lets the act step copy file contents in the kernel (sendfile) without Python buffers.
The file is created with O_TMPFILE, so it has no name and vanishes even on SIGKILL; its
price is disk (or tmpfs memory) for one uncompressed layer at a time, two while the next
layer is prepared in a background thread during the current one's act step.

Safety model (what stops a layer from writing outside the rootfs):
  - member names with '..' are rejected, absolute names are relative to the rootfs;
  - parent directories are resolved in the model with securejoin semantics: a symlink is
    followed with the rootfs as '/', and '..' is clamped there, so the result is always a
    real directory inside the rootfs; the final component is never followed (replaced);
  - hard links name a target inside the rootfs, resolved the same way; it must exist and
    not be a directory;
  - the act step never passes a multi-component path to the kernel: every directory is
    opened from its parent's fd with O_NOFOLLOW|O_DIRECTORY and every entry is created by
    name in such an fd (O_CREAT|O_EXCL|O_NOFOLLOW, mkdirat, symlinkat, linkat without
    AT_SYMLINK_FOLLOW), so even a tree changed behind our back cannot redirect a write.

Result, as an unprivileged user would get it (rootless): everything owned by the caller;
set-user/group-ID bits stripped from non-directories; non-directories get u+r and
directories u+rx so the owner can always read the tree (no user-namespace root may be
there to override modes at run time); device nodes are skipped and counted; FIFOs are
created; directories are created 0700 and get their final modes and mtimes at the end,
deepest first, so a 0500 directory still receives its children; mtimes kept like tar.
"""

import errno
import hashlib
import math
import os
import tarfile
import tempfile
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from uctr_batch import fsutil, log
from uctr_batch.errors import DigestMismatch, LayerRejected, StorageError
from uctr_batch.image.manifest import Layer
from uctr_batch.image.store import open_regular

try:  # isal inflates ~2.4x faster than zlib here and releases the GIL (extra "fast")
    from isal import igzip as _gzip
    from isal.isal_zlib import error as _GzipError
except ImportError:  # pragma: no cover - depends on the installed extras
    import gzip as _gzip
    _GzipError = zlib.error

_log = log.get("flatten")

_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)  # skippable frames' magic numbers
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_DIGESTS = ("sha256", "sha384", "sha512")  # the OCI image spec's registered algorithms
_MAX_SYMLINK_HOPS = 40  # like the kernel's ELOOP limit
_NAME_MAX = 255
_PATH_MAX = 4096
_FD_CACHE = 256  # directory fds kept open (LRU); tar members come grouped by directory
# Bounds on what one layer may make tarfile hold in memory (Go's archive/tar, used by docker
# and umoci, caps PAX and GNU long-name records and sparse maps at 1 MiB the same way).
_MAX_EXT_HEADER = 1 << 20  # a PAX record set, a GNU long name/link, a GNU 1.0 sparse map
_MAX_MEMBERS = 1 << 20  # members in one layer (each costs ~1 KiB of memory while planned)
_MAX_MTIME = (2 ** 63 - 1) // 1_000_000_000  # seconds whose nanoseconds fit utimensat
_BLOCK = 4096  # allocation unit assumed when estimating the space a layer needs

# kinds of entries in the model
_DIR, _FILE, _SYMLINK, _OTHER, _DEVICE = range(5)
# plan operations: (op, parent, name, ...)
_OP_FILE, _OP_MKDIR, _OP_SYMLINK, _OP_LINK, _OP_FIFO, _OP_REMOVE = range(6)

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SETID = 0o6000
_DEVICE_TYPES = (tarfile.CHRTYPE, tarfile.BLKTYPE)

LayerInput = Tuple[Union[str, Path], Optional[Layer]]


@dataclass
class Stats:
    """What an unpack did; shown with -v and kept in the bundle's image.json."""

    layers: int = 0
    members: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    fifos: int = 0
    whiteouts: int = 0
    removed: int = 0  # entries of lower layers deleted by whiteouts or replaced
    devices_skipped: int = 0
    other_skipped: int = 0  # member types with no meaning in a rootfs
    setid_stripped: int = 0
    bytes: int = 0  # regular file data written

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


def unpack_layers(layers: Sequence[LayerInput], dest: Union[str, Path], *,
                  diff_ids: Optional[Sequence[str]] = None, limit: Optional[int] = None,
                  space_dir: Union[str, Path, None] = None) -> Stats:
    """Apply LAYERS, (blob path, Layer or None) in order, into the existing empty directory
    DEST. A Layer's digest is verified against the blob; None skips that check. DIFF_IDS
    (the image config's rootfs.diff_ids), when given, must match the layers one to one:
    each uncompressed stream is hashed to its end and compared. LIMIT bounds the bytes an
    unpack may put on disk (the policy's node-local quota); the free space of DEST's file
    system bounds them too, checked before each layer is written. SPACE_DIR names the
    directory shown in a no-space error (default DEST).

    Raises LayerRejected, DigestMismatch or StorageError (NoSpace when the disk, a quota or
    the inodes run out); DEST is then left half-written and the caller discards it."""
    dest = Path(dest)
    items = list(layers)
    if diff_ids is not None and len(diff_ids) != len(items):
        raise LayerRejected(
            f"the image config lists {len(diff_ids)} layer diff_ids for {len(items)} layers",
            "the image is damaged or malicious; nothing of it is used. "
            "Report it to its maintainer.")
    budget = _Budget(dest, limit, space_dir if space_dir is not None else dest)
    root_fd = _open_empty_dir(dest)
    stats = Stats()
    writer = _Writer(root_fd)
    tree = _Tree()
    old_umask = os.umask(0)  # modes are given explicitly to every create
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uctr-layer")
    pending: Optional[Future] = None

    def prepare(index: int) -> Future:
        blob, layer = items[index]
        diff_id = diff_ids[index] if diff_ids is not None else None
        return pool.submit(_LayerTar.prepare, blob, layer, dest, diff_id, budget)

    try:
        if items:
            pending = prepare(0)
        for index in range(len(items)):
            future, pending = pending, None
            current = future.result()
            try:
                if index + 1 < len(items):  # decompress the next layer during this one's writes
                    pending = prepare(index + 1)
                _log.log(log.VERBOSE, "layer %d/%d: %s (%s, %d members)", index + 1, len(items),
                         current.label, current.compression, len(current.members))
                ops = _Planner(tree, stats, current.label).plan(current.members)
                budget.check_plan(ops, stats, current)
                writer.apply(ops, current, budget)
            finally:
                current.close()
            stats.layers += 1
        writer.finish_dirs(tree)
    finally:
        os.umask(old_umask)
        if pending is not None:
            _discard(pending)
        pool.shutdown(wait=True)
        writer.close()
    if stats.devices_skipped:
        _log.log(log.VERBOSE, "skipped %d device node(s)", stats.devices_skipped)
    if stats.setid_stripped:
        _log.log(log.VERBOSE, "stripped set-user/group-ID bits from %d file(s)",
                 stats.setid_stripped)
    return stats


class _Budget:
    """Space an unpack may use: the policy LIMIT (bytes of file data, None: no limit) and
    the free space and inodes of DEST's file system, checked before anything is written so
    a layer that cannot fit (a decompression bomb, a huge file) stops with a clean error
    instead of filling the disk. Writes that still hit ENOSPC/EDQUOT are reported alike."""

    def __init__(self, dest: Path, limit: Optional[int], space_dir):
        self.dest, self.limit, self.space_dir = dest, limit, space_dir

    def free(self) -> Tuple[Optional[int], Optional[int], int]:
        """(free bytes, free inodes or None, reserve): the reserve is kept free so that
        the records written after the unpack and other users still find room."""
        try:
            st = os.statvfs(self.dest)
        except OSError:
            return None, None, 0
        reserve = min(st.f_blocks * st.f_frsize // 100, 64 << 20)
        return st.f_bavail * st.f_frsize, (st.f_favail if st.f_files else None), reserve

    def stream_limit(self) -> Optional[int]:
        """Most bytes one uncompressed layer stream may have: it is written to a temporary
        file beside the rootfs, so it needs that much disk itself."""
        free, _, reserve = self.free()
        bounds = [b for b in (self.limit, None if free is None else max(free - reserve, 0))
                  if b is not None]
        return min(bounds) if bounds else None

    def stream_too_big(self, label: str, written: int) -> StorageError:
        if self.limit is not None and written > self.limit:
            return self.over_limit(label, written)
        return self.full(label, written)

    def over_limit(self, label: str, needed: int) -> StorageError:
        return StorageError(
            f"cannot unpack layer {label}: it needs more than {fsutil.human_size(needed)}, "
            f"more than this node's quota of {fsutil.human_size(self.limit)} for node-local "
            "root filesystems",
            "use a smaller image or ask the site to raise storage.local_quota")

    def full(self, label: str, needed: Optional[int], exc: Optional[OSError] = None
             ) -> StorageError:
        exc = exc or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsutil.no_space(exc, self.space_dir, needed, f"unpack layer {label}")

    def check_plan(self, ops: List[tuple], stats: "Stats", layer: "_LayerTar") -> None:
        data, inodes = _plan_space(ops)
        if self.limit is not None and stats.bytes > self.limit:
            raise self.over_limit(layer.label, stats.bytes)
        free, free_inodes, reserve = self.free()
        if free is not None and data > max(free - reserve, 0):
            raise self.full(layer.label, data)
        if free_inodes is not None and inodes > free_inodes:
            exc = OSError(errno.ENOSPC, "no free inodes")
            raise fsutil.no_space(exc, self.space_dir, data,
                                  f"unpack layer {layer.label} ({inodes} new files)")


def _plan_space(ops: List[tuple]) -> Tuple[int, int]:
    """(bytes, inodes) a plan will allocate, estimated: file data rounded up to blocks
    (holes of sparse files take none), one block per directory and long symlink."""
    data = inodes = 0
    for op in ops:
        code = op[0]
        if code == _OP_FILE:
            inodes += 1
            data += -(-_data_size(op[4], op[7]) // _BLOCK) * _BLOCK
        elif code == _OP_MKDIR:
            inodes += 1
            data += _BLOCK
        elif code in (_OP_SYMLINK, _OP_FIFO):
            inodes += 1
    return data, inodes


def _data_size(size: int, sparse: Optional[tarfile.TarInfo]) -> int:
    """Bytes of a file's data in the archive: all of it, or only a sparse file's extents."""
    return size if sparse is None else sum(n for _, n in sparse.sparse)


def _discard(future: Future) -> None:
    """Close the temp file of a prepared layer nobody will use (after an error)."""
    try:
        future.result().close()
    except Exception:  # the error that stopped us is the one to report
        pass


def _open_empty_dir(dest: Path) -> int:
    try:
        fd = os.open(dest, _O_DIR)
    except OSError as e:
        raise StorageError(f"cannot open the unpack target: {dest}: {e.strerror}",
                           "give a directory you own and can write") from e
    if os.listdir(fd):
        os.close(fd)
        raise StorageError(f"unpack target is not empty: {dest}", "give a new or empty directory")
    return fd


# -- step 1: prepare --------------------------------------------------------------------------
class _HashingReader:
    """File wrapper hashing every byte the decompressor reads."""

    def __init__(self, raw: IO[bytes], hasher):
        self.raw, self.hasher = raw, hasher

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if self.hasher is not None:
            self.hasher.update(data)
        return data

    def readinto(self, buffer) -> int:
        count = self.raw.readinto(buffer)
        if self.hasher is not None and count:
            self.hasher.update(memoryview(buffer)[:count])
        return count

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def _sniff(raw: IO[bytes]) -> str:
    """Compression from magic bytes: media types are not trusted (docker-archive layers
    declared as gzip are often plain tar)."""
    magic = raw.read(4)
    raw.seek(0)
    if magic.startswith(_GZIP_MAGIC):
        return "gzip"
    if magic == _ZSTD_MAGIC or (len(magic) == 4 and
                                int.from_bytes(magic, "little") in _ZSTD_SKIPPABLE):
        return "zstd"
    return "none"


def _hasher_for(layer: Optional[Layer], label: str):
    if layer is None or not layer.digest:
        return None
    algorithm = layer.digest.partition(":")[0]
    if algorithm not in _DIGESTS:
        raise LayerRejected(f"layer {label} rejected: unsupported digest algorithm: {algorithm}",
                            "push the image with sha256 or sha512 digests")
    return hashlib.new(algorithm)


def _check_zstd_frames(raw: IO[bytes]) -> None:
    """Walk the zstd frames of RAW (block headers only, no decompression) and raise
    ValueError unless they are complete and nothing else follows: the zstd reader returns
    what it could decode of a cut frame and then a silent end. Rewinds RAW."""
    def need(count: int) -> bytes:
        data = raw.read(count)
        if len(data) != count:
            raise ValueError("truncated zstd frame")
        return data

    try:
        while True:
            magic = raw.read(4)
            if not magic:
                return
            if len(magic) != 4:
                raise ValueError("trailing bytes after the last zstd frame")
            number = int.from_bytes(magic, "little")
            if number in _ZSTD_SKIPPABLE:
                length = int.from_bytes(need(4), "little")
                raw.seek(length, os.SEEK_CUR)
                need(0)
                if raw.tell() > os.fstat(raw.fileno()).st_size:
                    raise ValueError("truncated zstd skippable frame")
                continue
            if magic != _ZSTD_MAGIC:
                raise ValueError("trailing bytes after the last zstd frame")
            descriptor = need(1)[0]
            single = descriptor & 0x20
            size_field = (0, 2, 4, 8)[descriptor >> 6] or (1 if single else 0)
            header = (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] + size_field
            need(header)
            while True:
                block = int.from_bytes(need(3), "little")
                kind, length = (block >> 1) & 3, block >> 3
                if kind == 3:
                    raise ValueError("reserved zstd block type")
                raw.seek(1 if kind == 1 else length, os.SEEK_CUR)
                if block & 1:
                    break
            if descriptor & 4:
                raw.seek(4, os.SEEK_CUR)
            if raw.tell() > os.fstat(raw.fileno()).st_size:
                raise ValueError("truncated zstd frame")
    finally:
        raw.seek(0)


def _decompressed(src: _HashingReader, compression: str):
    if compression == "gzip":
        return _gzip.GzipFile(fileobj=src, mode="rb")
    if compression == "zstd":
        import zstandard  # only when a zstd layer shows up

        return zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
    return src


def _decompress_errors() -> tuple:
    errors = (OSError, EOFError, ValueError, zlib.error, _GzipError)
    try:
        import zstandard
    except ImportError:  # pragma: no cover
        return errors
    return errors + (zstandard.ZstdError,)


class _LayerTar:
    """One layer as an uncompressed tar in an unnamed temp file, digest verified, members listed."""

    def __init__(self, label: str, compression: str, tmp: IO[bytes]):
        self.label, self.compression, self.file = label, compression, tmp
        self.fd = tmp.fileno()
        self.tar: Optional[tarfile.TarFile] = None
        self.members: List[tarfile.TarInfo] = []
        self.size = 0  # bytes of the uncompressed stream

    @classmethod
    def prepare(cls, blob, layer: Optional[Layer], scratch: Path, diff_id: Optional[str] = None,
                budget: Optional["_Budget"] = None) -> "_LayerTar":
        label = layer.digest if layer is not None and layer.digest else str(blob)
        budget = budget or _Budget(scratch, None, scratch)
        try:  # a regular file only: a blob swapped for a FIFO or /dev/zero must not hang us
            raw = open_regular(blob)
        except OSError as e:
            raise StorageError(f"cannot read layer {label}: {blob}: {e.strerror}",
                               "check the cache: `uctr verify --remove`, then pull the image "
                               "again") from e
        with raw:
            compression = _sniff(raw)
            try:  # O_TMPFILE where the filesystem has it: no name, gone on close or kill
                tmp = tempfile.TemporaryFile(dir=scratch)
            except OSError as e:
                full = fsutil.no_space(e, budget.space_dir, None, f"unpack layer {label}")
                raise full or StorageError(
                    f"cannot create a temporary file in {scratch}: {e.strerror}",
                    "the node-local directory must be yours and writable (UCTR_LOCAL_DIR)") from e
            this = cls(label, compression, tmp)
            try:
                this._inflate(raw, layer, diff_id, budget)
                this._list_members(budget)
            except BaseException:
                this.close()
                raise
        return this

    def _inflate(self, raw: IO[bytes], layer: Optional[Layer], diff_id: Optional[str],
                 budget: "_Budget") -> None:
        src = _HashingReader(raw, _hasher_for(layer, self.label))
        diff_hasher = _diff_hasher(diff_id, self.label)
        bound = budget.stream_limit()
        try:
            if self.compression == "zstd":
                _check_zstd_frames(raw)  # the zstd reader ends silently at a cut frame
            stream = _decompressed(src, self.compression)
            while True:
                chunk = stream.read(_CHUNK)
                if not chunk:
                    break
                self.size += len(chunk)
                if bound is not None and self.size > bound:
                    self._give_back()  # the error shows the free space as it will be
                    raise budget.stream_too_big(self.label, _count_rest(stream, self.size))
                if diff_hasher is not None:
                    diff_hasher.update(chunk)
                self._write(chunk, budget)
            src.drain()  # the digest covers bytes after the end of the compressed stream too
        except _decompress_errors() as e:
            src.drain()
            self._verify(src.hasher, layer)  # a damaged blob is reported as such
            raise LayerRejected(
                f"layer {self.label} rejected: cannot decompress ({self.compression}): {e}",
                "the blob is corrupt or truncated; check the cache with `uctr verify --remove` "
                "and pull the image again") from e
        self._verify(src.hasher, layer)
        if diff_hasher is not None and diff_hasher.hexdigest() != diff_id.partition(":")[2]:
            raise LayerRejected(
                f"layer {self.label} rejected: its uncompressed content does not match the "
                f"image config's diff_id {diff_id}: got "
                f"{diff_hasher.name}:{diff_hasher.hexdigest()}",
                "the image is damaged or inconsistent; nothing of it is used. "
                "Report it to its maintainer.")

    def _give_back(self) -> None:
        """Free the temp file's blocks now (it is closed by the caller)."""
        try:
            self.file.seek(0)
            self.file.truncate(0)
        except (OSError, ValueError):
            pass

    def _write(self, chunk: bytes, budget: "_Budget") -> None:
        try:
            self.file.write(chunk)
        except OSError as e:
            self._give_back()
            raise fsutil.no_space(e, budget.space_dir, self.size, f"unpack layer {self.label}") \
                or StorageError(
                    f"cannot write the uncompressed layer {self.label}: {e.strerror}") from e

    def _verify(self, hasher, layer: Optional[Layer]) -> None:
        if hasher is None:
            return
        expected = layer.digest.partition(":")[2]
        if hasher.hexdigest() != expected:
            raise DigestMismatch(
                f"layer blob does not match its digest {layer.digest}: got "
                f"{hasher.name}:{hasher.hexdigest()}",
                "the cached blob is damaged; run `uctr verify --remove` and pull the image again")

    def _list_members(self, budget: "_Budget") -> None:
        try:
            self.file.flush()
        except OSError as e:  # buffered bytes hit a full disk only now
            raise fsutil.no_space(e, budget.space_dir, self.size,
                                  f"unpack layer {self.label}") or StorageError(
                f"cannot write the uncompressed layer {self.label}: {e.strerror}") from e
        size = os.fstat(self.fd).st_size
        if size == 0:  # an empty blob is an empty layer
            return
        self.file.seek(0)
        try:
            self.tar = tarfile.open(fileobj=self.file, mode="r:", tarinfo=_SafeTarInfo)
            for member in self.tar:
                self.members.append(member)
                if len(self.members) > _MAX_MEMBERS:
                    raise _BadHeader(f"more than {_MAX_MEMBERS} members in one layer")
        except _BadHeader as e:
            raise LayerRejected(f"layer {self.label} rejected: {e}",
                                "the image is damaged or malicious; nothing of it is used. "
                                "Report it to its maintainer.") from None
        except (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError,
                IndexError, OSError) as e:  # OSError: a size seeking past the largest file
            raise LayerRejected(f"layer {self.label} rejected: not a valid tar archive: {e}",
                                "the image is damaged; pull it again or report it to its "
                                "maintainer") from e
        self._check_end(size)
        self._check_data(size)

    def _check_end(self, size: int) -> None:
        """tarfile ends silently at a bad header after the first one: insist that what follows
        the last member is end-of-archive zeros (or nothing), not garbage or a torn block."""
        offset = self.tar.offset
        if offset >= size:
            return
        block = os.pread(self.fd, tarfile.BLOCKSIZE, offset)
        if len(block) < tarfile.BLOCKSIZE or block.count(0) != len(block):
            raise LayerRejected(
                f"layer {self.label} rejected: corrupt or truncated tar data at offset {offset}",
                "the image is damaged; pull it again or report it to its maintainer")

    def _check_data(self, size: int) -> None:
        """Every file's data lies inside the archive, before the next header (a truncated last
        file, or a header whose size overlaps the next one, is rejected, not half-copied),
        and every sparse map is ordered, non-overlapping and inside the file."""
        members = self.members
        for index, member in enumerate(members):
            if not member.isreg():
                continue
            end = members[index + 1].offset if index + 1 < len(members) else size
            if member.sparse is not None:
                _check_sparse_map(member, self.label)
            if member.offset_data + _data_size(member.size, member if member.sparse is not None
                                               else None) > end:
                raise LayerRejected(
                    f"layer {self.label} rejected: truncated or overlapping file data: "
                    f"{member.name}",
                    "the image is damaged; pull it again or report it to its maintainer")

    def close(self) -> None:
        self.file.close()


_COUNT_AFTER_LIMIT = 1 << 30  # inflated (not written) past a limit to tell the size needed


def _count_rest(stream, size: int) -> int:
    """SIZE plus what is left in STREAM, counting at most _COUNT_AFTER_LIMIT more bytes (a
    decompression bomb can expand to terabytes): the size a too-big layer needs, or a lower
    bound of it."""
    end = size + _COUNT_AFTER_LIMIT
    try:
        while size < end:
            chunk = stream.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
    except _decompress_errors():
        pass
    return size


def _diff_hasher(diff_id: Optional[str], label: str):
    if diff_id is None:
        return None
    algorithm, _, hexpart = str(diff_id).partition(":")
    if algorithm not in _DIGESTS or not hexpart:
        raise LayerRejected(f"layer {label} rejected: invalid diff_id in the image config: "
                            f"{str(diff_id)[:100]!r}",
                            "the image config is damaged; report it to its maintainer")
    return hashlib.new(algorithm)


def _check_sparse_map(member: tarfile.TarInfo, label: str) -> None:
    """Like Go's archive/tar: offsets and lengths non-negative, in order, not overlapping,
    and inside the file's declared size."""
    position = 0
    for extent in member.sparse:
        try:
            offset, length = extent
            good = (isinstance(offset, int) and isinstance(length, int) and length >= 0
                    and 0 <= offset and offset + length <= member.size
                    and (length == 0 or offset >= position))  # empty slots carry no data
        except (TypeError, ValueError):
            good = False
        if not good:
            raise LayerRejected(f"layer {label} rejected: invalid sparse map: {member.name}",
                                "the image is damaged or malicious; nothing of it is used. "
                                "Report it to its maintainer.")
        if length:
            position = offset + length


class _BadHeader(Exception):
    """A tar header outside the bounds below (turned into LayerRejected by the caller)."""


_EXT_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
              tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class _SafeTarInfo(tarfile.TarInfo):
    """tarfile's parser with bounds: extended headers and sparse maps of at most
    _MAX_EXT_HEADER bytes (tarfile reads them into memory whole, and loops forever on a GNU
    1.0 sparse map cut short), and PAX values that keep the member usable: a size >= 0
    (a negative one makes tarfile seek backwards) and a finite mtime."""

    def _proc_member(self, tarfile_):
        if self.type in _EXT_TYPES and self.size > _MAX_EXT_HEADER:
            raise _BadHeader(f"extended tar header of {self.size} bytes "
                             f"(more than {_MAX_EXT_HEADER}) at offset {self.offset}")
        return super()._proc_member(tarfile_)

    def _proc_gnusparse_10(self, next, pax_headers, tarfile_):
        fileobj = tarfile_.fileobj
        buf = b""
        numbers: List[int] = []
        count = None
        while count is None or len(numbers) < count * 2:
            if b"\n" not in buf:
                if len(buf) > _MAX_EXT_HEADER:
                    raise _BadHeader(f"sparse map too large: {next.name}")
                block = fileobj.read(tarfile.BLOCKSIZE)
                if len(block) < tarfile.BLOCKSIZE:
                    raise _BadHeader(f"truncated sparse map: {next.name}")
                buf += block
                continue
            line, buf = buf.split(b"\n", 1)
            try:
                value = int(line)
            except ValueError:
                raise _BadHeader(f"invalid sparse map: {next.name}") from None
            if count is None:
                if not 0 <= value <= _MAX_EXT_HEADER // 4:
                    raise _BadHeader(f"invalid sparse map: {next.name}")
                count = value
            else:
                numbers.append(value)
        next.offset_data = fileobj.tell()
        next.sparse = list(zip(numbers[::2], numbers[1::2]))

    def _apply_pax_info(self, pax_headers, encoding, errors):
        try:
            super()._apply_pax_info(pax_headers, encoding, errors)
        except (ValueError, OverflowError):
            raise _BadHeader(f"invalid PAX header values at offset {self.offset}") from None
        if not isinstance(self.size, int) or self.size < 0:
            raise _BadHeader(f"invalid size {self.size!r} in a PAX header: {self.name!r}")
        mtime = self.mtime
        if isinstance(mtime, float) and not math.isfinite(mtime):
            raise _BadHeader(f"invalid mtime {mtime!r} in a PAX header: {self.name!r}")


# -- step 2: plan -----------------------------------------------------------------------------
def _join(parent: str, name: str) -> str:
    return parent + "/" + name if parent else name


class _Tree:
    """What the rootfs holds, keyed by real path ('' is the root, 'usr/bin' a directory in it).

    A path is a key only if every prefix is a real directory key, so a key resolves to itself.
    Devices are kept as _DEVICE entries (not on disk) so links and whiteouts see them."""

    def __init__(self):
        self.kind: Dict[str, int] = {"": _DIR}
        self.target: Dict[str, str] = {}  # symlink path -> link text
        self.children: Dict[str, set] = {"": set()}
        self.dir_meta: Dict[str, Tuple[int, Optional[int]]] = {}  # dir -> (mode, mtime ns)

    def add(self, parent: str, name: str, path: str, kind: int,
            target: Optional[str] = None) -> None:
        self.kind[path] = kind
        self.children[parent].add(name)
        if kind == _DIR:
            self.children[path] = set()
        elif kind == _SYMLINK:
            self.target[path] = target

    def remove(self, parent: str, name: str, path: str) -> Optional[int]:
        """Forget PATH and everything below it; return its kind (None if absent)."""
        kind = self.kind.pop(path, None)
        if kind is None:
            return None
        self.children[parent].discard(name)
        if kind == _SYMLINK:
            del self.target[path]
        elif kind == _DIR:
            self._drop_subtree(path)
        return kind

    def _drop_subtree(self, top: str) -> None:
        stack = [top]
        while stack:
            directory = stack.pop()
            self.dir_meta.pop(directory, None)
            for name in self.children.pop(directory):
                path = _join(directory, name)
                kind = self.kind.pop(path)
                if kind == _DIR:
                    stack.append(path)
                elif kind == _SYMLINK:
                    del self.target[path]

    def resolve(self, components: List[str]) -> Tuple[str, Optional[str]]:
        """Real path of COMPONENTS, following every symlink with the rootfs as '/' and
        clamping '..' at it (securejoin). Returns (path, problem): problem names a
        component that exists but is not a directory, or a symlink loop."""
        stack = components[::-1]
        current = ""
        hops = 0
        while stack:
            component = stack.pop()
            if component == "..":
                current = current.rpartition("/")[0]
                continue
            if not component or component == ".":
                continue
            path = _join(current, component)
            kind = self.kind.get(path)
            if kind == _SYMLINK:
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    return path, "too many levels of symbolic links"
                link = self.target[path]
                if link.startswith("/"):
                    current = ""
                stack.extend(reversed(link.split("/")))
                continue
            if kind is not None and kind != _DIR and any(c not in ("", ".") for c in stack):
                return path, "not a directory"
            current = path
        return current, None


def _components(name: str) -> List[str]:
    return [c for c in name.split("/") if c and c != "."]


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The member's mtime in ns, clamped to what utimensat takes (the kernel clamps further
    to the file system's range). Non-finite PAX mtimes were rejected while parsing."""
    mtime = member.mtime
    if not isinstance(mtime, int):
        mtime = float(mtime)
        if not math.isfinite(mtime):  # a TarInfo made elsewhere
            return 0
    mtime = min(max(mtime, -_MAX_MTIME), _MAX_MTIME)
    return mtime * 1_000_000_000 if isinstance(mtime, int) else int(round(mtime * 1e9))


class _Planner:
    """Checks one layer's members against the tree and plans its operations; updates the tree."""

    def __init__(self, tree: _Tree, stats: Stats, label: str):
        self.tree, self.stats, self.label = tree, stats, label
        self.ops: List[tuple] = []

    def plan(self, members: Iterable[tarfile.TarInfo]) -> List[tuple]:
        entries, whiteouts = [], []
        for member in members:
            self.stats.members += 1
            if "\0" in member.name or "\0" in member.linkname:
                self.reject("NUL byte in a name", member)
            components = self._checked_components(member.name, member)
            if not components:
                self._root_entry(member)
            elif components[-1].startswith(_WHITEOUT):
                whiteouts.append((components, member))
            else:
                entries.append((components, member))
        # Whiteouts only hide lower layers (OCI image spec), never entries of their own
        # layer whatever the order, so they all go first.
        for components, member in whiteouts:
            self._whiteout(components, member)
        for components, member in entries:
            self._entry(components, member)
        return self.ops

    def reject(self, why: str, member: tarfile.TarInfo):
        name = member.name
        if member.issym() or member.islnk():
            name += f" -> {member.linkname}"
        name = ascii(name)[1:-1] if len(name) <= 300 else ascii(name[:300])[1:-1] + "..."
        raise LayerRejected(
            f"layer {self.label} rejected: {why}: {name}",
            "the image is damaged or malicious; nothing of it is used. "
            "Report it to its maintainer.")

    def _checked_components(self, name: str, member: tarfile.TarInfo, what: str = "path"
                            ) -> List[str]:
        components = _components(name)
        if ".." in components:
            self.reject(f"{what} with '..'", member)
        if len(name) > _NAME_MAX // 4:  # only long names can break the kernel's limits
            if len(os.fsencode(name)) >= _PATH_MAX:
                self.reject(f"{what} too long", member)
            if any(len(os.fsencode(c)) > _NAME_MAX for c in components):
                self.reject(f"file name too long in {what}", member)
        return components

    def _root_entry(self, member: tarfile.TarInfo) -> None:
        if not member.isdir():
            self.reject("the root must be a directory", member)
        self.tree.dir_meta[""] = (_dir_mode(member.mode), _mtime_ns(member))

    # -- whiteouts
    def _whiteout(self, components: List[str], member: tarfile.TarInfo) -> None:
        self.stats.whiteouts += 1
        marker = components[-1]
        if marker == _OPAQUE:
            parent = self._existing_dir(components[:-1], member)
            if parent is not None:
                for name in list(self.tree.children[parent]):
                    self._remove(parent, name)
            return
        if marker.startswith(_WHITEOUT + _WHITEOUT):  # other AUFS metadata: no meaning here
            _log.debug("layer %s: ignoring %s", self.label, member.name)
            return
        name = marker[len(_WHITEOUT):]
        if name in ("", ".", ".."):
            self.reject("invalid whiteout", member)
        parent = self._existing_dir(components[:-1], member)
        if parent is not None:
            self._remove(parent, name)

    def _existing_dir(self, components: List[str], member) -> Optional[str]:
        path, problem = self.tree.resolve(components)
        if problem == "too many levels of symbolic links":
            self.reject(problem, member)
        return path if problem is None and self.tree.kind.get(path) == _DIR else None

    def _remove(self, parent: str, name: str) -> None:
        kind = self.tree.remove(parent, name, _join(parent, name))
        if kind is None:
            return
        self.stats.removed += 1
        if kind != _DEVICE:
            self.ops.append((_OP_REMOVE, parent, name, kind == _DIR))

    # -- entries
    def _entry(self, components: List[str], member: tarfile.TarInfo) -> None:
        parent = self._parent_dir(components, member)
        name = components[-1]
        path = _join(parent, name)
        kind = member.type
        if kind == tarfile.DIRTYPE:
            self._directory(parent, name, path, member)
        elif member.isreg():
            self._file(parent, name, path, member)
        elif kind == tarfile.SYMTYPE:
            self._symlink(parent, name, path, member)
        elif kind == tarfile.LNKTYPE:
            self._hardlink(parent, name, path, member)
        elif kind == tarfile.FIFOTYPE:
            self._remove(parent, name)
            self.ops.append((_OP_FIFO, parent, name, self._mode(member), _mtime_ns(member)))
            self.tree.add(parent, name, path, _OTHER)
            self.stats.fifos += 1
        elif kind in _DEVICE_TYPES:
            self._remove(parent, name)
            self.tree.add(parent, name, path, _DEVICE)
            self.stats.devices_skipped += 1
        else:
            _log.debug("layer %s: skipping %s of tar type %r", self.label, member.name, kind)
            self.stats.other_skipped += 1

    def _parent_dir(self, components: List[str], member: tarfile.TarInfo) -> str:
        """Real directory for the member's parent, planning missing directories (0755)."""
        parent = "/".join(components[:-1])
        if self.tree.kind.get(parent) == _DIR:  # a key resolves to itself: the common case
            return parent
        parent, problem = self.tree.resolve(components[:-1])
        if problem is not None:
            self.reject(f"{problem} (/{parent})", member)
        if self.tree.kind.get(parent) == _DIR:
            return parent
        current = ""
        for name in parent.split("/"):
            path = _join(current, name)
            kind = self.tree.kind.get(path)
            if kind is None:
                self.ops.append((_OP_MKDIR, current, name))
                self.tree.add(current, name, path, _DIR)
                self.tree.dir_meta[path] = (0o755, None)
                self.stats.dirs += 1
            elif kind != _DIR:
                self.reject(f"not a directory (/{path})", member)
            current = path
        return current

    def _directory(self, parent: str, name: str, path: str, member: tarfile.TarInfo) -> None:
        meta = (_dir_mode(member.mode), _mtime_ns(member))
        if self.tree.kind.get(path) != _DIR:  # a directory merges, anything else is replaced
            self._remove(parent, name)
            self.ops.append((_OP_MKDIR, parent, name))
            self.tree.add(parent, name, path, _DIR)
            self.stats.dirs += 1
        self.tree.dir_meta[path] = meta

    def _file(self, parent: str, name: str, path: str, member: tarfile.TarInfo) -> None:
        self._remove(parent, name)
        sparse = member if member.sparse is not None else None
        self.ops.append((_OP_FILE, parent, name, member.offset_data, member.size,
                         self._mode(member), _mtime_ns(member), sparse))
        self.tree.add(parent, name, path, _FILE)
        self.stats.files += 1
        self.stats.bytes += _data_size(member.size, sparse)

    def _symlink(self, parent: str, name: str, path: str, member: tarfile.TarInfo) -> None:
        target = member.linkname
        if not target or "\0" in target or len(os.fsencode(target)) >= _PATH_MAX:
            self.reject("invalid symlink target", member)
        self._remove(parent, name)
        # the target is kept verbatim: it is resolved inside the rootfs at run time
        self.ops.append((_OP_SYMLINK, parent, name, target, _mtime_ns(member)))
        self.tree.add(parent, name, path, _SYMLINK, target)
        self.stats.symlinks += 1

    def _hardlink(self, parent: str, name: str, path: str, member: tarfile.TarInfo) -> None:
        components = self._checked_components(member.linkname, member, "hard link target")
        if not components:
            self.reject("hard link to the root directory", member)
        target_parent, problem = self.tree.resolve(components[:-1])
        target = _join(target_parent, components[-1])
        if target == path:  # a link to itself: the entry is already what it asks for
            return
        self._remove(parent, name)
        kind = self.tree.kind.get(target) if problem is None else None
        if kind is None:
            self.reject("hard link target not in the image", member)
        if kind == _DIR:
            self.reject("hard link to a directory", member)
        if kind == _DEVICE:
            self.tree.add(parent, name, path, _DEVICE)
            self.stats.devices_skipped += 1
            return
        self.ops.append((_OP_LINK, parent, name, target_parent, components[-1]))
        self.tree.add(parent, name, path, kind, self.tree.target.get(target))
        self.stats.hardlinks += 1

    def _mode(self, member: tarfile.TarInfo) -> int:
        mode = member.mode & 0o7777
        if mode & _SETID:
            self.stats.setid_stripped += 1
            mode &= ~_SETID
        return mode | 0o400


def _dir_mode(mode: int) -> int:
    return (mode & 0o7777) | 0o500


# -- step 3: act ------------------------------------------------------------------------------
class _Writer:
    """Runs plans. Every system call names one entry in a directory fd opened with
    O_NOFOLLOW from the root down, so no symlink is ever followed. At most _FD_CACHE
    directory fds stay open (least recently used closed first), whatever the depth."""

    def __init__(self, root_fd: int):
        self.root_fd = root_fd
        self.fds: "OrderedDict[str, int]" = OrderedDict()

    def dir_fd(self, path: str) -> int:
        if not path:
            return self.root_fd
        fd = self.fds.get(path)
        if fd is not None:
            self.fds.move_to_end(path)
            return fd
        missing = []  # walk up to the nearest open directory, then open down (no recursion)
        base = path
        while fd is None:
            base, _, name = base.rpartition("/")
            missing.append(name)
            fd = self.fds.get(base) if base else self.root_fd
        for index, name in enumerate(reversed(missing)):
            child = os.open(name, _O_DIR, dir_fd=fd)
            if index:  # an intermediate level opened here: only the last one is kept
                os.close(fd)
            fd = child
        self.fds[path] = fd
        while len(self.fds) > _FD_CACHE:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def _forget_fds(self, top: str) -> None:
        prefix = top + "/"
        for path in [p for p in self.fds if p == top or p.startswith(prefix)]:
            os.close(self.fds.pop(path))

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])
        os.close(self.root_fd)

    def apply(self, ops: List[tuple], layer: _LayerTar, budget: Optional[_Budget] = None) -> None:
        op = None
        try:
            for op in ops:
                code, parent, name = op[0], op[1], op[2]
                fd = self.dir_fd(parent)
                if code == _OP_FILE:
                    self._file(fd, op, layer)
                elif code == _OP_MKDIR:
                    os.mkdir(name, 0o700, dir_fd=fd)
                elif code == _OP_SYMLINK:
                    os.symlink(op[3], name, dir_fd=fd)
                    os.utime(name, ns=(op[4], op[4]), dir_fd=fd, follow_symlinks=False)
                elif code == _OP_REMOVE:
                    self._remove(fd, parent, name, op[3])
                elif code == _OP_LINK:
                    os.link(op[4], name, src_dir_fd=self.dir_fd(op[3]),
                            dst_dir_fd=self.dir_fd(parent), follow_symlinks=False)
                elif code == _OP_FIFO:
                    os.mkfifo(name, op[3], dir_fd=fd)
                    os.utime(name, ns=(op[4], op[4]), dir_fd=fd, follow_symlinks=False)
        except OSError as e:
            path = _join(op[1], op[2]) if op else ""
            if budget is not None:
                full = fsutil.no_space(e, budget.space_dir, _plan_space(ops)[0],
                                       f"unpack layer {layer.label}")
                if full is not None:
                    raise full from e
            raise StorageError(f"cannot unpack layer {layer.label}: {e.strerror}: /{path}",
                               "the node-local directory must be yours and writable "
                               "(UCTR_LOCAL_DIR); `uctr create` again once it is") from e

    def _file(self, dir_fd: int, op: tuple, layer: _LayerTar) -> None:
        _, _, name, offset, size, mode, mtime, sparse = op
        fd = os.open(name, _O_CREATE, mode, dir_fd=dir_fd)
        try:
            if sparse is not None:
                _copy_sparse(layer.fd, fd, offset, sparse.sparse, size)
            elif size:
                _copy_range(layer.fd, fd, offset, size)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)

    def _remove(self, dir_fd: int, parent: str, name: str, is_dir: bool) -> None:
        if not is_dir:
            os.unlink(name, dir_fd=dir_fd)
            return
        self._forget_fds(_join(parent, name))
        fsutil.remove_tree_at(dir_fd, name)

    def finish_dirs(self, tree: "_Tree") -> None:
        """Final directory modes and mtimes, children before parents (a 0500 directory
        still receives its children; a parent's mtime is set after they stopped changing).

        A post-order walk of the model holding one directory fd at a time: down by name
        (O_NOFOLLOW), back up through '..', checked to be the directory it came from, so
        depth costs neither open files nor repeated walks from the root."""
        while self.fds:  # the walk below is the last user of the tree
            os.close(self.fds.popitem()[1])
        fd = os.dup(self.root_fd)
        frames = [("", None, self._subdirs(tree, ""))]  # (path, (dev, ino) of parent, todo)
        try:
            while frames:
                path, parent_id, todo = frames[-1]
                if todo:
                    name = todo.pop()
                    child = os.open(name, _O_DIR, dir_fd=fd)
                    here = _identity(fd)
                    os.close(fd)
                    fd = child
                    child_path = _join(path, name)
                    frames.append((child_path, here, self._subdirs(tree, child_path)))
                    continue
                frames.pop()
                meta = tree.dir_meta.get(path)
                if meta is not None:
                    os.fchmod(fd, meta[0])
                    if meta[1] is not None:
                        os.utime(fd, ns=(meta[1], meta[1]))
                if frames:
                    up = os.open("..", _O_DIR, dir_fd=fd)
                    if _identity(up) != parent_id:
                        os.close(up)
                        raise OSError(errno.ESTALE, "directory moved during the unpack",
                                      "/" + path)
                    os.close(fd)
                    fd = up
        finally:
            os.close(fd)

    @staticmethod
    def _subdirs(tree: "_Tree", path: str) -> List[str]:
        return [name for name in tree.children.get(path, ())
                if tree.kind.get(_join(path, name)) == _DIR]


def _identity(fd: int) -> Tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _copy_range(src_fd: int, dst_fd: int, offset: int, size: int) -> None:
    """Copy in the kernel (sendfile), no Python buffers."""
    while size:
        sent = os.sendfile(dst_fd, src_fd, offset, size)
        if sent <= 0:
            raise OSError(5, "short read from the uncompressed layer")
        offset += sent
        size -= sent


def _copy_sparse(src_fd: int, dst_fd: int, offset: int, extents, size: int) -> None:
    """A sparse file: its extents are stored one after the other from OFFSET in the archive;
    each goes to its place in the file and the holes stay holes (ftruncate sets the size)."""
    for position, length in extents:
        if length:
            os.lseek(dst_fd, position, os.SEEK_SET)
            _copy_range(src_fd, dst_fd, offset, length)
            offset += length
    os.ftruncate(dst_fd, size)
