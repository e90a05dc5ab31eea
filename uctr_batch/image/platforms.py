"""Platform strings and selection of one manifest from an image index / manifest list.

Matching follows Docker/containerd: architecture aliases are normalised (x86_64 -> amd64,
aarch64 -> arm64), an arm64 request accepts variant v8 or none, an arm request accepts its
own variant or older ones (v7 runs v6 and v5), and amd64/vN accepts vN down to v1. The best
(lowest-rank) candidate wins; ties go to the first entry, as in Docker.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

from collections.abc import Sequence

from uctr_batch.errors import RegistryError, UsageError
from uctr_batch.image.manifest import Platform, host_platform

_ARCH_ALIASES = {
    "x86_64": ("amd64", None), "x86-64": ("amd64", None), "aarch64": ("arm64", None),
    "armhf": ("arm", "v7"), "armel": ("arm", "v6"), "i386": ("386", None), "i686": ("386", None),
}
_ARM_VARIANTS = ("v8", "v7", "v6", "v5")  # newest first; a CPU runs its own and older ones
_AMD64_LEVELS = (None, "v2", "v3", "v4")  # None is the baseline (v1)
_DEFAULT_VARIANT = {"arm": "v7"}


def parse(text: str) -> Platform:
    """'os/arch[/variant]' -> Platform; raise UsageError on anything else."""
    parts = (text or "").strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f'invalid platform "{text}"',
                         "write OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm64/v8")
    return normalize(Platform(*parts))


def normalize(p: Platform) -> Platform:
    arch, variant = _ARCH_ALIASES.get(p.architecture, (p.architecture, None))
    variant = p.variant or variant
    if (arch, variant) in (("arm64", "v8"), ("amd64", "v1")):
        variant = None  # the baseline variant and no variant name the same thing
    return Platform(p.os.lower(), arch, variant)


def from_json(obj: dict | None) -> Platform | None:
    """Platform of an index entry's "platform" object or of an image config."""
    if not isinstance(obj, dict):
        return None
    os_, arch, variant = obj.get("os"), obj.get("architecture"), obj.get("variant") or None
    if not (isinstance(os_, str) and os_ and isinstance(arch, str) and arch):
        return None  # documents are checked on the way in; a cache entry may be older
    if variant is not None and not isinstance(variant, str):
        variant = None
    return normalize(Platform(os_, arch, variant))


def rank(wanted: Platform, have: Platform | None) -> int | None:
    """How well `have` serves `wanted`: 0 is exact, higher is a fallback, None is unusable."""
    if have is None:
        return None
    wanted, have = normalize(wanted), normalize(have)
    if wanted.os != have.os or wanted.architecture != have.architecture:
        return None
    if wanted.variant == have.variant:
        return 0
    usable = _usable_variants(wanted)
    return usable.index(have.variant) + 1 if have.variant in usable else None


def _usable_variants(wanted: Platform) -> list:
    """Variants a machine of the wanted platform runs, best first (wanted itself excluded)."""
    variant = wanted.variant or _DEFAULT_VARIANT.get(wanted.architecture)
    if wanted.architecture == "arm":
        if variant not in _ARM_VARIANTS:
            return [variant, None]
        return list(_ARM_VARIANTS[_ARM_VARIANTS.index(variant):]) + [None]
    if wanted.architecture == "amd64" and variant in _AMD64_LEVELS:
        return list(_AMD64_LEVELS[:_AMD64_LEVELS.index(variant) + 1][::-1])
    return []


def wanted_or_host(text: str | None) -> Platform:
    return parse(text) if text else normalize(host_platform())


def select(entries: Sequence[dict], wanted: Platform, image: str) -> dict:
    """Pick the index entry (descriptor with "platform") that best serves `wanted`."""
    best, best_rank = None, None
    for entry in entries:
        r = rank(wanted, from_json(entry.get("platform") if isinstance(entry, dict) else None))
        if r is not None and (best_rank is None or r < best_rank):
            best, best_rank = entry, r
    if best is None:
        raise RegistryError(
            f"no {wanted} image in {image}",
            f"available platforms: {', '.join(available(entries)) or 'none'}; "
            "choose one with --platform",
        )
    return best


def available(entries: Sequence[dict]) -> list[str]:
    names = []
    for entry in entries:
        p = from_json(entry.get("platform") if isinstance(entry, dict) else None)
        if p is not None and p.os != "unknown" and str(p) not in names:
            names.append(str(p))
    return names
