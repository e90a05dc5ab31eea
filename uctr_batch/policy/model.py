"""The resolved per-node policy as plain data, and the pure helpers around it.

Nothing here imports yaml or jsonschema: uctr-exec reads a cached NodePolicy on every rank
(``NodePolicy.from_dict``), so this module must stay cheap to import.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import copy
import os
import re
from collections.abc import Mapping

from uctr_batch.errors import ConfigError, ModeError
from uctr_batch.records import Frozen, plain

MODES = ("N1", "R1", "P1", "P2", "F1", "S1")

# Host variables that always reach the payload (issue 3 "Same semantics in every mode").
# Policy passthrough lists add to these; they cannot remove them, because the PMI/PMIx
# wiring of every launcher depends on them.
DEFAULT_PASSTHROUGH = (
    "SLURM_*", "PMI_*", "PMIX_*", "OMPI_*", "PALS_*", "PBS_*",
    "MPI_LOCALRANKID", "MPI_LOCALNRANKS",  # MPICH hydra's local rank
    "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
    "TERM", "HOME", "USER",
)

# The only names ${...} may use in storage paths and bind paths (see path_variables).
PATH_VARIABLES = ("UID", "GID", "USER", "HOME", "HOSTNAME", "JOB_ID", "SLURM_JOB_ID", "PBS_JOBID")
_VAR_RE = re.compile(r"\$\{([^}]*)\}")

# Version of NodePolicy.to_dict(); a cached file with another version is re-resolved.
FORMAT = 1


def builtin_body() -> dict:
    """The class body in effect before `defaults` and any class apply (a fresh copy)."""
    return {
        "modes": list(MODES),
        "user_modes": list(MODES),
        "binds": [],
        "devices": [],
        "env": {"set": {}, "prepend": {}, "append": {}, "unset": [],
                "passthrough": list(DEFAULT_PASSTHROUGH)},
        "storage": {"cache_dir": None, "local_dir": None, "local_quota": None,
                    "stage_timeout": 600},
        "registries": {"allow": [], "deny": [], "mirrors": {}, "insecure": [], "ca_file": None},
        "mpi": {"profile": "none", "fallback": True},
        "gpu": {"vendor": "auto", "cuda_check": "warn"},
        "munge": False,
        "munge_socket": "/run/munge/munge.socket.2",
        "pmix": True,
        "readonly_rootfs": False,
        "container_engines": {},  # PBS Professional's container_engine=NAME -> a mode or auto
    }


# Lists that accumulate from built-ins to `defaults` to the class (they add plumbing or
# safety a class should not lose by accident). Every other list, and every scalar, replaces.
EXTEND_KEYS = frozenset({
    ("binds",), ("devices",), ("env", "unset"), ("env", "passthrough"), ("registries", "deny"),
})


def merge_body(base: Mapping, over: Mapping, _path: tuple[str, ...] = ()) -> dict:
    """Layer class body `over` on `base`: mappings merge key by key, EXTEND_KEYS lists
    accumulate (binds de-duplicated by dst, the later one winning), the rest replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        path = _path + (key,)
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = merge_body(old, value, path)
        elif path in EXTEND_KEYS and isinstance(old, list):
            out[key] = _extend(path, old, list(value))
        else:
            out[key] = copy.deepcopy(value)
    return out


def _extend(path: tuple[str, ...], old: list, new: list) -> list:
    if path == ("binds",):
        by_dst = {_bind_dst(b): b for b in old}
        for b in new:
            by_dst.pop(_bind_dst(b), None)
        return [b for b in old if _bind_dst(b) in by_dst] + copy.deepcopy(new)
    return old + [v for v in new if v not in old]


def _bind_dst(b: Mapping) -> str:
    return b.get("dst") or b["src"]


