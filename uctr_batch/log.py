"""Diagnostics on stderr, with -v/-q levels.

stdout is reserved for results (paths, JSON). Levels: -q shows errors only, default shows
warnings and info, -v adds verbose progress, -vv adds debug and tracebacks.
"""

import logging
import os
import sys

VERBOSE = 15  # between INFO and DEBUG: what a curious user wants with -v
logging.addLevelName(VERBOSE, "VERBOSE")

_LOGGER_NAME = "uctr"


def get(name: str = "") -> logging.Logger:
    return logging.getLogger(_LOGGER_NAME + ("." + name if name else ""))


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and (record.levelno >= logging.CRITICAL or _debugging()):
            msg += "\n" + self.formatException(record.exc_info)  # a bug, or asked for with -vv
        if record.levelno >= logging.ERROR:
            return "error: " + msg
        if record.levelno >= logging.WARNING:
            return "warning: " + msg
        return msg


def _debugging() -> bool:
    return logging.getLogger(_LOGGER_NAME).getEffectiveLevel() <= logging.DEBUG


def level_for(verbosity: int) -> int:
    """Map the -v count minus the -q count to a logging level."""
    if verbosity <= -1:
        return logging.ERROR
    if verbosity == 0:
        return logging.INFO
    if verbosity == 1:
        return VERBOSE
    return logging.DEBUG


def setup(verbosity: int = 0) -> int:
    """Configure the uctr logger once; UCTR_VERBOSE adds to the command-line count."""
    try:
        verbosity += int(os.environ.get("UCTR_VERBOSE", "0") or 0)
    except ValueError:
        pass
    logger = logging.getLogger(_LOGGER_NAME)
    logger.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level_for(verbosity))
    logger.propagate = False
    return verbosity


def verbose(msg: str, *args) -> None:
    get().log(VERBOSE, msg, *args)
