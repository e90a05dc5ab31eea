"""Read what injection needs from a policy: a resolved NodePolicy (uctr_batch.policy.model,
attributes) or a plain dict of the same shape (tests, cached JSON). Importing the policy
package is not needed for either."""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

from _collections_abc import Mapping  # not collections.abc: see inject/plan.py

_ENV_RULE_KEYS = frozenset(["set", "prepend", "append", "unset", "passthrough"])


def get(obj: object, key: str, default: object = None) -> object:
    """obj[key] for a mapping, obj.key otherwise; default when absent or obj is None."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        value = obj.get(key, default)
    else:
        value = getattr(obj, key, default)
    return default if value is None else value


def setting(policy: object, section: str, key: str, default: object = None) -> object:
    """policy.<section>.<key>, e.g. setting(policy, "gpu", "cuda_check", "warn")."""
    return get(get(policy, section), key, default)


def env_rules(env: object) -> tuple[dict[str, str], dict[str, str], dict[str, str], list[str]]:
    """(set, prepend, append, unset) from an EnvRules, a {set: ..., prepend: ...} mapping, or a
    plain {NAME: VALUE} mapping (all of it 'set')."""
    if env is None:
        return {}, {}, {}, []
    if isinstance(env, Mapping) and not (set(env) <= _ENV_RULE_KEYS):
        return {str(k): str(v) for k, v in env.items()}, {}, {}, []
    return (
        dict(get(env, "set", {})),
        dict(get(env, "prepend", {})),
        dict(get(env, "append", {})),
        list(get(env, "unset", ())),
    )


def bind_spec(spec: object) -> tuple[str, str, bool, bool]:
    """(src, dst, read_only, optional) from a policy Bind, a mapping, or 'SRC[:DST[:ro|rw]]'."""
    if isinstance(spec, str):
        parts = spec.split(":")
        src = parts[0]
        dst = parts[1] if len(parts) > 1 and parts[1] else src
        mode = parts[2] if len(parts) > 2 else "ro"
        return src, dst, mode != "rw", False
    src = get(spec, "src")
    dst = get(spec, "dst", src) or src
    mode = get(spec, "mode", None)
    ro = (mode != "rw") if mode is not None else bool(get(spec, "ro", True))
    return src, dst, ro, bool(get(spec, "optional", False))
