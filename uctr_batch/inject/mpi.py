"""Host MPI injection, bind model.

Given a host root, an image rootfs and an MPI profile, decide which host MPI and fabric
libraries go into the container and where; every decision lands in the plan's manifest.

Rules (Sarus' ABI checker, plus what none of the peers does):
- the image's MPI is found from its ld.so.cache, else from DT_NEEDED of the application
  (or of the image's mpi4py extension);
- same family (mpich-abi | openmpi); name + SONAME major equal; the profile's minor rule:
  ``major`` (no more), ``full`` (host minor >= image minor, else "partial" warning and carry
  on), ``strict`` (minor equal). ABI numbers come from the real file behind the symlinks;
- every injected library's ELF version needs (GLIBC_x.y, GLIBCXX_..., ...) must be defined by
  the image's copy of the providing library;
- every DT_NEEDED of an injected library must be met by the image, or is injected from the
  host too (never glibc itself);
- compatible host libraries are bound over the image's file; ones the image lacks go to
  /.uctr/lib, first on LD_LIBRARY_PATH;
- fallback ladder: full swap -> fabric/dependency libraries only -> image MPI untouched;
- musl and static images get nothing, with the reason in the plan.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import filecmp
import glob
import os
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from uctr_batch.errors import ConfigError
from uctr_batch.inject import policyview
from uctr_batch.inject.libroot import (
    Glibc,
    Lib,
    LibRoot,
    is_glibc_lib,
    so_version,
    stem,
    version_problems,
    vtext,
)
from uctr_batch.inject.plan import INFO, LIB_DIR, REFUSE, STEP, InjectionPlan

C = "mpi"  # manifest component

OPENMPI = "openmpi"
MPICH_ABI = "mpich-abi"
FAMILIES = (OPENMPI, MPICH_ABI)

RULE_MAJOR = "major"
RULE_FULL = "full"
RULE_STRICT = "strict"
RULES = (RULE_MAJOR, RULE_FULL, RULE_STRICT)
DEFAULT_RULE = RULE_FULL

LEVEL_FULL = "full"
LEVEL_FABRIC = "fabric"
LEVEL_NONE = "none"

# Fabric and runtime libraries a host MPI brings along (matched on the name before ".so").
DEFAULT_DEPENDENCIES = (
    "libfabric",
    "libucp",
    "libucs",
    "libuct",
    "libucm",
    "libibverbs",
    "librdmacm",
    "libmlx5",
    "libefa",
    "libpmix",
    "libpmi",
    "libpmi2",
    "libpals",
    "libcxi",
    "libxpmem",
    "libpsm2",
    "libhcoll",
)

# Plugin directories that a library loads from a path compiled into it; they travel with the
# library, bound at the same path. Searched next to the real file and in its RUNPATH.
PLUGIN_DIRS = {
    "libmpi": ("openmpi", "openmpi[0-9]*"),
    "libopen-pal": ("openmpi", "openmpi[0-9]*"),
    "libopen-rte": ("openmpi", "openmpi[0-9]*"),
    "libpmix": ("pmix",),
    "libfabric": ("libfabric",),
    "libucs": ("ucx",),
    "libibverbs": ("libibverbs",),
}
CONFIG_DIRS = {"libibverbs": ("/etc/libibverbs.d",)}

_MPICH_ALIASES = {"libmpich": "libmpi", "libmpichcxx": "libmpicxx", "libmpichfort": "libmpifort"}
_OPENMPI_STEMS = ("libmpi", "libopen-pal", "libopen-rte", "liboshmem", "libompitrace")
_OPENMPI_PREFIXES = ("libmpi_", "libmca_common_")
# MPICH-ABI libraries all carry major 12 (libmpi, libmpicxx, libmpifort and MPICH's libmpich*
# names, Cray's libmpi_gnu_NN); libmpl/libopa are MPICH's own helpers.
_MPICH_ABI_STEMS = ("libmpi", "libmpich", "libmpicxx", "libmpichcxx", "libmpifort", "libmpichfort")
_MPICH_PREFIXES = ("libmpi_", "libmpich_", "libmpifort_")
_MPICH_HELPERS = ("libmpl", "libopa")

_MPI4PY_GLOBS = (
    "usr/lib/python3*/*-packages/mpi4py/MPI*.so",
    "usr/local/lib/python3*/*-packages/mpi4py/MPI*.so",
    "usr/lib64/python3*/*-packages/mpi4py/MPI*.so",
    "opt/conda/lib/python3*/site-packages/mpi4py/MPI*.so",
)


# -- families and the ABI rule ----------------------------------------------------------------


def is_core(name: str, family: str) -> bool:
    """Is name one of the MPI implementation's own libraries (swapped as one unit)?"""
    s = stem(name)
    major = so_version(name)[:1]
    if family == OPENMPI:
        return major != (12,) and (s in _OPENMPI_STEMS or s.startswith(_OPENMPI_PREFIXES))
    if s in _MPICH_HELPERS:
        return True
    return major in ((), (12,)) and (s in _MPICH_ABI_STEMS or s.startswith(_MPICH_PREFIXES))


