"""The injection plan: what to bind, which devices, which environment, and why.

A plan is pure data computed from (host root, image rootfs, environment, policy). The launcher
applies it through the execution mode's binds and environment. It round-trips through JSON
(to_dict/from_dict) so staging can compute it once per node and cache it beside the rootfs.
The manifest records every bound file and every refusal with its reason; ``summary_lines``
is what ``-v`` prints.
"""

from __future__ import annotations  # annotations stay unevaluated: no typing import

# Not json, not collections.abc: every step's creator writes a plan (the injection
# manifest), and `import json` brings re and enum (~4 ms of its start), collections.abc
# collections (~1.3 ms). _json (json's own C string encoder) and _collections_abc (what
# collections.abc re-exports, loaded by os already) cost nothing.
from _collections_abc import Mapping
from _json import encode_basestring_ascii as _json_string

from uctr_batch.records import Frozen, bind, plain

PLAN_VERSION = 1

# Inside the container: host libraries the image has no copy of, and host tools.
LIB_DIR = "/.uctr/lib"
BIN_DIR = "/.uctr/bin"

# Manifest actions.
BIND = "bind"  # a host file or directory is bound (subject = destination)
DEVICE = "device"  # a host device node is made available
REFUSE = "refuse"  # something was not injected; reason says why
STEP = "step"  # a fallback-ladder decision
WARN = "warning"
ERROR = "error"
INFO = "info"


# Why not dataclasses (and no typing): the rank that sets up a step's container computes the
# step's PMI part with this module (pmi_plan, InjectionPlan), on every step of every job.
# dataclasses imports inspect, ast, dis and tokenize, typing the rest: together ~9 ms of a
# ~60 ms creator on the 2-core test machine (python -X importtime). records.Frozen keeps the
# dataclass contract: construction by position or keyword with the same defaults, ==, repr,
# immutability and hash; to_dict() is dataclasses.asdict().


class Bind(Frozen):
    __slots__ = ("src", "dst", "ro", "kind")
    # src: path on this machine; dst: path inside the container; kind: file | dir, what
    # mount point the launcher must create
    _DEFAULTS = {"ro": True, "kind": "file"}

    def as_tuple(self) -> tuple[str, str, bool]:
        return (self.src, self.dst, self.ro)


class Device(Frozen):
    __slots__ = ("src", "dst")  # the device node on this machine, its path inside


class ManifestEntry(Frozen):
    __slots__ = ("component", "action", "subject", "reason", "src")  # component: mpi|gpu|pmi
    _DEFAULTS = {"reason": "", "src": None}

    def line(self) -> str:
        text = "%s: %s %s" % (self.component, self.action, self.subject)
        if self.src:
            text += " <- %s" % self.src
        if self.reason:
            text += " (%s)" % self.reason
        return text


# InjectionPlan's fields, in order: name -> what an omitted one starts as (a type: a new one).
_PLAN_FIELDS = {
    "binds": list,  # [Bind]
    "devices": list,  # [Device]
    "env": dict,  # set, overriding
    "env_defaults": dict,  # set only when unset
    "env_prepend": dict,  # VALUE:old value
    "env_append": dict,  # old value:VALUE
    "env_unset": list,
    "ld_library_path": list,  # put first, in this order
    "path_prefix": list,
    "keep_fds": list,  # inherited fds that must stay open
    "passthrough_env": list,  # launcher variables the mode must keep
    "host_network": False,  # PMI/PMIx needs the host network namespace
    "no_injection": None,  # why host libraries cannot go into this image
    "mpi_level": None,  # full | fabric | none
    "errors": list,  # the launcher should stop
    "warnings": list,
    "info": dict,  # per component facts
    "manifest": list,  # [ManifestEntry]
}


