"""Run child tools with argv lists; their stderr is shown only when they fail."""

import subprocess
from typing import Mapping, Optional, Sequence

from uctr_batch import log
from uctr_batch.errors import UctrError

_log = log.get("proc")


def run(
    argv: Sequence[str],
    *,
    env: Optional[Mapping[str, str]] = None,
    input: Optional[bytes] = None,
    check: bool = True,
    error: Optional[str] = None,
    hint: Optional[str] = None,
    timeout: Optional[float] = None,
) -> subprocess.CompletedProcess:
    """Run argv, capturing stdout and stderr. On failure raise UctrError(error) with the
    child's stderr appended, unless check is False."""
    _log.debug("run: %s", " ".join(argv))
    try:
        cp = subprocess.run(
            list(argv), env=env, input=input, capture_output=True, timeout=timeout
        )
    except FileNotFoundError as e:
        raise UctrError(f"{error or 'cannot run'}: {argv[0]}: not found", hint) from e
    except subprocess.TimeoutExpired as e:
        raise UctrError(f"{error or 'command timed out'}: {argv[0]} after {timeout} s", hint) from e
    if check and cp.returncode != 0:
        detail = cp.stderr.decode(errors="replace").strip()
        msg = f"{error or argv[0] + ' failed'} (exit {cp.returncode})"
        if detail:
            msg += ": " + detail.splitlines()[-1]
            _log.info("%s", detail)
        raise UctrError(msg, hint)
    return cp
