"""Site policy: schema-checked YAML -> per-node NodePolicy (see docs/policy.md).

    policy = load_policy()                  # /etc/uctr/policy.yaml (UCTR_POLICY), conf.d/*.yaml
    np = resolve(policy, node="gpu017")     # first matching class, merged with defaults
    np.mode_ladder(args.mode)               # modes to try; ModeError if --mode is not allowed
    NodePolicy.from_dict(json.load(f))      # cached copy; imports neither yaml nor jsonschema

The names below are imported on first use (PEP 562), so `import uctr_batch.policy.model` on
the per-rank path does not drag in the loader; yaml, jsonschema and hostlist are imported
only inside the functions that need them.
"""

import importlib

_EXPORTS = {
    "load": ("Policy", "PolicyInvalid", "Problem", "check_file", "load_policy"),
    "model": ("DEFAULT_PASSTHROUGH", "MODES", "PATH_VARIABLES", "Bind", "EnvRules", "GpuSettings",
              "MpiProfile", "MpiSettings", "NodePolicy", "Registries", "Storage", "expand",
              "parse_size", "path_variables"),
    "paths": ("current_fingerprint", "policy_fingerprint", "policy_path", "untrusted_reason",
              "watched_paths"),
    "resolver": ("current_node", "current_node_policy", "current_partition", "match_trace",
                "registry_settings", "resolve"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
