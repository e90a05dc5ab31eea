"""Where the policy lives, whether it may be trusted, and a cheap fingerprint of it.

Stat calls only: uctr-exec uses policy_fingerprint() on every rank to decide whether its
cached NodePolicy is still current.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import json
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from uctr_batch.hashing import sha256

DEFAULT_POLICY = Path("/etc/uctr/policy.yaml")
DROPIN_DIR = "conf.d"  # beside the policy file: /etc/uctr/conf.d/*.yaml
MAX_DROPINS = 64  # more conf.d/*.yaml files than this is a ConfigError


def policy_path(env: Mapping[str, str] | None = None) -> Path:
    """UCTR_POLICY, else /etc/uctr/policy.yaml."""
    env = os.environ if env is None else env
    return Path(env.get("UCTR_POLICY") or DEFAULT_POLICY)


def dropin_dir(path: Path) -> Path:
    return Path(path).parent / DROPIN_DIR


def _dropin_names(d: Path) -> list[str]:
    names = sorted(n for n in os.listdir(d) if n.endswith(".yaml") and not n.startswith("."))
    return names


def dropin_paths(path: Path) -> list[Path]:
    """The drop-ins of policy file `path`, in the lexical order they are merged in.
    An unreadable conf.d or more than MAX_DROPINS files is a ConfigError."""
    d = dropin_dir(path)
    try:
        names = _dropin_names(d)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        from uctr_batch.errors import ConfigError

        raise ConfigError(f"cannot list the policy drop-ins in {d}: {e.strerror}",
                          f"make {d} readable by every user (chmod 0755), or remove it") from None
    if len(names) > MAX_DROPINS:
        from uctr_batch.errors import ConfigError

        raise ConfigError(f"too many policy drop-ins in {d}: {len(names)} (at most {MAX_DROPINS})",
                          "merge them into fewer files")
    return [d / n for n in names]


def watched_paths(path: Path) -> list[Path]:
    """Everything whose change invalidates a resolved policy: the file, the drop-in
    directory (a drop-in added or removed changes its mtime) and each drop-in."""
    path = Path(path)
    d = dropin_dir(path)
    try:
        names = _dropin_names(d)[:MAX_DROPINS + 1]  # the fingerprint must not fail
    except OSError:
        names = []
    return [path, d] + [d / n for n in names]


def policy_fingerprint(paths: Sequence[Path]) -> str:
    """A digest of (path, mtime, ctime, size, inode) of each path; missing paths count too.

    ctime is included because chmod/chown (which change trust) leave mtime alone.
    """
    rows = []
    for p in paths:
        try:
            st = os.stat(p)
            rows.append([str(p), st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino])
        except OSError:
            rows.append([str(p), None])
    return sha256(json.dumps(rows).encode()).hexdigest()[:32]


def current_fingerprint(env: Mapping[str, str] | None = None) -> str:
    """Fingerprint of the policy that load_policy() would read now."""
    return policy_fingerprint(watched_paths(policy_path(env)))


def untrusted_reason(path: Path, st: os.stat_result | None = None) -> str | None:
    """Why `path` may not be trusted, or None if it and every parent directory are owned
    by root and not writable by group or others.

    A group/world-writable parent is accepted when it is root-owned and sticky (like /tmp):
    there nobody else can rename or replace the root-owned entry below it. `st` is the
    fstat of an already opened file, so the checked file is the one that was read.
    """
    real = Path(os.path.realpath(path))
    problem = _bad_owner_or_mode(real, st or os.stat(real), is_file=True)
    if problem:
        return problem
    for parent in real.parents:
        problem = _bad_owner_or_mode(parent, os.stat(parent), is_file=False)
        if problem:
            return problem
    return None


def _bad_owner_or_mode(p: Path, st: os.stat_result, is_file: bool) -> str | None:
    what = "" if is_file else f"its directory {p} "
    if st.st_uid != 0:
        return f"{what}is owned by uid {st.st_uid}, not root"
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and (is_file or not st.st_mode & stat.S_ISVTX):
        who = "group" if st.st_mode & stat.S_IWGRP else "others"
        return f"{what}is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None