def canonical(name: str, family: str) -> str:
    """Linker name used to pair host and image libraries (MPICH's libmpich == libmpi)."""
    s = stem(name)
    if family == MPICH_ABI:
        s = _MPICH_ALIASES.get(s, s)
    return s + ".so"


def family_of(name: str, needed: Sequence[str] = ()) -> str | None:
    """The MPI family of a library from its name and DT_NEEDED, or None if not an MPI."""
    s = stem(name)
    if s in ("libopen-pal", "libopen-rte") or any(
        n.startswith(("libopen-pal.so", "libopen-rte.so")) for n in needed
    ):
        return OPENMPI
    if s in ("libmpich", "libmpichcxx", "libmpichfort"):
        return MPICH_ABI
    if s == "libmpi":
        major = so_version(name)[:1]
        if major == (12,):
            return MPICH_ABI
        if major in ((20,), (40,)):
            return OPENMPI
    return None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    partial: bool = False
    reason: str = ""


def abi_verdict(host: Sequence[int], image: Sequence[int], rule: str) -> Verdict:
    """Sarus' rule on ABI numbers (major, minor, ...); a missing minor counts as 0."""
    if rule not in RULES:
        raise ConfigError(
            "unknown abi_check rule: %s" % rule, hint="use one of: " + ", ".join(RULES)
        )
    if not host:
        return Verdict(False, reason="the host library has no major version")
    if not image:
        return Verdict(False, reason="the image library has no major version")
    if host[0] != image[0]:
        return Verdict(False, reason="major %d (host) != %d (image)" % (host[0], image[0]))
    if rule == RULE_MAJOR:
        return Verdict(True, reason="major %d equal (rule major)" % host[0])
    hminor = host[1] if len(host) > 1 else 0
    iminor = image[1] if len(image) > 1 else 0
    if rule == RULE_STRICT:
        if hminor != iminor:
            return Verdict(
                False, reason="minor %d (host) != %d (image), rule strict" % (hminor, iminor)
            )
        return Verdict(True, reason="major.minor %d.%d equal (rule strict)" % (host[0], hminor))
    if hminor >= iminor:
        return Verdict(True, reason="host %s >= image %s (rule full)" % (vtext(host), vtext(image)))
    return Verdict(
        True,
        partial=True,
        reason="partial: host minor %d older than the image's %d (rule full)" % (hminor, iminor),
    )


# -- profiles -------------------------------------------------------------------------------


@dataclass
class Profile:
    name: str
    family: str | None  # None: auto, decided from the host
    rule: str = DEFAULT_RULE
    libs: list[str] = field(default_factory=list)  # host paths or sonames
    lib_dirs: list[str] = field(default_factory=list)
    dependency_libs: list[str] | None = None  # None: DEFAULT_DEPENDENCIES
    env_set: dict[str, str] = field(default_factory=dict)
    env_prepend: dict[str, str] = field(default_factory=dict)
    env_append: dict[str, str] = field(default_factory=dict)
    env_unset: list[str] = field(default_factory=list)
    binds: list[tuple[str, str, bool, bool]] = field(default_factory=list)  # src, dst, ro, optional
    devices: list[str] = field(default_factory=list)


