"""Shared libraries of one root (the host, or an image rootfs), as the dynamic loader sees them.

Lookup order follows the loader: the object's RPATH/RUNPATH (with $ORIGIN), then the root's
ld.so.cache, then the default directories. Also here: ABI numbers from file names, the glibc
of a root, and the symbol-version check of a host library against an image.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import glob
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from uctr_batch.inject import elf, fsroot, ldcache

# Libraries that belong to glibc itself: never injected, always the image's own.
GLIBC_LIBS = frozenset(
    [
        "libc.so.6",
        "libm.so.6",
        "libmvec.so.1",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
        "libresolv.so.2",
        "libutil.so.1",
        "libanl.so.1",
        "libnsl.so.1",
        "libBrokenLocale.so.1",
        "libthread_db.so.1",
        "libc_malloc_debug.so.0",
        "libmemusage.so",
        "libpcprofile.so",
    ]
)

_TRIPLETS = {
    "x86-64": "x86_64-linux-gnu",
    "aarch64": "aarch64-linux-gnu",
    "ppc64": "powerpc64le-linux-gnu",
}
_UNAME = {
    "x86_64": "x86-64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "ppc64le": "ppc64",
    "i686": "i386",
}
_SONAME_STYLE = re.compile(r"^(lib.+\.so)\.(\d+)$")
_LIBC_FILE = re.compile(r"^libc-(\d+(?:\.\d+)+)\.so$")


def is_glibc_lib(name: str) -> bool:
    return name in GLIBC_LIBS or name.startswith(("ld-linux", "ld64.so", "libnss_"))


def host_machine() -> str:
    m = os.uname().machine
    return _UNAME.get(m, m)


def linker_name(name: str) -> str:
    """'libmpi.so.40.30.4' -> 'libmpi.so'; a name without '.so' is returned as is."""
    i = name.find(".so")
    return name[: i + 3] if i >= 0 else name


def stem(name: str) -> str:
    """'libmpi.so.40' -> 'libmpi'."""
    return linker_name(name)[:-3] if ".so" in name else name


def so_version(name: str) -> tuple[int, ...]:
    """The numbers after '.so.': 'libmpi.so.40.30.4' -> (40, 30, 4); none -> ()."""
    i = name.find(".so.")
    if i < 0:
        return ()
    out = []
    for part in name[i + 4 :].split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def vtext(version: Sequence[int]) -> str:
    return ".".join(str(v) for v in version) if version else "(none)"


@dataclass(frozen=True)
class Lib:
    name: str  # the name the loader looks up (a soname), e.g. libmpi.so.40
    path: str  # where it was found, inside its root (may be a symlink)
    real: str  # the resolved file, inside its root
    version: tuple[int, ...]  # ABI numbers (Sarus' rule: the real file's, unless renamed)


def abi_version(name: str, real: str) -> tuple[int, ...]:
    """ABI numbers from the real file behind the symlinks. When the target has a different
    name (Cray: libmpi.so.12 -> libmpich_gnu_71.so.3), the link's own numbers win."""
    base = posixpath.basename(real)
    if base.startswith(linker_name(name) + "."):
        return so_version(base) or so_version(name)
    return so_version(name)


@dataclass(frozen=True)
class Glibc:
    path: str  # libc.so.6, resolved, inside its root
    version: tuple[int, ...]