MAX_SIZE = 1 << 60  # 1 EiB, the schema's bound too
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text) -> int:
    """'20G' -> 21474836480. Suffixes K, M, G, T, P are powers of 1024; 'GiB'/'GB' alike."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"not a size: {text!r}",
                          "use a number with an optional K, M, G, T or P suffix, e.g. 20G")
    power = "KMGTP".find(m.group(2).upper()) + 1 if m.group(2) else 0
    size = float(m.group(1)) * 1024 ** power  # inf for 400 digits: refused below
    if not size <= MAX_SIZE:
        raise ConfigError(f"size too large: {str(text)[:40]!r}", "sizes go up to 1024P (1 EiB)")
    return int(size)


def template_variables(template: str) -> list[str]:
    """The ${NAME} references in a path template."""
    return _VAR_RE.findall(template)


def path_variables(uid: int | None = None, gid: int | None = None,
                   env: Mapping[str, str] | None = None,
                   node: str | None = None) -> dict[str, str]:
    """Values for ${...} in storage and bind paths, for user `uid` (default: the caller).

    USER and HOME come from the password database, not the environment, so a root hook
    expanding paths for a job's user gets that user's values. JOB_ID is the Slurm or PBS
    job id, or 'nojob' outside a batch job; SLURM_JOB_ID and PBS_JOBID are only defined in
    such a job.
    """
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    user, home, pw_gid = str(uid), "/", None
    try:
        import pwd

        pw = pwd.getpwuid(uid)
        user, home, pw_gid = pw.pw_name, pw.pw_dir, pw.pw_gid
    except (KeyError, ImportError):
        pass
    if gid is None:
        gid = pw_gid if pw_gid is not None else os.getgid()
    values = {
        "UID": str(uid), "GID": str(gid), "USER": user, "HOME": home,
        "HOSTNAME": (node or os.uname().nodename).split(".")[0],
        "JOB_ID": env.get("SLURM_JOB_ID") or env.get("PBS_JOBID") or "nojob",
    }
    for name in ("SLURM_JOB_ID", "PBS_JOBID"):
        if env.get(name):
            values[name] = env[name]
    return values


def expand(template: str, variables: Mapping[str, str]) -> str:
    """Replace ${NAME} in a policy path; an undefined name is a ConfigError."""
    def one(m) -> str:
        name = m.group(1)
        if name not in variables:
            hint = "use ${JOB_ID}, which is 'nojob' outside a batch job" if name in PATH_VARIABLES \
                else "the policy may use ${" + "}, ${".join(PATH_VARIABLES) + "}"
            raise ConfigError(
                f"policy path {template!r} uses ${{{name}}}, which is not set here", hint)
        return variables[name]

    return _VAR_RE.sub(one, template)


# Plain records, not dataclasses (records.py): every Slurm prolog and epilog builds a
# NodePolicy, and building these eight classes with dataclasses cost ~4.5 ms of a warm hook.
class Bind(Frozen):
    __slots__ = ("src", "dst", "mode", "optional")
    # mode: "ro" | "rw"; optional: a missing src is skipped instead of being an error
    _DEFAULTS = {"mode": "ro", "optional": False}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Bind":
        return cls(d["src"], d.get("dst") or d["src"], d.get("mode", "ro"),
                   bool(d.get("optional", False)))


class EnvRules(Frozen):
    """Applied after the image Env, in this order: set, prepend, append, unset; then the
    host variables matching `passthrough` (fnmatch patterns), then the user's -e."""
    __slots__ = ("set", "prepend", "append", "unset", "passthrough")
    # set, prepend (VALUE + ":" + old value), append (old value + ":" + VALUE): dict[str, str];
    # unset, passthrough: tuple[str, ...]
    _DEFAULTS = {"set": dict, "prepend": dict, "append": dict, "unset": (), "passthrough": ()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "EnvRules":
        return cls(dict(d.get("set", {})), dict(d.get("prepend", {})), dict(d.get("append", {})),
                   tuple(d.get("unset", ())), tuple(d.get("passthrough", ())))


class Storage(Frozen):
    __slots__ = ("cache_dir", "local_dir", "local_quota", "local_quota_bytes", "stage_timeout")
    # cache_dir, local_dir: templates, None: settings.default_cache_dir()/default_local_dir();
    # local_quota: as written, e.g. "20G", None: no quota; stage_timeout: seconds a rank
    # waits for another rank's staging
    _DEFAULTS = {"cache_dir": None, "local_dir": None, "local_quota": None,
                 "local_quota_bytes": None, "stage_timeout": 600.0}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Storage":
        quota = d.get("local_quota")
        quota_bytes = d.get("local_quota_bytes")
        if quota is not None and quota_bytes is None:
            quota_bytes = parse_size(quota)
        return cls(d.get("cache_dir"), d.get("local_dir"), None if quota is None else str(quota),
                   quota_bytes, float(d.get("stage_timeout", 600)))


class Registries(Frozen):
    __slots__ = ("allow", "deny", "mirrors", "insecure", "ca_file")
    # allow, deny: fnmatch on canonical references (allow empty: all); mirrors: registry ->
    # tuple of mirrors
    _DEFAULTS = {"allow": (), "deny": (), "mirrors": dict, "insecure": (), "ca_file": None}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Registries":
        mirrors = {k: tuple(v) for k, v in (d.get("mirrors") or {}).items()}
        return cls(tuple(d.get("allow", ())), tuple(d.get("deny", ())), mirrors,
                   tuple(d.get("insecure", ())), d.get("ca_file"))


class MpiSettings(Frozen):
    __slots__ = ("profile", "fallback")
    # profile: a name from mpi_profiles, "auto" or "none"; fallback False: an injection
    # refusal is an error, not a fallback
    _DEFAULTS = {"profile": "none", "fallback": True}

    @classmethod
    def from_dict(cls, d: Mapping) -> "MpiSettings":
        return cls(d.get("profile", "none"), bool(d.get("fallback", True)))


class GpuSettings(Frozen):
    __slots__ = ("vendor", "cuda_check")  # auto | nvidia | amd | none; warn | error | ignore
    _DEFAULTS = {"vendor": "auto", "cuda_check": "warn"}

    @classmethod
    def from_dict(cls, d: Mapping) -> "GpuSettings":
        return cls(d.get("vendor", "auto"), d.get("cuda_check", "warn"))


class MpiProfile(Frozen):
    __slots__ = ("name", "family", "lib_dirs", "libs", "dependency_libs", "env", "binds",
                 "devices", "abi_check")
    # family: mpich-abi | openmpi; env: EnvRules; binds: tuple of Bind; abi_check: major |
    # full | strict
    _DEFAULTS = {"lib_dirs": (), "libs": (), "dependency_libs": (), "env": EnvRules,
                 "binds": (), "devices": (), "abi_check": "full"}

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> "MpiProfile":
        return cls(name, d["family"], tuple(d.get("lib_dirs", ())), tuple(d.get("libs", ())),
                   tuple(d.get("dependency_libs", ())), EnvRules.from_dict(d.get("env", {})),
                   tuple(Bind.from_dict(b) for b in d.get("binds", ())),
                   tuple(d.get("devices", ())), d.get("abi_check", "full"))


class NodePolicy(Frozen):
    """What the site policy says for one node: the merged class body plus where it came from.

    Plain data: to_dict() is JSON-serialisable and from_dict() rebuilds it without yaml.
    """
    __slots__ = (
        "node", "partition",
        "features",  # tuple[str, ...]
        "class_name",  # None: no class matched, `defaults` apply
        "reason",  # e.g. 'matched class "gpu" by hostlist gpu[001-128]'
        "modes", "user_modes",  # tuple[str, ...]
        "binds",  # tuple[Bind, ...]
        "devices",  # tuple[str, ...]
        "env", "storage", "registries", "mpi", "gpu",  # EnvRules, Storage, ... GpuSettings
        "munge", "munge_socket", "pmix", "readonly_rootfs",
        "mpi_profiles",  # dict[str, MpiProfile]
        "sources",  # policy files read, main file first
        "fingerprint",  # policy_fingerprint() of the watched paths at load time
        "builtin",  # True: no (trusted) policy file, built-in defaults
        "container_engines",  # engine -> mode|auto
    )
    _DEFAULTS = {"mpi_profiles": dict, "sources": (), "fingerprint": "", "builtin": False,
                 "container_engines": dict}

    @classmethod
    def from_body(cls, body: Mapping, profiles: Mapping[str, Mapping], **where) -> "NodePolicy":
        """Build from a merged class body (see merge_body) and the policy's mpi_profiles."""
        return cls(
            modes=tuple(body["modes"]), user_modes=tuple(body["user_modes"]),
            binds=tuple(Bind.from_dict(b) for b in body["binds"]),
            devices=tuple(body["devices"]), env=EnvRules.from_dict(body["env"]),
            storage=Storage.from_dict(body["storage"]),
            registries=Registries.from_dict(body["registries"]),
            mpi=MpiSettings.from_dict(body["mpi"]), gpu=GpuSettings.from_dict(body["gpu"]),
            munge=bool(body["munge"]), munge_socket=body["munge_socket"], pmix=bool(body["pmix"]),
            readonly_rootfs=bool(body["readonly_rootfs"]),
            mpi_profiles={n: MpiProfile.from_dict(n, p) for n, p in profiles.items()},
            container_engines=dict(body.get("container_engines") or {}),
            **where,
        )

    def to_dict(self) -> dict:
        d = plain(self)
        for profile in d["mpi_profiles"].values():
            del profile["name"]  # the key already says it
        d["format"] = FORMAT
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "NodePolicy":
        if d.get("format") != FORMAT:
            raise ConfigError(
                f"cached node policy has format {d.get('format')!r}, expected {FORMAT}",
                "delete the cached file; it is rebuilt from the policy")
        keys = ("node", "partition", "class_name", "reason", "fingerprint", "builtin")
        where = {k: d[k] for k in keys}
        where.update(features=tuple(d["features"]), sources=tuple(d["sources"]))
        return cls.from_body(d, d.get("mpi_profiles", {}), **where)

    def mode_ladder(self, requested: str | None = None) -> tuple[str, ...]:
        """The modes to try in order: the class ladder, or just the user's --mode if allowed."""
        if requested is None:
            return self.modes
        if requested not in MODES:
            raise ModeError(f"unknown mode: {requested}", "modes are " + ", ".join(MODES))
        if requested not in self.user_modes:
            allowed = ", ".join(self.user_modes) or "none"
            raise ModeError(
                f"mode {requested} is not allowed on node {self.node} ({self._class_words()})",
                f"modes users may choose here: {allowed}; see `uctr policy explain`")
        return (requested,)

    def selected_mpi(self, requested: str | None = None) -> tuple[str, MpiProfile | None]:
        """('none', None), ('auto', None) or (name, MpiProfile) for --mpi or the class setting."""
        name = requested or self.mpi.profile
        if name in ("none", "auto"):
            return name, None
        if name not in self.mpi_profiles:
            known = ", ".join(sorted(self.mpi_profiles)) or "none defined"
            raise ConfigError(f"unknown MPI profile: {name}",
                              f"profiles in the site policy: {known}; or use auto or none")
        return name, self.mpi_profiles[name]

    def _class_words(self) -> str:
        return f'class "{self.class_name}"' if self.class_name else "policy defaults"

