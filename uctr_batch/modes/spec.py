"""RunSpec: everything a mode needs to start one container, as immutable plain data.

Built by `uctr run` (uctr_batch.run.build_spec) and by the per-rank launcher; consumed by
every mode's probe() and exec(). It is JSON-serialisable through to_dict()/from_dict().

Why not a dataclass: this module sits on the per-rank hot path, and importing dataclasses
(which imports inspect, re, ...) costs more than the whole N1 start budget (measured 25 ms
vs a 12 ms `python3 -c pass` floor on the 2-core CI VM). The class below keeps the same
contract as a frozen dataclass: keyword construction, immutability, ==, repr, replace().

Fields:
  rootfs    absolute path of the root filesystem directory
  argv      the command, argv[0] resolved in the container's PATH by the mode
  env       the final environment (see uctr_batch.envspec for the precedence)
  cwd       working directory inside the container
  binds     ((host_src, container_dst, read_only), ...), applied in order
  devices   host device paths made visible under /dev besides the standard nodes
  uid, gid  ids inside the container: the caller's own, or 0 with --root
  readonly  mount the rootfs read-only
  passwd, group  host files to show as /etc/passwd and /etc/group (None: the image's own)
  state_dir per-user node-local scratch directory modes may use (never inside the rootfs)

Not fields because they are the same for every run: the hostname is the host's, the host
network is shared, no PID/IPC/UTS namespace is created.
"""

import os

_FIELDS = ("rootfs", "argv", "env", "cwd", "binds", "devices", "uid", "gid", "readonly",
           "passwd", "group", "state_dir")


class RunSpec:
    __slots__ = _FIELDS

    def __init__(self, rootfs, argv, env=None, cwd="/", binds=(), devices=(), uid=None, gid=None,
                 readonly=False, passwd=None, group=None, state_dir=None):
        values = {
            "rootfs": str(rootfs),
            "argv": tuple(str(a) for a in argv),
            "env": dict(env or {}),
            "cwd": str(cwd),
            "binds": tuple((str(s), str(d), bool(ro)) for s, d, ro in binds),
            "devices": tuple(str(d) for d in devices),
            "uid": os.getuid() if uid is None else int(uid),
            "gid": os.getgid() if gid is None else int(gid),
            "readonly": bool(readonly),
            "passwd": None if passwd is None else str(passwd),
            "group": None if group is None else str(group),
            "state_dir": None if state_dir is None else str(state_dir),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("RunSpec is immutable; use spec.replace(%s=...)" % name)

    def __delattr__(self, name):
        raise AttributeError("RunSpec is immutable")

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in _FIELDS)

    __hash__ = None  # env is a dict, like a frozen dataclass holding a dict

    def __repr__(self):
        return "RunSpec(%s)" % ", ".join("%s=%r" % (f, getattr(self, f)) for f in _FIELDS)

    def replace(self, **changes):
        """A copy with some fields changed (dataclasses.replace)."""
        values = self.to_dict()
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise TypeError("unknown RunSpec field(s): %s" % ", ".join(sorted(unknown)))
        values.update(changes)
        return RunSpec(**values)

    def to_dict(self):
        """Plain JSON-ready data (tuples become lists)."""
        d = {f: getattr(self, f) for f in _FIELDS}
        d["argv"] = list(self.argv)
        d["env"] = dict(self.env)
        d["binds"] = [list(b) for b in self.binds]
        d["devices"] = list(self.devices)
        return d

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - set(_FIELDS)
        if unknown:
            raise ValueError("unknown RunSpec field(s): %s" % ", ".join(sorted(unknown)))
        return cls(**d)

    @property
    def root(self):
        """True when the payload runs as uid 0 inside (uctr run --root)."""
        return self.uid == 0


_CONFIG_LISTS = ("Env", "Entrypoint", "Cmd")
_CONFIG_STRINGS = ("WorkingDir", "User")


def check_config(config, where: str):
    """The image runtime config (Env, Entrypoint, Cmd, WorkingDir, User) as the modes need it:
    lists of strings and strings, none with a NUL byte or a lone surrogate (an image config
    may carry "\\u0000" or "\\ud800", which no exec, path or environment can hold); raises
    UctrError (exit 1) naming the field.
    Called where a bundle's image.json is read (uctr run, uctr-exec)."""
    from uctr_batch.errors import UctrError

    def bad(field, why):
        return UctrError("the image config of %s is unusable: %s %s" % (where, field, why),
                         "fix the image's config (%s), then recreate the bundle: "
                         "uctr rm %s && uctr create IMAGE" % (field, where))

    if config is None:
        return {}
    if not isinstance(config, dict):
        raise bad("config", "is not a JSON object")
    for key in _CONFIG_LISTS:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise bad(key, "is not a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise bad("%s[%d]" % (key, i), "is not a string")
            why = _unusable_text(item)
            if why:
                raise bad("%s[%d]" % (key, i), why)
    for key in _CONFIG_STRINGS:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise bad(key, "is not a string")
        why = _unusable_text(value)
        if why:
            raise bad(key, why)
    return config


def _unusable_text(text: str):
    """Why text cannot be an exec argument, variable or path, or None."""
    if "\0" in text:
        return "contains a NUL byte"
    try:  # JSON "\ud800": a lone surrogate has no byte form
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    return None
