"""Execution modes N1 R1 P1 P2 F1 S1 behind one interface (see base.py and docs/modes.md).

    from uctr_batch.modes import get_mode, RunSpec
    mode = get_mode("N1")
    result = mode.probe(spec)        # ProbeResult(ok, reason, version)
    mode.exec(spec)                  # never returns

Importing this package loads no mode module; get_mode() imports the one asked for.
"""

from uctr_batch.modes.base import (  # noqa: F401
    MODE_NAMES, Mode, ProbeResult, available_modes, get_mode, register_mode,
)
from uctr_batch.modes.spec import RunSpec  # noqa: F401