class LibRoot:
    """Library lookup inside one root directory."""

    def __init__(
        self, root: str = "/", machine: str | None = None, library_path: Sequence[str] = ()
    ):
        self.root = root
        self.machine = machine or host_machine()
        self.library_path = list(library_path)  # searched like LD_LIBRARY_PATH
        self.cache = ldcache.load_root(root)
        self._elf: dict[str, elf.ElfInfo | None] = {}

    # -- paths ----------------------------------------------------------------------------

    def outside(self, inside: str) -> str:
        return fsroot.outside(self.root, inside)

    def resolve(self, inside: str) -> str:
        return fsroot.resolve(self.root, inside)

    def exists(self, inside: str) -> bool:
        return os.path.exists(self.outside(self.resolve(inside)))

    def lib(self, name: str, path: str) -> Lib:
        real = self.resolve(path)
        return Lib(name, path, real, abi_version(name, real))

    def elf(self, inside: str) -> elf.ElfInfo | None:
        """ELF facts of the file at inside (resolved), or None if it is not a readable ELF."""
        real = self.resolve(inside)
        if real not in self._elf:
            try:
                self._elf[real] = elf.read_elf(self.outside(real))
            except elf.ElfError:
                self._elf[real] = None
        return self._elf[real]

    def _usable(self, inside: str) -> bool:
        info = self.elf(inside)
        return info is not None and info.arch == self.machine

    # -- lookup ---------------------------------------------------------------------------

    def default_dirs(self) -> list[str]:
        triplet = _TRIPLETS.get(self.machine)
        dirs = []
        if triplet:
            dirs += ["/lib/" + triplet, "/usr/lib/" + triplet]
        return dirs + ["/lib64", "/usr/lib64", "/lib", "/usr/lib"]

    def find(
        self, name: str, runpath: Iterable[str] = (), origin: str | None = None
    ) -> Lib | None:
        """Find name as the loader would: runpath dirs, library_path, the cache, the default
        dirs."""
        for d in list(runpath) + self.library_path:
            if origin is not None:
                d = d.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
            if d.startswith("/"):
                candidate = posixpath.join(d, name)
                if self.exists(candidate) and self._usable(candidate):
                    return self.lib(name, candidate)
        if self.cache is not None:
            for entry in self.cache.lookup(name, self.machine):
                if self.exists(entry.path):
                    return self.lib(name, entry.path)
        for d in self.default_dirs():
            candidate = posixpath.join(d, name)
            if self.exists(candidate) and self._usable(candidate):
                return self.lib(name, candidate)
        return None

    def find_needed(self, owner: Lib, name: str) -> Lib | None:
        """Resolve a DT_NEEDED name of owner, honouring owner's RPATH/RUNPATH."""
        info = self.elf(owner.real)
        runpath = (info.rpath + info.runpath) if info else ()
        return self.find(name, runpath, posixpath.dirname(owner.real))

    def cached(self, predicate) -> list[Lib]:
        """Cache entries (this machine, no hwcaps variants) whose name passes predicate."""
        if self.cache is None:
            return []
        out = []
        for entry in self.cache.matching(predicate, self.machine):
            if self.exists(entry.path):
                out.append(self.lib(entry.name, entry.path))
        return out

    def sonames_in(self, directory: str, predicate=lambda n: True) -> list[Lib]:
        """Soname-style names (libX.so.N) in one directory of this root."""
        real_dir = self.resolve(directory)
        try:
            names = sorted(os.listdir(self.outside(real_dir)))
        except OSError:
            return []
        out = []
        for n in names:
            if _SONAME_STYLE.match(n) and predicate(n):
                path = posixpath.join(real_dir, n)
                if self.exists(path) and self._usable(path):
                    out.append(self.lib(n, path))
        return out

    # -- libc -----------------------------------------------------------------------------

    def glibc(self) -> Glibc | None:
        lib = self.find("libc.so.6")
        if lib is None:
            return None
        info = self.elf(lib.real)
        version = info.glibc_defined() if info else None
        if version is None:
            m = _LIBC_FILE.match(posixpath.basename(lib.real))
            version = tuple(int(p) for p in m.group(1).split(".")) if m else None
        if version is None:
            return None
        return Glibc(lib.real, version)

    def musl_loader(self) -> str | None:
        for pattern in ("lib/ld-musl-*.so.1", "usr/lib/ld-musl-*.so.1"):
            found = glob.glob(os.path.join(self.outside("/"), pattern))
            if found:
                return "/" + os.path.relpath(found[0], self.outside("/"))
        return None


def version_problems(
    host: LibRoot, lib: Lib, image: LibRoot, glibc: Glibc, provided: Iterable[str] = ()
) -> list[str]:
    """Why the host library lib cannot run in image: each symbol version it needs (ELF
    verneed) from a library the image supplies must be defined there (verdef). Libraries in
    `provided` come from the host too and are not checked against the image."""
    info = host.elf(lib.real)
    if info is None:
        return ["%s is not a readable ELF library" % lib.real]
    if info.arch != image.machine:
        return ["%s is built for %s, the image for %s" % (lib.real, info.arch, image.machine)]
    provided = set(provided)
    problems = []
    for file, versions in sorted(info.verneed.items()):
        if file in provided:
            continue
        provider = image.find(file)
        if provider is None:
            if is_glibc_lib(file):
                problems.append("needs %s, which the image lacks" % file)
            continue  # a missing non-glibc library is the closure's business
        pinfo = image.elf(provider.real)
        defined = set(pinfo.verdef) if pinfo else set()
        missing = [v for v in versions if v not in defined]
        if not missing:
            continue
        glibc_missing = [v for v in missing if elf.glibc_version(v)]
        if glibc_missing:
            need = max(glibc_missing, key=lambda v: elf.glibc_version(v))
            problems.append(
                "needs %s (from %s); the image's glibc is %s" % (need, file, vtext(glibc.version))
            )
        others = [v for v in missing if not elf.glibc_version(v)]
        if others:
            problems.append(
                "needs %s from %s; the image's %s does not define it"
                % (", ".join(others), file, file)
            )
    return problems
