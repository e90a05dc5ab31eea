"""Paths inside a root directory (an image rootfs, or a fabricated host tree in tests).

Symbolic links are resolved the way a process chrooted into the root would see them: an
absolute target restarts at the root and ``..`` never climbs above it. Nothing here follows
a link out of the root, so an image cannot point us at host files.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import os
import posixpath

_MAX_LINKS = 40  # the kernel's MAXSYMLINKS


def outside(root: str, inside: str) -> str:
    """The path on this machine of the absolute path ``inside`` in root."""
    inside = posixpath.normpath("/" + inside.lstrip("/"))
    if root in ("", "/"):
        return inside
    return os.path.join(root, inside.lstrip("/"))


def resolve(root: str, inside: str) -> str:
    """Resolve every symlink in ``inside`` within root; return the resolved inside path.
    Missing components are kept as they are (like realpath without strict)."""
    parts = [p for p in inside.split("/") if p]
    resolved: list = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = "/" + "/".join(resolved + [part])
        real = outside(root, candidate)
        if os.path.islink(real):
            links += 1
            if links > _MAX_LINKS:
                return candidate  # a loop: give up where we are
            target = os.readlink(real)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    return "/" + "/".join(resolved)


def exists(root: str, inside: str) -> bool:
    return os.path.exists(outside(root, resolve(root, inside)))


def isdir(root: str, inside: str) -> bool:
    return os.path.isdir(outside(root, resolve(root, inside)))


def real_outside(root: str, inside: str) -> str | None:
    """The resolved path on this machine, or None when it does not exist."""
    path = outside(root, resolve(root, inside))
    return path if os.path.exists(path) else None