def load_profile(name: str, policy=None) -> Profile:
    """The named profile of the policy's mpi_profiles (NodePolicy MpiProfile or mapping), or
    the built-in 'auto'."""
    profiles = policyview.get(policy, "mpi_profiles", {})
    if name == "auto" and "auto" not in profiles:
        return Profile("auto", None)
    if name not in profiles:
        known = sorted(profiles) + ["auto", "none"]
        raise ConfigError("unknown MPI profile: %s" % name, hint="use one of: " + ", ".join(known))
    raw = profiles[name] or {}
    family = policyview.get(raw, "family")
    if family not in FAMILIES:
        raise ConfigError(
            "MPI profile %s: family must be one of %s" % (name, ", ".join(FAMILIES)),
            hint="set family: mpich-abi or family: openmpi in the policy",
        )
    rule = policyview.get(raw, "abi_check", DEFAULT_RULE)
    if rule not in RULES:
        raise ConfigError(
            "MPI profile %s: unknown abi_check %s" % (name, rule),
            hint="use one of: " + ", ".join(RULES),
        )
    env_set, env_prepend, env_append, env_unset = policyview.env_rules(policyview.get(raw, "env"))
    return Profile(
        name=name,
        family=family,
        rule=rule,
        libs=list(policyview.get(raw, "libs", ())),
        lib_dirs=list(policyview.get(raw, "lib_dirs", ())),
        dependency_libs=list(policyview.get(raw, "dependency_libs", ())) or None,
        env_set=env_set,
        env_prepend=env_prepend,
        env_append=env_append,
        env_unset=env_unset,
        binds=[policyview.bind_spec(b) for b in policyview.get(raw, "binds", ())],
        devices=[
            d if isinstance(d, str) else policyview.get(d, "src")
            for d in policyview.get(raw, "devices", ())
        ],
    )


# -- the image side -----------------------------------------------------------------------


@dataclass
class ImageMpi:
    family: str | None
    primary: Lib
    core: dict[str, Lib]  # canonical linker name -> image library
    source: str


def find_mpi4py(image: LibRoot) -> list[str]:
    """Inside paths of the image's mpi4py extension modules."""
    base = image.outside("/")
    found = []
    for pattern in _MPI4PY_GLOBS:
        for path in sorted(glob.glob(os.path.join(base, pattern))):
            found.append("/" + os.path.relpath(path, base))
    return found


def _image_mpis(image: LibRoot, app_libs: list[Lib]) -> dict[str, ImageMpi]:
    """Every MPI the image has, by family: from its ld.so.cache, else from app DT_NEEDED."""
    primaries: list[tuple[Lib, str]] = []
    for lib in image.cached(lambda n: stem(n) in ("libmpi", "libmpich") and so_version(n)):
        primaries.append((lib, "ld.so.cache"))
    for lib in app_libs:
        if stem(lib.name) in ("libmpi", "libmpich"):
            primaries.append((lib, "DT_NEEDED"))
    found: dict[str, ImageMpi] = {}
    for lib, source in primaries:
        info = image.elf(lib.real)
        fam = family_of(lib.name, info.needed if info else ())
        if fam is None or fam in found:
            continue
        core = {}
        for other in image.sonames_in(
            posixpath.dirname(lib.real), lambda n, fam=fam: is_core(n, fam)
        ):
            core.setdefault(canonical(other.name, fam), other)
        core[canonical(lib.name, fam)] = lib
        found[fam] = ImageMpi(fam, lib, core, source)
    return found


def _app_needed(
    image: LibRoot, app: Sequence[str], plan: InjectionPlan
) -> tuple[list[Lib], str | None]:
    """DT_NEEDED libraries of the given inside paths; second item: a static app's path."""
    libs = []
    for path in app:
        info = image.elf(path)
        if info is None:
            plan.record(C, INFO, path, "not an ELF object; its libraries are not inspected")
            continue
        if info.is_static:
            return libs, path
        owner = image.lib(posixpath.basename(path), path)
        for need in info.needed:
            lib = image.find_needed(owner, need)
            if lib is not None:
                libs.append(lib)
    return libs, None


# -- the host side ------------------------------------------------------------------------


def _host_primaries(host: LibRoot) -> dict[str, Lib]:
    """Host MPIs by family, from the host ld cache (the first entry of a family wins)."""
    found: dict[str, Lib] = {}
    for lib in host.cached(lambda n: stem(n) in ("libmpi", "libmpich") and so_version(n)):
        info = host.elf(lib.real)
        fam = family_of(lib.name, info.needed if info else ())
        if fam is not None and fam not in found:
            found[fam] = lib
    return found


