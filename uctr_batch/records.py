"""Plain records with the dataclass contract, for the modules the batch hooks import.

Every allocated node runs the Slurm prolog (and later the epilog) for every container job,
and on a warm node Python's start-up and imports are nearly all they cost. dataclasses
imports inspect, ast, dis and tokenize (~5 ms), and building each class runs exec() for its
__init__, __repr__, __eq__ and friends (~0.3-0.5 ms a class; the hooks' modules had 23):
together ~15 ms of a ~80 ms warm prolog on the 2-core test machine (python -X importtime).

    class Layer(Frozen):
        __slots__ = ("digest", "media_type", "size")   # the fields, in order
        _DEFAULTS = {"size": 0}                         # a type there is a factory: list, dict

Frozen and Record keep what the callers used of dataclasses: construction by position or
keyword with the same defaults, == (same class, same fields), repr, immutability and hash
for Frozen (fields named in _NOT_COMPARED stay out of == and hash, as compare=False),
replace() for dataclasses.replace() and plain() for dataclasses.asdict(). inject/plan.py's
records (the step creator's injection plan) are these too.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)


def bind(kind: str, names, defaults, args: tuple, kwargs: dict) -> dict:
    """Name -> value of a dataclass-like constructor call: ARGS by position, KWARGS by
    name, the rest from DEFAULTS (a type there is a factory: a new list, dict or record)."""
    if len(args) > len(names):
        raise TypeError(f"{kind} takes at most {len(names)} arguments")
    values = dict(zip(names, args))
    for name, value in kwargs.items():
        if name not in names or name in values:
            raise TypeError(f"{kind}: unexpected or repeated argument {name!r}")
        values[name] = value
    for name in names:
        if name not in values:
            if name not in defaults:
                raise TypeError(f"{kind}: missing argument {name!r}")
            default = defaults[name]
            values[name] = default() if isinstance(default, type) else default
    return values


class Record:
    """A (mutable) dataclass of the fields in __slots__; _DEFAULTS: field -> default."""

    __slots__ = ()
    _DEFAULTS: dict = {}
    _NOT_COMPARED: tuple = ()

    def __init__(self, *args, **kwargs):
        values = bind(type(self).__name__, self.__slots__, self._DEFAULTS, args, kwargs)
        for name in self.__slots__:
            object.__setattr__(self, name, values[name])

    def _compared(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__
                     if name not in self._NOT_COMPARED)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._compared() == other._compared()

    __hash__ = None  # mutable, compared by value: as a dataclass with eq

    def __reduce__(self):  # copy, deepcopy and pickle construct (Frozen cannot assign)
        return type(self), tuple(getattr(self, name) for name in self.__slots__)

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self.__slots__))


class Frozen(Record):
    """A frozen dataclass of the fields in __slots__."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")

    def __delattr__(self, name):
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__name__} is frozen")

    def __hash__(self):
        return hash(self._compared())


def replace(record: Record, **changes) -> Record:
    """dataclasses.replace(): a new record of RECORD's class with some fields changed."""
    values = {name: getattr(record, name) for name in record.__slots__}
    for name in changes:
        if name not in values:
            raise TypeError(f"{type(record).__name__} has no field {name!r}")
    values.update(changes)
    return type(record)(**values)


def plain(value):
    """dataclasses.asdict() of VALUE: records become dicts, containers are copied all the
    way down."""
    if isinstance(value, Record):
        return {name: plain(getattr(value, name)) for name in value.__slots__}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, bytes, int, float)):
        return value  # what deepcopy gives back as it is: no copy (and weakref) import
    import copy

    return copy.deepcopy(value)
