"""Where things live and how to reach registries, from environment and command line.

Precedence: command-line flag > UCTR_* environment > site policy (added by the policy layer)
> built-in default. Only this module reads these environment variables.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple


def _split(value: str) -> Tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def default_cache_dir() -> Path:
    """Shared cache of compressed blobs: UCTR_CACHE, else $XDG_CACHE_HOME/uctr, else ~/.cache/uctr."""
    if os.environ.get("UCTR_CACHE"):
        return Path(os.environ["UCTR_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "uctr"


def default_local_dir() -> Path:
    """Node-local root filesystems: UCTR_LOCAL_DIR, else /tmp/uctr-$UID."""
    if os.environ.get("UCTR_LOCAL_DIR"):
        return Path(os.environ["UCTR_LOCAL_DIR"])
    return Path("/tmp") / f"uctr-{os.getuid()}"


def default_config_dir() -> Path:
    """Per-user configuration (credentials): UCTR_CONFIG_DIR, else ~/.config/uctr."""
    if os.environ.get("UCTR_CONFIG_DIR"):
        return Path(os.environ["UCTR_CONFIG_DIR"])
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "uctr"


@dataclass(frozen=True)
class RegistryConfig:
    insecure: Tuple[str, ...] = ()  # host[:port] allowed over plain HTTP
    mirrors: Dict[str, Tuple[str, ...]] = field(default_factory=dict)  # registry -> mirror URLs
    ca_file: Optional[str] = None  # extra CA bundle for TLS
    parallel: int = 4  # concurrent blob downloads
    connect_timeout: float = 10.0
    stall_timeout: float = 30.0  # no byte for this long aborts a transfer (then retried)
    retries: int = 5
    allow: Tuple[str, ...] = ()  # fnmatch patterns on canonical references; empty = all
    deny: Tuple[str, ...] = ()


def _parse_mirrors(value: str) -> Dict[str, Tuple[str, ...]]:
    """UCTR_REGISTRY_MIRRORS="docker.io=https://m1,https://m2;quay.io=http://m3"."""
    mirrors: Dict[str, Tuple[str, ...]] = {}
    for item in value.split(";"):
        if "=" in item:
            reg, urls = item.split("=", 1)
            mirrors[reg.strip()] = _split(urls)
    return mirrors


def registry_config(args=None, base: Optional[RegistryConfig] = None) -> RegistryConfig:
    """Combine policy defaults (base), environment and command-line flags."""
    cfg = base or RegistryConfig()
    env = os.environ
    insecure = cfg.insecure + _split(env.get("UCTR_INSECURE_REGISTRIES", ""))
    mirrors = dict(cfg.mirrors)
    mirrors.update(_parse_mirrors(env.get("UCTR_REGISTRY_MIRRORS", "")))
    ca_file = env.get("UCTR_TLS_CA") or cfg.ca_file
    parallel = int(env.get("UCTR_PARALLEL") or cfg.parallel)
    stall = float(env.get("UCTR_STALL_TIMEOUT") or cfg.stall_timeout)
    retries = int(env.get("UCTR_RETRIES") or cfg.retries)
    if args is not None:
        insecure += tuple(getattr(args, "insecure_registry", None) or ())
        ca_file = getattr(args, "tls_ca", None) or ca_file
        parallel = getattr(args, "parallel", None) or parallel
    return RegistryConfig(
        insecure=insecure, mirrors=mirrors, ca_file=ca_file, parallel=max(1, parallel),
        connect_timeout=cfg.connect_timeout, stall_timeout=stall, retries=retries,
        allow=cfg.allow, deny=cfg.deny,
    )