def _profile_libs(host: LibRoot, prof: Profile) -> tuple[list[Lib], list[str]]:
    """Host libraries an explicit profile names (its `libs`, looked up in its lib_dirs first),
    or every library in its lib_dirs when it names none; second item: problems."""
    problems = []
    if not prof.libs:
        libs: list[Lib] = []
        for d in prof.lib_dirs:
            found = host.sonames_in(d)
            if not found:
                problems.append("profile %s: no libraries in %s" % (prof.name, d))
            libs.extend(found)
        return libs, problems
    libs = []
    for item in prof.libs:
        lib = _host_lib(host, item)
        if lib is None:
            problems.append("profile %s: %s not found on the host" % (prof.name, item))
        else:
            libs.append(lib)
    return libs, problems


def _host_lib(host: LibRoot, item: str) -> Lib | None:
    """A host library named by path (its soname is read from the ELF) or by soname (looked
    up in the profile's lib_dirs, then as the loader would)."""
    if item.startswith("/"):
        if not host.exists(item):
            return None
        info = host.elf(item)
        name = info.soname if info and info.soname else posixpath.basename(item)
        return host.lib(name, item)
    return host.find(item)  # lib_dirs are the host LibRoot's library_path


class _Swap:
    """The working state of one injection attempt (full swap or fabric only)."""

    def __init__(
        self,
        host: LibRoot,
        image: LibRoot,
        glibc: Glibc,
        plan: InjectionPlan,
        family: str | None = None,
    ):
        self.host = host
        self.image = image
        self.glibc = glibc
        self.plan = plan
        self.family = family  # set for a full swap: its core libraries always come from the host
        self.libs: dict[str, Lib] = {}  # soname -> host library to inject
        self.dst: dict[str, str] = {}  # soname -> inside destination
        self.why: dict[str, str] = {}  # soname -> reason text for the manifest
        self.plugin_dirs: dict[str, str] = {}  # inside dst -> host inside path
        self.problems: list[str] = []  # fatal for this attempt

    def add(self, lib: Lib, dst: str | None, why: str) -> None:
        """Inject lib over dst (an image file), or into LIB_DIR when dst is None."""
        if lib.name in self.libs:
            return
        self.libs[lib.name] = lib
        self.dst[lib.name] = dst or posixpath.join(LIB_DIR, lib.name)
        self.why[lib.name] = why

    def drop(self, name: str) -> None:
        for table in (self.libs, self.dst, self.why):
            table.pop(name, None)

    def over_or_add(self, lib: Lib, why: str) -> None:
        own = self.image.find(lib.name)
        if own is None:
            self.add(lib, None, why + "; the image has none")
            return
        note = why + "; over the image's %s" % vtext(own.version)
        if own.version > lib.version:
            note += " (partial: the image's copy is newer)"
            self.plan.warn(
                C,
                "host %s %s is older than the image's %s"
                % (lib.name, vtext(lib.version), vtext(own.version)),
            )
        self.add(lib, own.real, note)

    def complete(self, owners: Iterable[Lib], required: bool = True,
                 host_builds: bool = False) -> None:
        """Add host copies of DT_NEEDED libraries of owners that neither the image nor the
        injected set provides, recursively. Core MPI libraries always come from the host;
        with host_builds, so do needed libraries the image has in another build."""
        queue = list(owners)
        while queue:
            lib = queue.pop()
            info = self.host.elf(lib.real)
            for need in info.needed if info else ():
                if need in self.libs or is_glibc_lib(need):
                    continue
                core = self.family is not None and is_core(need, self.family)
                if not core and self.image.find(need):
                    dep = self._other_host_build(lib, need) if host_builds else None
                    if dep is not None:
                        self.over_or_add(dep, "the host's build, needed by %s" % lib.name)
                        queue.append(dep)
                    continue
                dep = self.host.find_needed(lib, need)
                if dep is None:
                    msg = "%s needs %s, found neither in the image nor on the host" % (
                        lib.name,
                        need,
                    )
                    if required:
                        self.problems.append(msg)
                    else:
                        self.plan.record(C, INFO, need, msg)
                    continue
                if core:
                    self.over_or_add(dep, "MPI library needed by %s" % lib.name)
                else:
                    self.add(dep, None, "needed by %s; the image has none" % lib.name)
                queue.append(dep)

    def _other_host_build(self, owner: Lib, need: str) -> Lib | None:
        """The host's NEED for OWNER when the image's copy is another build, not newer. UCX's
        libraries carry no symbol versions and keep their file names (libucs.so.0.0.0), so
        neither the version check nor the numbers tell that the host's libucp needs symbols
        only the host's libucs has: then the host's copy goes with it."""
        dep, own = self.host.find_needed(owner, need), self.image.find(need)
        if dep is None or own is None or own.version > dep.version:
            return None
        if _same_file(self.host.outside(dep.real), self.image.outside(own.real)):
            return None
        return dep

    def check_versions(self, must: Iterable[str]) -> None:
        """Symbol-version check of every library. A failure of a library in `must` ends the
        attempt; any other failing library is dropped, with its reason in the manifest."""
        must = set(must)
        for name in sorted(self.libs):
            lib = self.libs[name]
            problems = version_problems(self.host, lib, self.image, self.glibc, self.libs)
            if not problems:
                continue
            reason = "; ".join(problems)
            self.plan.record(C, REFUSE, self.host.outside(lib.real), reason)
            if name in must:
                self.problems.append("%s %s" % (name, reason))
            else:
                self.drop(name)

    def find_plugin_dirs(self) -> None:
        for d in plugin_dirs(self.host, self.libs.values()):
            self.plugin_dirs.setdefault(self.image.resolve(d), d)

    def emit(self, level: str) -> None:
        """Write the binds of this attempt into the plan."""
        for name in sorted(self.libs):
            lib = self.libs[name]
            dst = self.dst[name]
            if dst.startswith(LIB_DIR + "/"):
                self.plan.prepend_library_dir(LIB_DIR)
            self.plan.add_bind(
                C,
                self.host.outside(lib.real),
                dst,
                True,
                "file",
                "%s (%s)" % (self.why[name], level),
            )
        for dst, src in sorted(self.plugin_dirs.items()):
            self.plan.add_bind(
                C,
                self.host.outside(self.host.resolve(src)),
                dst,
                True,
                "dir",
                "plugin/config directory of an injected library",
            )


