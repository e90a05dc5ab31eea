"""Read a glibc ld.so.cache without running ldconfig.

Both layouts are understood: the current one ("glibc-ld.so.cache1.1", string offsets from
the start of its header, with an optional extension area holding the generator string and
the glibc-hwcaps subdirectory names) and the old one ("ld.so-1.7.0", strings after the
entry table), alone or followed by a new-format part (the "compat" layout of glibc < 2.32).
Used for the host (/etc/ld.so.cache) and for an image (ROOTFS/etc/ld.so.cache); paths in an
image cache are relative to the image root, as ``ldconfig -r ROOT`` writes them.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import os
import struct
from dataclasses import dataclass

OLD_MAGIC = b"ld.so-1.7.0"
NEW_MAGIC = b"glibc-ld.so.cache1.1"
EXTENSION_MAGIC = 0xEAA42174
EXTENSION_TAG_GENERATOR = 0
EXTENSION_TAG_GLIBC_HWCAPS = 1
HWCAP_EXTENSION = 1 << 62  # entry.hwcap: low 32 bits index the glibc-hwcaps names

FLAG_TYPE_MASK = 0x00FF
FLAG_REQUIRED_MASK = 0xFF00

_TYPE_NAMES = {0: "libc4", 1: "ELF", 2: "libc5", 3: "libc6"}
# As ldconfig -p prints them (glibc elf/cache.c print_entry).
_REQUIRED_NAMES = {
    0x0000: "",
    0x0100: ",64bit",
    0x0200: ",IA-64",
    0x0300: ",x86-64",
    0x0400: ",64bit",
    0x0500: ",64bit",
    0x0600: ",N32",
    0x0700: ",64bit",
    0x0800: ",x32",
    0x0900: ",hard-float",
    0x0A00: ",AArch64",
    0x0B00: ",soft-float",
    0x0C00: ",nan2008",
    0x0D00: ",N32,nan2008",
    0x0E00: ",64bit,nan2008",
    0x0F00: ",soft-float",
    0x1000: ",double-float",
    0x1100: ",soft-float",
    0x1200: ",double-float",
}
# ELF machine name (elf.MACHINES) -> the cache's required-flag for that machine's default ABI.
MACHINE_FLAGS = {
    "x86-64": 0x0300,
    "aarch64": 0x0A00,
    "i386": 0x0000,
    "ppc64": 0x0500,
    "s390": 0x0400,
}

_OLD_HEADER = struct.Struct("<11sxI")  # magic (padded to 12), nlibs
_OLD_ENTRY = struct.Struct("<iII")  # flags, key, value
_NEW_HEADER = struct.Struct("<20sIIB3xI12x")  # magic+version, nlibs, len_strings, flags, ext
_NEW_ENTRY = struct.Struct("<iIIIQ")  # flags, key, value, osversion, hwcap


class LdCacheError(Exception):
    """The file is not an ld.so.cache this reader understands."""


@dataclass(frozen=True)
class CacheEntry:
    name: str  # the soname (or linker name) the loader looks up
    path: str  # absolute path, relative to the cache's root
    flags: int
    osversion: int = 0
    hwcap: int = 0
    hwcap_name: str | None = None  # glibc-hwcaps subdirectory, e.g. "x86-64-v3"

    @property
    def required(self) -> int:
        return self.flags & FLAG_REQUIRED_MASK

    def flags_text(self) -> str:
        """The parenthesised part of an ``ldconfig -p`` line."""
        text = _TYPE_NAMES.get(self.flags & FLAG_TYPE_MASK, "unknown")
        req = self.required
        text += _REQUIRED_NAMES.get(req, ",%d" % req)
        if self.hwcap_name is not None:
            text += ', hwcap: "%s"' % self.hwcap_name
        elif self.hwcap:
            text += ", hwcap: 0x%016x" % self.hwcap
        return text

    def line(self) -> str:
        """This entry formatted as ``ldconfig -p`` prints it (without the leading tab)."""
        return "%s (%s) => %s" % (self.name, self.flags_text(), self.path)


class LdCache:
    def __init__(self, entries: list[CacheEntry], generator: str | None = None):
        self.entries = entries
        self.generator = generator
        self._by_name: dict[str, list[CacheEntry]] = {}
        for e in entries:
            self._by_name.setdefault(e.name, []).append(e)

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, name: str, machine: str | None = None) -> list[CacheEntry]:
        """Entries for exactly this name, in cache (= loader preference) order; with
        machine, only entries for that machine's ABI and not in a glibc-hwcaps subdir."""
        found = self._by_name.get(name, [])
        if machine is None:
            return list(found)
        return [e for e in found if _for_machine(e, machine)]

    def matching(self, predicate, machine: str | None = None) -> list[CacheEntry]:
        return [
            e
            for e in self.entries
            if predicate(e.name) and (machine is None or _for_machine(e, machine))
        ]