class InjectionPlan:
    """A (mutable) dataclass of _PLAN_FIELDS."""

    __hash__ = None  # mutable, compared by value: as a dataclass with eq

    def __init__(self, *args, **kwargs):
        self.__dict__.update(bind("InjectionPlan", list(_PLAN_FIELDS), _PLAN_FIELDS, args,
                                     kwargs))

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in _PLAN_FIELDS)

    def __repr__(self):
        return "InjectionPlan(%s)" % ", ".join("%s=%r" % (n, getattr(self, n))
                                                for n in _PLAN_FIELDS)

    # -- building -------------------------------------------------------------------------

    def record(self, component: str, action: str, subject: str, reason: str = "", src=None) -> None:
        self.manifest.append(ManifestEntry(component, action, subject, reason, src))

    def warn(self, component: str, message: str) -> None:
        self.warnings.append("%s: %s" % (component, message))
        self.record(component, WARN, message)

    def error(self, component: str, message: str) -> None:
        self.errors.append("%s: %s" % (component, message))
        self.record(component, ERROR, message)

    def add_bind(
        self,
        component: str,
        src: str,
        dst: str,
        ro: bool = True,
        kind: str = "file",
        reason: str = "",
    ) -> None:
        """Add a bind unless dst is already bound (the first binding of a path wins)."""
        if any(b.dst == dst for b in self.binds):
            return
        self.binds.append(Bind(src, dst, ro, kind))
        self.record(component, BIND, dst, reason, src)

    def add_device(self, component: str, src: str, dst: str, reason: str = "") -> None:
        if any(d.dst == dst for d in self.devices):
            return
        self.devices.append(Device(src, dst))
        self.record(component, DEVICE, dst, reason, src)

    def prepend_library_dir(self, path: str) -> None:
        if path not in self.ld_library_path:
            self.ld_library_path.append(path)

    def prepend_path_dir(self, path: str) -> None:
        if path not in self.path_prefix:
            self.path_prefix.append(path)

    def merge(self, other: "InjectionPlan") -> "InjectionPlan":
        """Fold other into self (in place) and return self. Earlier binds of a path win."""
        for b in other.binds:
            if not any(x.dst == b.dst for x in self.binds):
                self.binds.append(b)
        for d in other.devices:
            if not any(x.dst == d.dst for x in self.devices):
                self.devices.append(d)
        self.env.update(other.env)
        for k, v in other.env_defaults.items():
            self.env_defaults.setdefault(k, v)
        self.env_prepend.update(other.env_prepend)
        self.env_append.update(other.env_append)
        _extend_unique(self.env_unset, other.env_unset)
        _extend_unique(self.ld_library_path, other.ld_library_path)
        _extend_unique(self.path_prefix, other.path_prefix)
        _extend_unique(self.keep_fds, other.keep_fds)
        _extend_unique(self.passthrough_env, other.passthrough_env)
        self.host_network = self.host_network or other.host_network
        self.no_injection = self.no_injection or other.no_injection
        self.mpi_level = other.mpi_level or self.mpi_level
        self.errors.extend(other.errors)
        self.warnings.extend(other.warnings)
        self.info.update(other.info)
        self.manifest.extend(other.manifest)
        return self

    # -- using ----------------------------------------------------------------------------

    def bind_tuples(self) -> list[tuple[str, str, bool]]:
        return [b.as_tuple() for b in self.binds]

    def apply_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The container environment: base (already merged by the mode) plus this plan."""
        out = dict(base)
        for k in self.env_unset:
            out.pop(k, None)
        for k, v in self.env_defaults.items():
            out.setdefault(k, v)
        out.update(self.env)
        for k, v in self.env_prepend.items():
            out[k] = _join_path([v], out.get(k))
        for k, v in self.env_append.items():
            out[k] = v if not out.get(k) else out[k] + ":" + v
        if self.ld_library_path:
            out["LD_LIBRARY_PATH"] = _join_path(self.ld_library_path, out.get("LD_LIBRARY_PATH"))
        if self.path_prefix:
            out["PATH"] = _join_path(self.path_prefix, out.get("PATH"))
        return out

    def summary_lines(self) -> list[str]:
        lines = ["%s" % e.line() for e in self.manifest]
        if self.mpi_level:
            lines.append("mpi: level %s" % self.mpi_level)
        if self.no_injection:
            lines.append("no host libraries injected: %s" % self.no_injection)
        return lines

    # -- serialising ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = {name: plain(getattr(self, name)) for name in _PLAN_FIELDS}
        d["version"] = PLAN_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "InjectionPlan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError("unsupported injection plan version: %r" % d.get("version"))
        return cls(
            binds=[Bind(**b) for b in d.get("binds", [])],
            devices=[Device(**x) for x in d.get("devices", [])],
            env=dict(d.get("env", {})),
            env_defaults=dict(d.get("env_defaults", {})),
            env_prepend=dict(d.get("env_prepend", {})),
            env_append=dict(d.get("env_append", {})),
            env_unset=list(d.get("env_unset", [])),
            ld_library_path=list(d.get("ld_library_path", [])),
            path_prefix=list(d.get("path_prefix", [])),
            keep_fds=[int(x) for x in d.get("keep_fds", [])],
            passthrough_env=list(d.get("passthrough_env", [])),
            host_network=bool(d.get("host_network", False)),
            no_injection=d.get("no_injection"),
            mpi_level=d.get("mpi_level"),
            errors=list(d.get("errors", [])),
            warnings=list(d.get("warnings", [])),
            info=dict(d.get("info", {})),
            manifest=[ManifestEntry(**m) for m in d.get("manifest", [])],
        )

    def to_json(self) -> str:
        d = self.to_dict()
        try:
            return to_json(d)
        except TypeError:  # a value to_json() does not write: json's rules, json's errors
            import json

            return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "InjectionPlan":
        import json

        return cls.from_dict(json.loads(text))

    def write(self, path: str) -> None:
        """Write the plan as JSON, atomically (readers never see half a file)."""
        from uctr_batch import fsutil

        fsutil.write_atomic(path, (self.to_json() + "\n").encode(), 0o644)

    @classmethod
    def read(cls, path: str) -> "InjectionPlan":
        with open(path) as f:
            return cls.from_json(f.read())


def to_json(value, level: int = 0) -> str:
    """json.dumps(VALUE, indent=1, sort_keys=True), byte for byte, for what to_dict() holds:
    dicts with string keys, lists, tuples, strings, finite numbers, booleans, None (the
    tests compare the two); TypeError for anything else."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float) and value - value == 0:  # finite
        return float.__repr__(value)
    inner, outer = "\n" + " " * (level + 1), "\n" + " " * level
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        if not value:
            return "{}"
        items = (_json_string(k) + ": " + to_json(value[k], level + 1) for k in sorted(value))
        return "{" + inner + ("," + inner).join(items) + outer + "}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        return "[" + inner + ("," + inner).join(to_json(v, level + 1) for v in value) + outer + "]"
    raise TypeError("Object of type %s is not JSON serializable" % type(value).__name__)


def _extend_unique(target: list, items) -> None:
    for item in items:
        if item not in target:
            target.append(item)


def _join_path(prefix: list[str], rest: str | None) -> str:
    parts = list(prefix)
    if rest:
        parts.extend(p for p in rest.split(":") if p and p not in parts)
    return ":".join(parts)


def default_plan_path(rootfs: str) -> str:
    """Where the caller writes the plan of a rootfs: beside it, never inside it."""
    return rootfs.rstrip("/") + ".injection.json"