def plugin_dirs(host: LibRoot, libs: Iterable[Lib]) -> list[str]:
    """Host inside paths of the plugin and config directories that go with libs."""
    out: list[str] = []
    for lib in libs:
        s = stem(lib.name)
        info = host.elf(lib.real)
        origin = posixpath.dirname(lib.real)
        bases = [origin] + [
            b.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
            for b in (info.runpath + info.rpath if info else ())
        ]
        for pattern in PLUGIN_DIRS.get(s, ()):
            for base in bases:
                for path in sorted(glob.glob(os.path.join(host.outside(base), pattern))):
                    inside = posixpath.join(base, os.path.basename(path))
                    if inside not in out and _has_objects(path):
                        out.append(inside)
        for d in CONFIG_DIRS.get(s, ()):
            if host.exists(d) and d not in out:
                out.append(d)
    return out


def _has_objects(path: str) -> bool:
    try:
        return os.path.isdir(path) and any(n.endswith(".so") for n in os.listdir(path))
    except OSError:
        return False


def plugin_objects(host: LibRoot, dirs: Iterable[str]) -> list[Lib]:
    """The .so files directly inside the host plugin directories."""
    out = []
    for d in dirs:
        real = host.resolve(d)
        try:
            names = sorted(os.listdir(host.outside(real)))
        except OSError:
            continue
        out.extend(host.lib(n, posixpath.join(real, n)) for n in names if n.endswith(".so"))
    return out


def _closure(host: LibRoot, roots: Iterable[Lib]) -> list[Lib]:
    """Every host library reachable through DT_NEEDED from roots (glibc excluded)."""
    seen: dict[str, Lib] = {}
    queue = list(roots)
    while queue:
        lib = queue.pop()
        info = host.elf(lib.real)
        for need in info.needed if info else ():
            if need in seen or is_glibc_lib(need):
                continue
            dep = host.find_needed(lib, need)
            if dep is not None:
                seen[need] = dep
                queue.append(dep)
    return list(seen.values())


# -- the plan -------------------------------------------------------------------------------


