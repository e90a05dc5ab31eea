"""Per-job readiness records: what the prolog found when it staged a job's image on a node.

One record per job and node, written by the (root) prolog and read by `uctr-exec` and the
SPANK plugin's task_init (C), so the format is deliberately trivial: KEY=VALUE lines, one
value per line, no quoting. Two shapes:

    status=ok                       status=error
    image=<as the user wrote it>    image=<as the user wrote it>
    reference=<canonical>           message=cannot pull ...: repository not found
    rootfs=<bundle>/rootfs          hint=check the image name
    bundle=<bundle dir>
    manifest_digest=sha256:...

plus version, job and uid on both. Records live in ``<run dir>/readiness/<job id>``; the run
dir is node-local (``/run/uctr``, or ``UCTR_RUN_DIR``), the readiness dir is root-owned, so a
user can neither create nor remove records, and each record belongs to the job's user (0600).

Standard library only, and cheap: uctr-exec calls read_readiness() on every rank.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import os
from collections.abc import Mapping
from pathlib import Path

VERSION = "1"
DEFAULT_RUN_DIR = "/run/uctr"
STATUS_OK = "ok"
STATUS_ERROR = "error"


def run_dir(env: Mapping[str, str] | None = None) -> Path:
    """Node-local directory for uctr's per-node runtime state."""
    env = os.environ if env is None else env
    return Path(env.get("UCTR_RUN_DIR") or DEFAULT_RUN_DIR)


def record_path(job_id: str, env: Mapping[str, str] | None = None) -> Path:
    return run_dir(env) / "readiness" / _job_name(job_id)


def _job_name(job_id) -> str:
    text = str(job_id)
    # job ids are digits (Slurm) or NNN.server (PBS); never let one name a path
    if not text or "/" in text or text.startswith(".") or "\0" in text:
        raise ValueError(f"not a job id: {text!r}")
    return text


def _one_line(value) -> str:
    # every line break str.splitlines() knows (\u2028, \x85, \x1c...), not only \n: a
    # user's image name or message must never add a KEY=VALUE line of its own
    return str(value).translate(_LINE_BREAKS)


_LINE_BREAKS = dict.fromkeys(map(ord, "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"), " ")


def format_record(fields: Mapping[str, object]) -> str:
    return "".join(f"{key}={_one_line(value)}\n" for key, value in fields.items() if value is not None)


def encode_record(fields: Mapping[str, object]) -> bytes:
    """format_record() as UTF-8. The values are partly the user's (an image name with bytes
    that are not UTF-8 arrives as lone surrogates): shown escaped, never an encoding error,
    which in a prolog would be a node fault."""
    return format_record(fields).encode("utf-8", "backslashreplace")


def parse_record(text: str) -> dict[str, str]:
    record: dict[str, str] = {}
    for line in text.split("\n"):  # only \n ends a line: the writer's rule, and the C reader's
        key, sep, value = line.partition("=")
        if sep:
            record[key] = value
    return record


def read_readiness(job_id, uid: int, env: Mapping[str, str] | None = None) -> dict | None:
    """The record for job JOB_ID if it belongs to UID, else None (no record, or not ours).

    Keys: status ("ok"|"error"), image, and reference/rootfs/bundle/manifest_digest (ok) or
    message/hint (error); all values are strings.
    """
    try:
        path = record_path(job_id, env)
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            st = os.fstat(f.fileno())
            text = f.read(65536)
    except (OSError, ValueError):
        return None
    # written by root (the prolog) for the job's user; anything else is not a record of ours
    if st.st_uid not in (0, uid):
        return None
    record = parse_record(text)
    if record.get("uid") != str(uid) or record.get("job") != str(job_id):
        return None
    return record


def write_readiness(job_id, uid: int, fields: Mapping[str, object],
                    env: Mapping[str, str] | None = None) -> Path:
    """Atomically (re)write job JOB_ID's record, owned by UID, mode 0600 (called as root)."""
    path = record_path(job_id, env)
    ensure_root_dir(path.parent)
    record = {"version": VERSION, "job": str(job_id), "uid": str(uid)}
    record.update(fields)
    from uctr_batch import fsutil

    fsutil.write_atomic(path, encode_record(record), 0o600,
                        owner=uid if os.geteuid() == 0 else None)
    return path


def remove_readiness(job_id, env: Mapping[str, str] | None = None) -> bool:
    """Remove job JOB_ID's record; False when there was none."""
    try:
        os.unlink(record_path(job_id, env))
        return True
    except FileNotFoundError:
        return False


def ensure_root_dir(path) -> None:
    """Create PATH (and its parent run dir) 0755; refuse one that others could write into."""
    path = Path(path)
    for directory in (path.parent, path):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            pass
        st = os.lstat(directory)
        if not os.path.isdir(directory) or os.path.islink(directory):
            raise OSError(f"{directory} is not a directory")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise PermissionError(
                f"{directory} must be owned by uid {os.geteuid()} and not writable by others")
