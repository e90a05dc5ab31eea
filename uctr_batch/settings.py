"""Where things live and how to reach registries, from environment and command line.

Precedence: command-line flag > UCTR_* environment > site policy (added by the policy layer)
> built-in default. Only this module reads these environment variables.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import os
from pathlib import Path

from uctr_batch.envnum import number  # the one checked reader of numeric UCTR_* values
from uctr_batch.records import Frozen


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def env_dir(name: str) -> Path | None:
    """The directory in environment variable NAME (UCTR_CACHE, UCTR_LOCAL_DIR,
    UCTR_CONFIG_DIR), or None when unset; it must be absolute (a relative one would depend
    on each process's working directory, and ranks start in different ones)."""
    value = os.environ.get(name)
    if not value:
        return None
    if not value.startswith("/") or "\0" in value:
        from uctr_batch.errors import ConfigError

        shown = value if len(value) <= 80 else value[:80] + "..."
        raise ConfigError(f"{name} must be an absolute path: {shown!r}",
                          f"e.g. {name}=/scratch/$USER/uctr, or unset {name} for the default")
    return Path(value)


def default_cache_dir() -> Path:
    """Shared cache of compressed blobs: UCTR_CACHE, else $XDG_CACHE_HOME/uctr, else ~/.cache/uctr."""
    if os.environ.get("UCTR_CACHE"):
        return env_dir("UCTR_CACHE")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "uctr"


def default_local_dir() -> Path:
    """Node-local root filesystems: UCTR_LOCAL_DIR, else /tmp/uctr-$UID."""
    if os.environ.get("UCTR_LOCAL_DIR"):
        return env_dir("UCTR_LOCAL_DIR")
    return Path("/tmp") / f"uctr-{os.getuid()}"


def _policy_dir(node_policy, key: str) -> Path | None:
    """A storage path template from the site policy, expanded for the calling user."""
    template = getattr(getattr(node_policy, "storage", None), key, None)
    if not template:
        return None
    from uctr_batch.policy.model import expand, path_variables

    return Path(expand(template, path_variables()))


def cache_dir(node_policy=None) -> Path:
    """UCTR_CACHE > the policy's storage.cache_dir > ~/.cache/uctr."""
    if not os.environ.get("UCTR_CACHE"):
        return _policy_dir(node_policy, "cache_dir") or default_cache_dir()
    return default_cache_dir()


def local_dir(node_policy=None) -> Path:
    """UCTR_LOCAL_DIR > the policy's storage.local_dir > /tmp/uctr-$UID."""
    if not os.environ.get("UCTR_LOCAL_DIR"):
        return _policy_dir(node_policy, "local_dir") or default_local_dir()
    return default_local_dir()


def default_config_dir() -> Path:
    """Per-user configuration (credentials): UCTR_CONFIG_DIR, else ~/.config/uctr."""
    if os.environ.get("UCTR_CONFIG_DIR"):
        return env_dir("UCTR_CONFIG_DIR")
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "uctr"


class RegistryConfig(Frozen):
    __slots__ = ("insecure", "mirrors", "ca_file", "parallel", "connect_timeout",
                 "stall_timeout", "retries", "allow", "deny")
    # insecure: host[:port] allowed over plain HTTP; mirrors: registry -> mirror URLs; ca_file:
    # extra CA bundle for TLS; parallel: concurrent blob downloads; stall_timeout: no byte for
    # this long aborts a transfer (then retried); allow, deny: fnmatch patterns on canonical
    # references (allow empty: all)
    _DEFAULTS = {"insecure": (), "mirrors": dict, "ca_file": None, "parallel": 4,
                 "connect_timeout": 10.0, "stall_timeout": 30.0, "retries": 5, "allow": (),
                 "deny": ()}


def _parse_mirrors(value: str) -> dict[str, tuple[str, ...]]:
    """UCTR_REGISTRY_MIRRORS="docker.io=https://m1,https://m2;quay.io=http://m3"."""
    mirrors: dict[str, tuple[str, ...]] = {}
    for item in value.split(";"):
        if "=" in item:
            reg, urls = item.split("=", 1)
            mirrors[reg.strip()] = _split(urls)
    return mirrors


def registry_config(args=None, base: RegistryConfig | None = None) -> RegistryConfig:
    """Combine policy defaults (base), environment and command-line flags."""
    cfg = base or RegistryConfig()
    env = os.environ
    insecure = cfg.insecure + _split(env.get("UCTR_INSECURE_REGISTRIES", ""))
    mirrors = dict(cfg.mirrors)
    mirrors.update(_parse_mirrors(env.get("UCTR_REGISTRY_MIRRORS", "")))
    ca_file = env.get("UCTR_TLS_CA") or cfg.ca_file
    parallel = number("UCTR_PARALLEL", env, cfg.parallel)
    stall = number("UCTR_STALL_TIMEOUT", env, cfg.stall_timeout)
    retries = number("UCTR_RETRIES", env, cfg.retries)
    if args is not None:
        insecure += tuple(getattr(args, "insecure_registry", None) or ())
        ca_file = getattr(args, "tls_ca", None) or ca_file
        parallel = getattr(args, "parallel", None) or parallel  # checked by cli's flag type
    return RegistryConfig(
        insecure=insecure, mirrors=mirrors, ca_file=ca_file, parallel=max(1, parallel),
        connect_timeout=cfg.connect_timeout, stall_timeout=stall, retries=retries,
        allow=cfg.allow, deny=cfg.deny,
    )