def mpi_plan(
    rootfs: str,
    profile: str | None = None,
    policy=None,
    host_root: str = "/",
    app: Sequence[str] = (),
) -> InjectionPlan:
    """Plan host MPI injection into rootfs. profile: 'auto', 'none', a policy profile name,
    or None for the policy's mpi.profile ('auto' without a policy).
    app: inside paths of ELF objects whose DT_NEEDED name the image's MPI (the application,
    an mpi4py extension); the image's mpi4py is looked for when none is given. Independent of
    the rank's environment, so the result can be cached per node and image."""
    plan = InjectionPlan()
    if profile is None:
        profile = policyview.setting(policy, "mpi", "profile", "auto")
    if profile in ("", "none"):
        plan.mpi_level = LEVEL_NONE
        plan.record(C, STEP, LEVEL_NONE, "MPI injection switched off (--mpi none)")
        return plan
    prof = load_profile(profile, policy)
    host = LibRoot(host_root, library_path=prof.lib_dirs)
    image = LibRoot(rootfs, host.machine)
    plan.info[C] = info = {"profile": prof.name, "rule": prof.rule}

    glibc = image.glibc()
    if glibc is None:
        return _no_injection(plan, image)
    info["image_glibc"] = vtext(glibc.version)

    app_libs, static_app = _app_needed(image, list(app) or find_mpi4py(image), plan)
    if static_app:
        return _refuse_all(
            plan, "%s is statically linked: host libraries cannot replace its MPI" % static_app
        )
    image_mpis = _image_mpis(image, app_libs)
    host_mpis = _host_primaries(host) if prof.family is None else {}
    image_mpi = _choose_image_mpi(image, image_mpis, app_libs, prof.family, host_mpis)
    if image_mpi is None:
        plan.mpi_level = LEVEL_NONE
        plan.record(
            C,
            STEP,
            LEVEL_NONE,
            "the image has no dynamically linked MPI (neither in its "
            "ld.so.cache nor in the application's DT_NEEDED): nothing to replace",
        )
        return plan
    info["image_family"] = image_mpi.family
    info["image_mpi"] = "%s %s (from %s)" % (
        image_mpi.primary.real,
        vtext(image_mpi.primary.version),
        image_mpi.source,
    )
    host_libs, family, problems = _host_mpi(host, prof, host_mpis, image_mpi.family, plan)
    info["host_family"] = family
    deps = _dependencies(host, prof, host_libs)
    _apply_ladder(
        plan, policy, prof, host, image, glibc, image_mpi, host_libs, family, deps, problems
    )
    return plan


def _choose_image_mpi(
    image: LibRoot,
    image_mpis: dict[str, "ImageMpi"],
    app_libs: list[Lib],
    profile_family: str | None,
    host_mpis: dict[str, Lib],
) -> "ImageMpi" | None:
    """The image MPI the application uses; else the one the host can replace; else any."""
    for lib in app_libs:
        info = image.elf(lib.real)
        fam = family_of(lib.name, info.needed if info else ())
        if fam in image_mpis:
            return image_mpis[fam]
    for fam in [profile_family] + list(host_mpis):
        if fam in image_mpis:
            return image_mpis[fam]
    return next(iter(image_mpis.values()), None)


def _host_mpi(
    host: LibRoot, prof: Profile, host_mpis: dict[str, Lib], image_family: str, plan: InjectionPlan
) -> tuple[list[Lib], str | None, list[str]]:
    """The host MPI library set, its family, and problems finding it."""
    if prof.family is not None:
        libs, problems = _profile_libs(host, prof)
        return libs, prof.family, problems
    if not host_mpis:
        return [], None, ["no MPI library (libmpi.so.N, libmpich.so.12) in the host's ld cache"]
    family = image_family if image_family in host_mpis else next(iter(host_mpis))
    primary = host_mpis[family]
    libs = host.sonames_in(posixpath.dirname(primary.real), lambda n: is_core(n, family))
    if not any(lib.name == primary.name for lib in libs):
        libs.append(primary)
    plan.record(
        C, INFO, host.outside(primary.real), "host MPI found in the host's ld cache: %s" % family
    )
    return libs, family, []


def _dependencies(host: LibRoot, prof: Profile, mpi_libs: list[Lib]) -> list[Lib]:
    """Fabric/runtime libraries to bring along. Profile entries that are paths or sonames are
    taken as they are; bare names (libfabric) and the default list select from the DT_NEEDED
    closure of the MPI and its plugins."""
    names = list(prof.dependency_libs if prof.dependency_libs is not None else DEFAULT_DEPENDENCIES)
    direct = [n for n in names if "/" in n or ".so." in n]
    stems = {stem(posixpath.basename(n)) if ".so" in n else n for n in names if n not in direct}
    found: dict[str, Lib] = {}
    for item in direct:
        lib = _host_lib(host, item)
        if lib is not None:
            found[lib.name] = lib
    if stems:
        libs = list(mpi_libs)
        for _ in range(3):  # plugins of dependencies may pull in more dependencies
            reach = _closure(host, libs + plugin_objects(host, plugin_dirs(host, libs)))
            new = [lib for lib in reach if stem(lib.name) in stems and lib.name not in found]
            if not new:
                break
            for lib in new:
                found[lib.name] = lib
            libs += new
    return list(found.values())


