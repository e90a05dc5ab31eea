"""The host's ABI next to the test images' (Debian bookworm: glibc 2.36, Open MPI 4.1), in one
place, so that tests which depend on it adapt, or skip with the reason, on a newer host
(Debian trixie: glibc 2.41, Open MPI 5 with libopen-pal.so.80) instead of failing falsely.

What differs on a newer host, and what uctr does about it (docs/injection.md):
  * glibc: the host's MPI libraries need symbols the image's glibc lacks, so uctr refuses the
    full swap with the reason ("needs GLIBC_2.38 ...; the image's glibc is 2.36") and falls
    back a step: a test of the swap then checks that refusal instead of the swap
    (expect_full_swap).
  * Open MPI's library sonames: libmpi keeps .so.40 in Open MPI 5, libopen-pal moves from
    .so.40 to .so.80 (openmpi_pal_soname).
Nothing here imports uctr_batch: the tests check the product against what this reads.
"""

import os
import re
import subprocess
from functools import lru_cache
from typing import Dict, Optional, Sequence, Tuple

import pytest

from .debian import SUITE

# The glibc of the Debian release the test images are built from (harness.debian.SUITE).
IMAGE_GLIBC: Dict[str, Tuple[int, int]] = {"bookworm": (2, 36)}


def image_glibc() -> Tuple[int, int]:
    return IMAGE_GLIBC[SUITE]


def host_glibc() -> Tuple[int, int]:
    """The running glibc, e.g. (2, 41); (0, 0) where it is not glibc."""
    match = re.match(r"glibc (\d+)\.(\d+)", os.confstr("CS_GNU_LIBC_VERSION") or "")
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def text(version: Tuple[int, int]) -> str:
    return "%d.%d" % version


def host_glibc_newer_than_images() -> Optional[str]:
    """Why the host's libraries may not load in the test images, or None if they may."""
    host, image = host_glibc(), image_glibc()
    if host > image:
        return (f"the host's glibc {text(host)} is newer than the test images' {text(image)} "
                f"(Debian {SUITE})")
    return None


@lru_cache(maxsize=None)
def host_sonames() -> Tuple[str, ...]:
    """Sonames in the host's ld.so cache (`ldconfig -p`)."""
    out = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
    return tuple(sorted({line.split()[0] for line in out.splitlines() if "=>" in line}))


def host_soname(prefix: str) -> Optional[str]:
    """The host's soname starting with PREFIX ("libopen-pal.so."), the highest if several."""
    found = [s for s in host_sonames() if s.startswith(prefix) and s[len(prefix):].isdigit()]
    return max(found, key=lambda s: int(s[len(prefix):])) if found else None


def openmpi_pal_soname() -> Optional[str]:
    """libopen-pal's soname on this host: .so.40 with Open MPI 4, .so.80 with Open MPI 5."""
    return host_soname("libopen-pal.so.")


def glibc_needed(path: str) -> Optional[Tuple[int, int]]:
    """The newest GLIBC_x.y version PATH needs (`objdump -T`), None if unknown."""
    out = subprocess.run(["objdump", "-T", path], capture_output=True, text=True).stdout
    found = [(int(a), int(b)) for a, b in re.findall(r"\bGLIBC_(\d+)\.(\d+)\b", out)]
    return max(found) if found else None


def fakechroot_newer_than_images(libfakechroot: Optional[str]) -> Optional[str]:
    """Why mode F1 cannot run the Debian test image with this host's libfakechroot (it is
    preloaded into the image's programs, so it needs the image's glibc), or None."""
    needed = glibc_needed(libfakechroot) if libfakechroot else None
    if needed is None or needed <= image_glibc():
        return None
    return (f"the host's libfakechroot needs glibc {text(needed)}, the test image has "
            f"{text(image_glibc())} (Debian {SUITE}): F1 refuses it, as it must")


# libopen-pal's soname in the test images' Open MPI (Debian bookworm: Open MPI 4.1)
IMAGE_OPENMPI_PAL: Dict[str, str] = {"bookworm": "libopen-pal.so.40"}


def host_openmpi_differs_from_images() -> Optional[str]:
    """Why the host's mpirun cannot start the Open MPI test image's ranks, or None. Open MPI 5
    (libopen-pal.so.80) starts its ranks with another runtime (PRRTE) than Open MPI 4's ranks
    expect; uctr swaps the host's Open MPI into the image only where the ABI and glibc
    checks pass, which they do not across these majors."""
    host, image = openmpi_pal_soname(), IMAGE_OPENMPI_PAL[SUITE]
    if host is None or host == image:
        return None
    return (f"the host's Open MPI ({host}) is another major than the test image's "
            f"({image}, Debian {SUITE}): its mpirun cannot start the image's Open MPI ranks")


def expect_full_swap(level: str, summary: Sequence[str]) -> None:
    """Check the level of a host-MPI plan for a test image. Where the host's glibc is the
    images' or older, that is the full swap. On a newer host, a refusal of the swap that
    names the image's older glibc is right too: then this checks the reason and skips what
    needs the swap (with the reason), rather than failing."""
    if level == "full":
        return
    why = host_glibc_newer_than_images()
    glibc_refusal = f"the image's glibc is {text(image_glibc())}"
    if why and any(glibc_refusal in line for line in summary):
        pytest.skip(f"{why}: uctr refused the full swap of the host MPI for the image's "
                    f"older glibc, as it must (checked); the rest needs the swap")
    raise AssertionError(f"expected the full swap of the host MPI, got {level!r}:\n"
                         + "\n".join(summary))
