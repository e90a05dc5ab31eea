"""Root's node-local memory of policy bytes it already validated (the batch hooks' fast path).

Parsing the YAML and checking it against the schema costs about 0.1 CPU-s, most of it
importing jsonschema, and the Slurm prolog and epilog (and the PBS hooks) did it for every
container job on every node: on a warm node, more than half of what the hooks cost.

The outcome of parse + validate + merge depends only on the files' names and bytes and on
the rules (schema.json, load.py, model.py). load_policy() still opens, trust-checks and reads
every file each time (read_file); only when those names and bytes, and the rules, are the
ones validated before does it take the merged result from here instead of parsing again.
Nothing is keyed on mtimes or sizes: a file rewritten in place is a different key.

The entry is one file, DIR/validated.marshal, written and read by the hook's own user (root)
only: DIR and the file must be that user's, not writable by anyone else, and no symlink is
followed. Anything else (missing, planted, damaged, another key) is a miss, never an error;
a policy that does not validate is never stored.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import marshal
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from uctr_batch.hashing import sha256

FORMAT = 1
NAME = "validated.marshal"
MAX_BYTES = 4 << 20  # a merged policy is a few KiB
RULES = ("schema.json", "load.py", "model.py")  # what decides whether bytes are valid

Merged = tuple[dict, list, dict]  # (defaults, classes, mpi_profiles): load.merge_files()


def key(texts: Sequence[tuple[str, str]]) -> str:
    """The digest of (path, text) of every file in merge order, the rules and the format."""
    digest = sha256(f"{FORMAT} {sys.version_info[:2]}\0".encode())
    here = Path(__file__).parent
    for part in [(here / name).read_bytes() for name in RULES] + \
            [s.encode() for pair in texts for s in pair]:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def read(directory, wanted: str) -> Merged | None:
    """The merged policy stored under WANTED in DIRECTORY, or None."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        dir_fd = os.open(directory, flags | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        if not _private(os.fstat(dir_fd)):
            return None
        fd = os.open(NAME, flags | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _private(st) or st.st_nlink != 1 \
                or st.st_size > MAX_BYTES:
            return None
        from uctr_batch import fsutil

        entry = marshal.loads(fsutil.read_at_most(fd, MAX_BYTES))
    except (OSError, EOFError, ValueError, TypeError):
        return None
    finally:
        os.close(fd)
    if not isinstance(entry, dict) or entry.get("key") != wanted:
        return None
    merged = entry.get("merged")
    return merged if isinstance(merged, tuple) and len(merged) == 3 else None


def store(directory, wanted: str, merged: Merged) -> bool:
    """Keep MERGED under WANTED in DIRECTORY (created 0755 if missing); False when it
    cannot be kept (a directory that is not the caller's alone, a full or read-only file
    system, data marshal cannot write): the next load validates again."""
    try:
        data = marshal.dumps({"key": wanted, "merged": tuple(merged)})
    except ValueError:  # a YAML timestamp or the like: nothing the schema forbade
        return False
    try:
        os.mkdir(directory, 0o755)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or not _private(st):
            return False
        from uctr_batch import fsutil

        fsutil.write_atomic(Path(directory) / NAME, data, 0o600)
    except OSError:
        return False
    return True


def _private(st: os.stat_result) -> bool:
    """Ours, and nobody else can write it."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