def _no_injection(plan: InjectionPlan, image: LibRoot) -> InjectionPlan:
    musl = image.musl_loader()
    if musl:
        reason = (
            "the image uses musl libc (%s): host libraries built against glibc cannot "
            "run in it; the image's own MPI is used as is" % musl
        )
    else:
        reason = (
            "the image has no glibc (no libc.so.6 in its ld.so.cache or library "
            "directories): a static or non-glibc image; host libraries are not injected"
        )
    return _refuse_all(plan, reason)


def _refuse_all(plan: InjectionPlan, reason: str) -> InjectionPlan:
    plan.no_injection = reason
    plan.mpi_level = LEVEL_NONE
    plan.record(C, REFUSE, "all host libraries", reason)
    return plan


def _apply_ladder(
    plan, policy, prof, host, image, glibc, image_mpi, host_libs, family, deps, problems
):
    """Full swap -> fabric libraries only -> image MPI untouched; each step's reason goes
    into the manifest."""
    full = None
    if problems:
        reason = "; ".join(problems)
    elif family != image_mpi.family:
        reason = "host MPI family %s (profile %s) does not match the image's %s (%s)" % (
            family,
            prof.name,
            image_mpi.family,
            image_mpi.primary.name,
        )
    else:
        full, reason = _try_full(plan, prof, host, image, glibc, image_mpi, host_libs, family, deps)
    if full is not None:
        plan.record(C, STEP, LEVEL_FULL, reason)
        full.emit(LEVEL_FULL)
        _profile_extras(plan, prof, host)
        plan.mpi_level = LEVEL_FULL
        return
    plan.record(C, STEP, "full swap refused", reason)
    if not policyview.setting(policy, "mpi", "fallback", True):
        plan.mpi_level = LEVEL_NONE
        plan.error(
            C,
            "host MPI injection refused and the policy allows no fallback "
            "(mpi.fallback: false): %s" % reason,
        )
        return
    fabric, freason = _try_fabric(plan, host, image, glibc, deps)
    if fabric is not None:
        plan.record(C, STEP, LEVEL_FABRIC, freason)
        fabric.emit(LEVEL_FABRIC)
        _profile_extras(plan, prof, host)
        plan.mpi_level = LEVEL_FABRIC
        plan.warn(C, "host MPI not injected (%s); only the fabric libraries were bound" % reason)
        return
    plan.record(C, STEP, LEVEL_NONE, "image MPI untouched: " + freason)
    plan.mpi_level = LEVEL_NONE
    plan.warn(C, "host MPI not injected: %s" % reason)


def _try_full(plan, prof, host, image, glibc, image_mpi, host_libs, family, deps):
    swap = _Swap(host, image, glibc, plan, family)
    by_canon: dict[str, list[Lib]] = {}
    for lib in host_libs:
        by_canon.setdefault(canonical(lib.name, family), []).append(lib)
    partial = []
    for canon, own in sorted(image_mpi.core.items()):
        candidates = by_canon.get(canon)
        if not candidates:
            plan.record(
                C, INFO, own.real, "no host counterpart for the image's %s; left as is" % own.name
            )
            continue
        lib = _best_match(candidates, own)
        verdict = abi_verdict(lib.version, own.version, prof.rule)
        if not verdict.ok:
            plan.record(
                C,
                REFUSE,
                host.outside(lib.real),
                "%s vs the image's %s: %s" % (lib.name, own.name, verdict.reason),
            )
            return None, "ABI check failed for %s: %s" % (own.name, verdict.reason)
        if verdict.partial:
            partial.append(own.name)
            plan.warn(C, "%s: %s" % (own.name, verdict.reason))
        swap.add(
            lib,
            own.real,
            "%s %s over the image's %s; %s"
            % (family, vtext(lib.version), vtext(own.version), verdict.reason),
        )
    if not swap.libs:
        return None, "no host library pairs with the image's MPI libraries"
    for lib in deps:
        swap.over_or_add(lib, "dependency of the host MPI")
    swap.complete(list(swap.libs.values()), required=True)
    if swap.problems:
        return None, "; ".join(swap.problems)
    must = set(swap.libs)
    swap.find_plugin_dirs()
    _add_plugin_needs(swap)
    swap.check_versions(must)
    if swap.problems:
        return None, "; ".join(swap.problems)
    text = "host %s MPI replaces the image's (%d libraries)" % (family, len(must))
    if partial:
        text += "; partial ABI match for " + ", ".join(partial)
    return swap, text


