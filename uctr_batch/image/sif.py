"""Apptainer/Singularity images (SIF files): run as they are by mode S1, never unpacked.

    path = sif_path(image)          the SIF a reference names (its magic decides), else None
    path = checked(path)            the resolved path of a readable regular SIF file
    ladder = s1_ladder(image, ladder, explicit)  ("S1",) or ModeError with the alternative
    outcome = stage_outcome(image, path, ladder)   the prolog's record: nothing to stage

A SIF already is one read-only image file: apptainer mounts its squashfs partition itself
(squashfuse or a loop device), so nothing is copied to the node or unpacked, and the node's
local quota is not used. Every step runs the file the reference names at that moment:
replace a SIF between jobs, not during one (the same holds for apptainer itself).

Only a path reference is looked at (one starting with '/' or '.', as for squashfs files in
pyxis), and it is a SIF when the file carries the SIF magic, whatever its name. The file is
opened as the calling user (never as root): the link chain is resolved once, and the final
path must be a regular file this user can read; that path, not the link, goes to apptainer.
"""

import os
import stat

from uctr_batch.errors import ModeError, UctrError

MAGIC = b"SIF_MAGIC"
MAGIC_AT = 32  # after the launch line ("#!/usr/bin/env run-singularity\n" padded)
RUNSCRIPT = "/.singularity.d/runscript"  # what `apptainer run` starts; our default command
MODE = "S1"
CONVERT_HINT = ("use the OCI/Docker image it was built from, or convert it where apptainer "
                "exists: `apptainer build --sandbox DIR IMAGE.sif` makes a directory every "
                "mode runs (uctr run DIR, uctr-exec DIR)")


class SifError(UctrError):
    """A SIF reference that cannot be used as given (exit 1: fix the input)."""


def has_magic(head: bytes) -> bool:
    """Whether HEAD (the file's first bytes) starts a SIF."""
    return head[MAGIC_AT:MAGIC_AT + len(MAGIC)] == MAGIC


def _is_path_reference(image: str) -> bool:
    return image.startswith(("/", "."))


def sif_path(image: str):
    """The absolute path of the SIF file IMAGE names, or None (not a path, or not a SIF:
    the squashfs code reports what else it is)."""
    if not _is_path_reference(image):
        return None
    path = os.path.abspath(image)
    try:  # O_NONBLOCK: a FIFO must not block us (it is no SIF)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.pread(fd, MAGIC_AT + len(MAGIC), 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return path if has_magic(head) else None


def checked(path: str) -> str:
    """PATH resolved once: a regular SIF file this user can read (SifError otherwise)."""
    real = os.path.realpath(path)
    try:  # O_NOFOLLOW: the resolved path must not have become a link since
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise SifError(f"cannot open the Apptainer image {path}: {e.strerror}",
                       "give the path of a .sif file you can read on this node") from None
    try:
        st = os.fstat(fd)
        head = os.pread(fd, MAGIC_AT + len(MAGIC), 0) if stat.S_ISREG(st.st_mode) else b""
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode) or not has_magic(head):
        raise SifError(f"{path} is not an Apptainer image (SIF) any more",
                       "it changed while uctr looked at it; run again")
    return real


def s1_ladder(image: str, ladder, explicit: bool):
    """("S1",) when the policy's LADDER lets S1 run the SIF IMAGE and apptainer is installed;
    else ModeError (exit 3) naming the image, why, and what to do instead."""
    from uctr_batch.modes.s1 import find_apptainer

    what = f"{image} is an Apptainer image (SIF), which runs only in mode {MODE} (apptainer)"
    if explicit and MODE not in ladder:
        raise ModeError(f"{what}, not in mode {', '.join(ladder)}",
                        "leave the mode out (or choose S1); " + CONVERT_HINT)
    if MODE not in ladder:
        raise ModeError(f"{what}, and the site policy does not allow mode {MODE} on this node",
                        CONVERT_HINT + "; or ask the site to add S1 to the policy's modes")
    if find_apptainer() is None:
        raise ModeError(f"{what}, and apptainer/singularity is not installed on this node",
                        CONVERT_HINT + "; or ask the site to install apptainer")
    return (MODE,)


def refuse_options(image: str, options) -> None:
    """OPTIONS: (flag, value) pairs of a named container and --container-save. A SIF is
    read-only and never unpacked: both would need a root filesystem of our own. Refused
    with the flag's name, never ignored."""
    for flag, value in options:
        if value:
            raise SifError(f"{flag} cannot be used with the Apptainer image {image}: a SIF "
                           "is run read-only as it is, there is no container to keep or save",
                           CONVERT_HINT)


def config() -> dict:
    """The runtime config uctr applies: none of the image's own (apptainer applies the
    SIF's environment scripts itself); no command given runs the runscript, as
    `apptainer run` does."""
    return {"Cmd": [RUNSCRIPT]}


def stage_outcome(image: str, path: str, ladder) -> dict:
    """What the prolog or PBS hook records for a SIF job (batch.stage.stage_outcome): nothing
    to stage; the file checked as the job user and mode S1 checked against the node's LADDER,
    so that a node that cannot run it fails the job at once with the reason."""
    real = checked(path)
    s1_ladder(image, ladder, explicit=False)
    return {"status": "ok", "rootfs": real, "bundle": "", "manifest_digest": "",
            "reference": image, "unpacked": False}