def _for_machine(entry: CacheEntry, machine: str) -> bool:
    if entry.hwcap_name is not None or entry.hwcap:
        return False
    wanted = MACHINE_FLAGS.get(machine)
    return wanted is None or entry.required == wanted


def _cstring(data: bytes, offset: int) -> str:
    if not 0 <= offset < len(data):
        raise LdCacheError("string offset %d out of range" % offset)
    end = data.find(b"\0", offset)
    return data[offset : end if end >= 0 else len(data)].decode("utf-8", "surrogateescape")


def parse(data: bytes) -> LdCache:
    """Parse the bytes of an ld.so.cache file."""
    if data.startswith(NEW_MAGIC):
        return _parse_new(data, 0)
    if not data.startswith(OLD_MAGIC):
        raise LdCacheError("unknown ld.so.cache format")
    if len(data) < _OLD_HEADER.size:
        raise LdCacheError("truncated ld.so.cache")
    _magic, nlibs = _OLD_HEADER.unpack_from(data, 0)
    end = _OLD_HEADER.size + nlibs * _OLD_ENTRY.size
    if end > len(data):
        raise LdCacheError("truncated ld.so.cache")
    # The compat layout puts a complete new-format cache after the old table, aligned like
    # struct cache_file_new (8 bytes); prefer it, as the loader does.
    new_start = (end + 7) & ~7
    if data[new_start : new_start + len(NEW_MAGIC)] == NEW_MAGIC:
        return _parse_new(data, new_start)
    strings = data[end:]
    entries = []
    for i in range(nlibs):
        flags, key, value = _OLD_ENTRY.unpack_from(data, _OLD_HEADER.size + i * _OLD_ENTRY.size)
        entries.append(CacheEntry(_cstring(strings, key), _cstring(strings, value), flags))
    return LdCache(entries)


def _parse_new(data: bytes, start: int) -> LdCache:
    base = data[start:]
    if len(base) < _NEW_HEADER.size:
        raise LdCacheError("truncated ld.so.cache")
    _magic, nlibs, _len_strings, flags, ext_offset = _NEW_HEADER.unpack_from(base, 0)
    if flags & 3 == 3:
        raise LdCacheError("big-endian ld.so.cache is not supported")
    if _NEW_HEADER.size + nlibs * _NEW_ENTRY.size > len(base):
        raise LdCacheError("truncated ld.so.cache")
    generator, hwcaps = _extensions(data, ext_offset, base)
    entries = []
    for i in range(nlibs):
        eflags, key, value, osversion, hwcap = _NEW_ENTRY.unpack_from(
            base, _NEW_HEADER.size + i * _NEW_ENTRY.size
        )
        hwcap_name = None
        if hwcap & HWCAP_EXTENSION:
            index = hwcap & 0xFFFFFFFF
            hwcap_name = hwcaps[index] if index < len(hwcaps) else "?"
        entries.append(
            CacheEntry(
                _cstring(base, key), _cstring(base, value), eflags, osversion, hwcap, hwcap_name
            )
        )
    return LdCache(entries, generator)


def _extensions(data: bytes, offset: int, strings: bytes) -> tuple[str | None, list[str]]:
    """struct cache_extension {u32 magic, u32 count, {u32 tag, u32 flags, u32 offset,
    u32 size} sections[]}. The extension and section offsets count from the start of the
    file (glibc's cache_extension_load takes the file base); the hwcaps name offsets index
    the string table, like the entry keys."""
    generator = None
    hwcaps: list[str] = []
    if not offset or offset + 8 > len(data):
        return generator, hwcaps
    magic, count = struct.unpack_from("<II", data, offset)
    if magic != EXTENSION_MAGIC:
        return generator, hwcaps
    for i in range(min(count, 64)):
        pos = offset + 8 + i * 16
        if pos + 16 > len(data):
            break
        tag, _flags, soff, size = struct.unpack_from("<IIII", data, pos)
        if soff + size > len(data):
            continue
        if tag == EXTENSION_TAG_GENERATOR:
            generator = data[soff : soff + size].decode("utf-8", "replace")
        elif tag == EXTENSION_TAG_GLIBC_HWCAPS:
            for j in range(size // 4):
                (name_off,) = struct.unpack_from("<I", data, soff + 4 * j)
                hwcaps.append(_cstring(strings, name_off))
    return generator, hwcaps


def read(path: str) -> LdCache:
    """Parse the cache file at path (OSError if it cannot be read)."""
    with open(path, "rb") as f:
        return parse(f.read())


def load_root(root: str = "/") -> LdCache | None:
    """The cache of the system rooted at root, or None when it has none or it is unreadable.
    ROOT/etc/ld.so.cache is read as a plain file: a symlink there is not followed out of root."""
    path = os.path.join(root, "etc/ld.so.cache")
    if os.path.islink(path):
        return None
    try:
        return read(path)
    except (OSError, LdCacheError):
        return None