def _best_match(candidates: list[Lib], own: Lib) -> Lib:
    """Same major first; among those the one with the highest version."""
    same = [c for c in candidates if c.version[:1] == own.version[:1]]
    return max(same or candidates, key=lambda c: c.version)


def _add_plugin_needs(swap: _Swap) -> None:
    """Plugins are optional: libraries they need that the image lacks are added from the host
    when it has them; plugins that still cannot load in the image are noted, not fatal."""
    plugins = plugin_objects(swap.host, swap.plugin_dirs.values())
    swap.complete(plugins, required=False)
    failing: dict[str, list[str]] = {}  # reason -> plugin names
    for plugin in plugins:
        problems = version_problems(swap.host, plugin, swap.image, swap.glibc, swap.libs)
        if problems:
            failing.setdefault("; ".join(problems), []).append(plugin.name)
    for reason, names in sorted(failing.items()):
        shown = ", ".join(names[:3]) + (" and %d more" % (len(names) - 3) if len(names) > 3 else "")
        swap.plan.record(C, INFO, shown, "plugins will not load in the image: " + reason)


def _same_file(a: str, b: str) -> bool:
    """Byte-identical (an image built from the host's own packages), unreadable counts as not."""
    try:
        return os.path.getsize(a) == os.path.getsize(b) and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _try_fabric(plan, host, image, glibc, deps):
    """Swap only host dependency libraries the image itself uses, each at least as new and
    passing the checks on its own."""
    accepted = _Swap(host, image, glibc, plan)
    for lib in deps:
        own = image.find(lib.name)
        if own is None:
            continue
        if lib.version < own.version:
            plan.record(
                C,
                REFUSE,
                host.outside(lib.real),
                "host %s %s is older than the image's %s"
                % (lib.name, vtext(lib.version), vtext(own.version)),
            )
            continue
        trial = _Swap(host, image, glibc, plan)
        trial.add(
            lib,
            own.real,
            "fabric library %s over the image's %s" % (vtext(lib.version), vtext(own.version)),
        )
        trial.complete([lib], required=True, host_builds=True)
        if not trial.problems:
            trial.check_versions(trial.libs)
        if trial.problems:
            plan.record(C, REFUSE, host.outside(lib.real), "; ".join(trial.problems))
            continue
        for name, tlib in trial.libs.items():
            accepted.add(
                tlib,
                None if trial.dst[name].startswith(LIB_DIR + "/") else trial.dst[name],
                trial.why[name],
            )
    if not accepted.libs:
        return None, "no host fabric library can replace one of the image's"
    accepted.find_plugin_dirs()
    return accepted, "host fabric libraries replace the image's: " + ", ".join(
        sorted(accepted.libs)
    )


def _profile_extras(plan: InjectionPlan, prof: Profile, host: LibRoot) -> None:
    """The profile's own binds, devices and environment (site fabric setup)."""
    for src, dst, ro, optional in prof.binds:
        if not host.exists(src):
            plan.record(
                C,
                INFO if optional else REFUSE,
                dst,
                "profile %s bind source %s does not exist" % (prof.name, src),
            )
            continue
        real = host.outside(host.resolve(src))
        plan.add_bind(
            C, real, dst, ro, "dir" if os.path.isdir(real) else "file", "profile %s" % prof.name
        )
    for dev in prof.devices:
        if not os.path.exists(host.outside(dev)):
            plan.record(C, REFUSE, dev, "profile %s device does not exist on this node" % prof.name)
            continue
        plan.add_device(C, host.outside(dev), dev, "profile %s" % prof.name)
    plan.env.update(prof.env_set)
    plan.env_prepend.update(prof.env_prepend)
    plan.env_append.update(prof.env_append)
    for name in prof.env_unset:
        if name not in plan.env_unset:
            plan.env_unset.append(name)
