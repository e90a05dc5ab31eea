"""Hand-built layer tars with exact member names (the harness LayerBuilder normalises names,
the malicious corpus must not), plus helpers to unpack them and look at the result."""

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from uctr_batch.image import manifest
from uctr_batch.image.flatten import Stats, unpack_layers

MTIME = 1_600_000_000


def _info(name: str, kind: bytes, mode: int, mtime: int = MTIME) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, mtime
    return info


def reg(name: str, data: bytes = b"", mode: int = 0o644, mtime: int = MTIME):
    info = _info(name, tarfile.REGTYPE, mode, mtime)
    info.size = len(data)
    return info, data


def dir_(name: str, mode: int = 0o755, mtime: int = MTIME):
    return _info(name, tarfile.DIRTYPE, mode, mtime), None


def sym(name: str, target: str, mtime: int = MTIME):
    info = _info(name, tarfile.SYMTYPE, 0o777, mtime)
    info.linkname = target
    return info, None


def hard(name: str, target: str):
    info = _info(name, tarfile.LNKTYPE, 0o644)
    info.linkname = target
    return info, None


def fifo(name: str, mode: int = 0o644):
    return _info(name, tarfile.FIFOTYPE, mode), None


def dev(name: str, kind: bytes = tarfile.CHRTYPE, major: int = 1, minor: int = 3):
    info = _info(name, kind, 0o666)
    info.devmajor, info.devminor = major, minor
    return info, None


def tar(*members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as out:
        for info, data in members:
            out.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        import zstandard
        return zstandard.ZstdCompressor().compress(data)
    return data


MEDIA = {"gzip": manifest.OCI_LAYER_GZIP, "zstd": manifest.OCI_LAYER_ZSTD,
         "none": manifest.OCI_LAYER_TAR}


def layer_for(blob: bytes, compression: str = "gzip",
              digest: Optional[str] = None) -> manifest.Layer:
    digest = digest or "sha256:" + hashlib.sha256(blob).hexdigest()
    return manifest.Layer(digest, MEDIA[compression], len(blob))


class Unpacker:
    """Writes blobs under WORK/blobs and unpacks them into WORK/bundle/rootfs."""

    def __init__(self, work: Path):
        self.work = Path(work)
        self.blobs = self.work / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.dest = self.work / "bundle" / "rootfs"
        self.count = 0

    def blob(self, tar_bytes: bytes, compression: str = "gzip", digest: Optional[str] = None,
             raw: Optional[bytes] = None) -> Tuple[Path, manifest.Layer]:
        data = raw if raw is not None else compress(tar_bytes, compression)
        self.count += 1
        path = self.blobs / f"layer{self.count}"
        path.write_bytes(data)
        return path, layer_for(data, compression, digest)

    def __call__(self, *layers: bytes, compression: str = "gzip") -> Stats:
        return self.unpack([self.blob(t, compression) for t in layers])

    def unpack(self, inputs: Sequence[Tuple[Path, Optional[manifest.Layer]]]) -> Stats:
        self.dest.mkdir(parents=True, exist_ok=True)
        return unpack_layers(list(inputs), self.dest)


def snapshot(root: Path) -> Dict[str, Tuple]:
    """relative path -> (type letter, permission bits, content / link target)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    extra = f.read()
                found[rel] = ("f", stat.S_IMODE(st.st_mode), extra)
            elif stat.S_ISLNK(st.st_mode):
                found[rel] = ("l", None, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("d", stat.S_IMODE(st.st_mode), None)
            elif stat.S_ISFIFO(st.st_mode):
                found[rel] = ("p", stat.S_IMODE(st.st_mode), None)
            else:
                found[rel] = ("?", stat.S_IMODE(st.st_mode), None)
    return found


def names(root: Path) -> List[str]:
    return sorted(snapshot(root))


# -- raw headers (values tarfile would never write itself) ---------------------------------------
def pax_record(keyword: str, value) -> bytes:
    """One PAX record, "<len> keyword=value\\n", with VALUE as given (str or bytes)."""
    body = b" " + keyword.encode() + b"=" + (value if isinstance(value, bytes) else value.encode())
    body += b"\n"
    length = len(body)
    while length != len(body) + len(str(length)):  # the length counts its own digits
        length = len(body) + len(str(length))
    return str(length).encode() + body


def _header(name: bytes, kind: bytes, size: int, mode: int = 0o644, mtime: int = MTIME,
            linkname: bytes = b"") -> bytes:
    info = tarfile.TarInfo("x")
    info.type, info.size, info.mode, info.mtime = kind, size, mode, mtime
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))  # base-256 for huge sizes
    block[0:100] = name[:100].ljust(100, b"\0")
    block[157:257] = linkname[:100].ljust(100, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def raw_member(name: bytes, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
               pax: bytes = b"", linkname: bytes = b"", size: Optional[int] = None,
               mode: int = 0o644) -> bytes:
    """A member with an optional PAX header made of the raw records PAX, exactly as given."""
    out = b""
    if pax:
        out += _header(b"PaxHeaders/x", tarfile.XHDTYPE, len(pax)) + _padded(pax)
    out += _header(name, kind, len(data) if size is None else size, mode, linkname=linkname)
    return out + _padded(data)


def raw_tar(*members: bytes) -> bytes:
    return b"".join(members) + b"\0" * (2 * tarfile.BLOCKSIZE)
