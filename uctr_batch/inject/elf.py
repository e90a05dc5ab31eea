"""A small ELF reader: just what library injection needs.

Reads the header, the program headers and the dynamic section (DT_NEEDED, DT_SONAME,
DT_RUNPATH/DT_RPATH) plus the GNU symbol-version tables: verneed (.gnu.version_r: which
versions, e.g. GLIBC_2.34, this object needs from which file) and verdef (.gnu.version_d:
which versions it defines). Dynamic-section addresses are mapped to file offsets through
the PT_LOAD segments, so stripped section headers do not matter. Only the bytes needed are
read, never the whole file.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import io
import re
import struct
from dataclasses import dataclass, field

ELFMAG = b"\x7fELF"

ET_EXEC = 2
ET_DYN = 3

PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3

DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_STRSZ = 10
DT_SONAME = 14
DT_RPATH = 15
DT_RUNPATH = 29
DT_VERDEF = 0x6FFFFFFC
DT_VERDEFNUM = 0x6FFFFFFD
DT_VERNEED = 0x6FFFFFFE
DT_VERNEEDNUM = 0x6FFFFFFF

VER_FLG_BASE = 0x1

MACHINES = {
    3: "i386",
    8: "mips",
    20: "ppc",
    21: "ppc64",
    22: "s390",
    40: "arm",
    62: "x86-64",
    183: "aarch64",
    243: "riscv",
    258: "loongarch",
}

# Safety bounds: a corrupt file must not make us loop or allocate without end.
_MAX_CHAIN = 4096
_MAX_STRTAB = 64 * 1024 * 1024

_GLIBC_VERSION = re.compile(r"^GLIBC_(\d+(?:\.\d+)*)$")


class ElfError(Exception):
    """Not an ELF file, or one too damaged to read."""


@dataclass(frozen=True)
class ElfInfo:
    path: str
    elf_class: int  # 32 or 64
    little_endian: bool
    machine: int
    type: int
    interp: str | None = None
    dynamic: bool = False
    soname: str | None = None
    needed: tuple[str, ...] = ()
    runpath: tuple[str, ...] = ()
    rpath: tuple[str, ...] = ()
    verneed: dict[str, tuple[str, ...]] = field(default_factory=dict)  # file -> versions
    verdef: tuple[str, ...] = ()  # defined version names, the base (file) entry excluded

    @property
    def arch(self) -> str:
        """Machine name as ldconfig and uname spell it (x86-64, aarch64, ...)."""
        return MACHINES.get(self.machine, "machine-%d" % self.machine)

    @property
    def is_static(self) -> bool:
        """A statically linked executable: no interpreter and no dynamic section."""
        return self.interp is None and not self.dynamic

    def glibc_needed(self) -> tuple[int, ...] | None:
        """The highest GLIBC_x.y this object needs from any file, or None."""
        best = None
        for versions in self.verneed.values():
            for name in versions:
                v = glibc_version(name)
                if v is not None and (best is None or v > best):
                    best = v
        return best

    def glibc_defined(self) -> tuple[int, ...] | None:
        """The highest GLIBC_x.y this object defines (set for a glibc libc.so.6)."""
        found = [v for v in (glibc_version(n) for n in self.verdef) if v is not None]
        return max(found) if found else None


def glibc_version(name: str) -> tuple[int, ...] | None:
    """'GLIBC_2.36' -> (2, 36); GLIBC_PRIVATE and other names -> None."""
    m = _GLIBC_VERSION.match(name)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def version_text(v: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in v)


class _Reader:
    """Seek-and-unpack access to one open ELF file."""

    def __init__(self, f: io.BufferedIOBase, path: str):
        self.f = f
        self.path = path
        ident = self._read(0, 16)
        if ident[:4] != ELFMAG:
            raise ElfError("not an ELF file: %s" % path)
        if ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise ElfError("unknown ELF class or byte order: %s" % path)
        self.is64 = ident[4] == 2
        self.end = "<" if ident[5] == 1 else ">"
        self.loads: list[tuple[int, int, int]] = []  # (vaddr, filesz, offset)

    def _read(self, offset: int, size: int) -> bytes:
        self.f.seek(offset)
        data = self.f.read(size)
        if len(data) != size:
            raise ElfError("truncated ELF file: %s" % self.path)
        return data

    def unpack(self, fmt: str, offset: int) -> tuple:
        fmt = self.end + fmt
        return struct.unpack(fmt, self._read(offset, struct.calcsize(fmt)))

    def offset_of(self, vaddr: int) -> int:
        for start, size, off in self.loads:
            if start <= vaddr < start + size:
                return vaddr - start + off
        raise ElfError("address 0x%x outside the loaded segments: %s" % (vaddr, self.path))

    def cstring(self, table: bytes, index: int) -> str:
        if index >= len(table):
            raise ElfError("string index out of range: %s" % self.path)
        end = table.find(b"\0", index)
        return table[index : end if end >= 0 else len(table)].decode("utf-8", "replace")


def read_elf(path: str) -> ElfInfo:
    """Parse path; raise ElfError if it is not a readable ELF object."""
    try:
        with open(path, "rb") as f:
            return _parse(_Reader(f, path))
    except (OSError, struct.error) as e:
        raise ElfError("cannot read %s: %s" % (path, e)) from e


def is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELFMAG
    except OSError:
        return False


def _parse(r: _Reader) -> ElfInfo:
    if r.is64:
        e_type, e_machine, _v, _entry, e_phoff, _sh, _fl, _eh, e_phentsize, e_phnum = r.unpack(
            "HHIQQQIHHH", 16
        )
    else:
        e_type, e_machine, _v, _entry, e_phoff, _sh, _fl, _eh, e_phentsize, e_phnum = r.unpack(
            "HHIIIIIHHH", 16
        )
    interp = None
    dyn = None  # (offset, size)
    for i in range(min(e_phnum, _MAX_CHAIN)):
        base = e_phoff + i * e_phentsize
        if r.is64:
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = r.unpack("IIQQQQ", base)
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz = r.unpack("IIIII", base)
        if p_type == PT_LOAD:
            r.loads.append((p_vaddr, p_filesz, p_offset))
        elif p_type == PT_DYNAMIC:
            dyn = (p_offset, p_filesz)
        elif p_type == PT_INTERP:
            interp = r._read(p_offset, p_filesz).split(b"\0", 1)[0].decode("utf-8", "replace")
    info = dict(
        path=r.path,
        elf_class=64 if r.is64 else 32,
        little_endian=r.end == "<",
        machine=e_machine,
        type=e_type,
        interp=interp,
    )
    if dyn is None:
        return ElfInfo(**info)
    info.update(_parse_dynamic(r, *dyn))
    return ElfInfo(dynamic=True, **info)


def _dynamic_entries(r: _Reader, offset: int, size: int) -> list[tuple[int, int]]:
    entsize = 16 if r.is64 else 8
    fmt = "qQ" if r.is64 else "iI"
    count = min(size // entsize, _MAX_CHAIN)
    raw = r._read(offset, count * entsize)
    out = []
    for i in range(count):
        tag, val = struct.unpack_from(r.end + fmt, raw, i * entsize)
        if tag == DT_NULL:
            break
        out.append((tag, val))
    return out


def _parse_dynamic(r: _Reader, offset: int, size: int) -> dict:
    entries = _dynamic_entries(r, offset, size)
    tags: dict[int, int] = {}
    for tag, val in entries:
        tags.setdefault(tag, val)
    if DT_STRTAB not in tags:
        return {}
    strsz = min(tags.get(DT_STRSZ, 0), _MAX_STRTAB)
    strtab = r._read(r.offset_of(tags[DT_STRTAB]), strsz)

    def strings(wanted: int) -> list[str]:
        return [r.cstring(strtab, v) for t, v in entries if t == wanted]

    soname = strings(DT_SONAME)
    out = dict(
        soname=soname[0] if soname else None,
        needed=tuple(strings(DT_NEEDED)),
        runpath=tuple(p for s in strings(DT_RUNPATH) for p in s.split(":") if p),
        rpath=tuple(p for s in strings(DT_RPATH) for p in s.split(":") if p),
    )
    if DT_VERNEED in tags:
        out["verneed"] = _verneed(
            r, strtab, r.offset_of(tags[DT_VERNEED]), tags.get(DT_VERNEEDNUM, 0)
        )
    if DT_VERDEF in tags:
        out["verdef"] = _verdef(r, strtab, r.offset_of(tags[DT_VERDEF]), tags.get(DT_VERDEFNUM, 0))
    return out


def _verneed(r: _Reader, strtab: bytes, offset: int, count: int) -> dict[str, tuple[str, ...]]:
    """Elf_Verneed {u16 version, u16 cnt, u32 file, u32 aux, u32 next} chained with
    Elf_Vernaux {u32 hash, u16 flags, u16 other, u32 name, u32 next}; same in 32 and 64 bit."""
    result: dict[str, tuple[str, ...]] = {}
    for _ in range(min(count, _MAX_CHAIN)):
        _ver, cnt, vn_file, vn_aux, vn_next = r.unpack("HHIII", offset)
        names = []
        aux = offset + vn_aux
        for _ in range(min(cnt, _MAX_CHAIN)):
            _hash, _flags, _other, vna_name, vna_next = r.unpack("IHHII", aux)
            names.append(r.cstring(strtab, vna_name))
            if not vna_next:
                break
            aux += vna_next
        file = r.cstring(strtab, vn_file)
        result[file] = tuple(result.get(file, ())) + tuple(names)
        if not vn_next:
            break
        offset += vn_next
    return result


def _verdef(r: _Reader, strtab: bytes, offset: int, count: int) -> tuple[str, ...]:
    """Elf_Verdef {u16 version, u16 flags, u16 ndx, u16 cnt, u32 hash, u32 aux, u32 next};
    the first Elf_Verdaux {u32 name, u32 next} names the version, the rest are parents."""
    names = []
    for _ in range(min(count, _MAX_CHAIN)):
        _ver, flags, _ndx, _cnt, _hash, vd_aux, vd_next = r.unpack("HHHHIII", offset)
        (vda_name,) = r.unpack("I", offset + vd_aux)
        if not flags & VER_FLG_BASE:
            names.append(r.cstring(strtab, vda_name))
        if not vd_next:
            break
        offset += vd_next
    return tuple(names)
