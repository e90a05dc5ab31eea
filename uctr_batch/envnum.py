"""The one validated reader for numeric UCTR_* settings (environment and flags).

Every number a user can set through the environment goes through number(): junk, an empty
string after spaces, a negative or zero value where it makes no sense, NaN, infinity and
values past the bound are a ConfigError naming the variable, never a traceback and never a
silently huge thread pool or an endless wait. Imports nothing beyond errors: uctr-exec reads
UCTR_STAGE_TIMEOUT on its per-rank path.
"""

from uctr_batch.errors import ConfigError

DAY = 86400.0

# name -> (int or float, minimum, maximum, example, what it counts)
NUMERIC = {
    "UCTR_PARALLEL": (int, 1, 64, "4", "concurrent layer downloads"),
    "UCTR_RETRIES": (int, 0, 100, "5", "retries of a failed transfer"),
    "UCTR_STALL_TIMEOUT": (float, 0.1, DAY, "30",
                           "seconds without data before a transfer is retried"),
    "UCTR_STAGE_TIMEOUT": (float, 0.0, 7 * DAY, "900",
                           "seconds a rank waits for the image to be staged"),
}


def parse(name: str, text: str):
    """text -> the checked number for setting `name` (a key of NUMERIC)."""
    kind, low, high, example, what = NUMERIC[name]
    shown = text if len(text) <= 40 else text[:40] + "..."
    value = None
    try:
        value = kind(text.strip())
    except (ValueError, OverflowError):
        pass
    # NaN fails both comparisons; inf fails the upper one.
    if value is None or not low <= value <= high:
        noun = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name}={shown!r} is not {noun} from {low:g} to {high:g} ({what})",
                          f"e.g. {name}={example}, or unset {name} for the default")
    return value


def number(name: str, env, default):
    """The value of `name` in env (a mapping), checked; `default` when unset or empty."""
    text = env.get(name)
    if text is None or not text.strip():
        return default
    return parse(name, text)


def flag_type(name: str):
    """An argparse type for the flag that mirrors setting `name` (e.g. --parallel)."""

    def convert(text: str):
        import argparse

        try:
            return parse(name, text)
        except ConfigError as e:
            low, high = NUMERIC[name][1:3]
            raise argparse.ArgumentTypeError(
                f"{text[:40]!r} is not from {low:g} to {high:g}") from e

    convert.__name__ = NUMERIC[name][0].__name__  # argparse shows "invalid int value"
    return convert


def bounded_int(low: int, high: int):
    """An argparse type: a whole number from low to high (other flags' bounds)."""
    return bounded(int, low, high)


def bounded(kind, low, high):
    """An argparse type: an int or float (KIND) from low to high; NaN and inf fail."""
    noun = "a whole number" if kind is int else "a number"

    def convert(text: str):
        import argparse

        try:
            value = kind(text.strip())
        except (ValueError, OverflowError):
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {noun} from {low} to {high}")
        return value

    convert.__name__ = kind.__name__
    return convert
