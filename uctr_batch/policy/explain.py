"""`uctr policy check FILE...` and `uctr policy explain`: what the policy says, and why.

check validates any file, trusted or not (it only reads it). explain loads the policy the
way every other command does (trust enforced), resolves it for a node and prints the
matched class, the classes tried before it, the mode ladder with each mode's probe, and
the effective binds, env, storage, registries and MPI/GPU settings.
"""

import json
import sys
from typing import Dict, List

from uctr_batch import log, settings
from uctr_batch.errors import ConfigError, EXIT_OK, EXIT_USER
from uctr_batch.policy.load import Policy, check_file, load_policy
from uctr_batch.policy.model import NodePolicy, expand, path_variables
from uctr_batch.policy.resolver import current_node, match_trace, resolve

_log = log.get("policy")


def cmd_policy(args) -> int:
    return {"check": cmd_check, "explain": cmd_explain}[args.policy_command](args)


def cmd_check(args) -> int:
    """Print every problem as error:/hint: lines; stdout gets one 'ok:' line per good file."""
    status = EXIT_OK
    for path in args.file:
        problems, policy, notes = check_file(path)
        for note in notes:
            _log.warning("%s", note)
        for p in problems:
            sys.stderr.write(f"error: {p}\n" + (f"hint: {p.hint}\n" if p.hint else ""))
        if problems:
            status = EXIT_USER
            continue
        extra = len(policy.sources) - 1
        print(f"ok: {path}" + (f" (+{extra} drop-in{'s' if extra != 1 else ''})" if extra else "")
              + f": {len(policy.classes)} classes, {len(policy.mpi_profiles)} MPI profiles")
    return status


def cmd_explain(args) -> int:
    policy = load_policy()
    features = None if args.features is None else [f for f in args.features.split(",") if f]
    np = resolve(policy, node=args.node, partition=args.partition, features=features)
    trace = match_trace(policy.classes, np.node, np.partition, np.features)
    local = args.node is None or np.node == current_node()
    probes = mode_probes(np.modes + tuple(m for m in np.user_modes if m not in np.modes), local)
    paths = storage_paths(np)
    if args.json:
        print(json.dumps(explain_data(policy, np, trace, probes, paths), indent=2))
    else:
        sys.stdout.write(explain_text(policy, np, trace, probes, paths))
    return EXIT_OK


def mode_probes(names, local: bool) -> Dict[str, str]:
    """mode -> one line saying whether it works here (each mode's probe(), modes package)."""
    if not local:
        return {n: "not probed (--node names another node)" for n in names}
    try:
        from uctr_batch.modes import get_mode
    except ImportError:
        return {n: "(modes not available)" for n in names}
    return {n: _probe_words(get_mode, n) for n in names}


def _probe_words(get_mode, name: str) -> str:
    try:
        result = get_mode(name).probe()
    except ImportError as e:
        return f"(mode not available: {e})"
    except Exception as e:  # a broken probe must not break explain; say what it raised
        return f"probe failed: {e}"
    if not result.ok:
        return f"unavailable: {result.reason}"
    return "ok" + (f" ({result.version})" if getattr(result, "version", None) else "")


def storage_paths(np: NodePolicy) -> Dict[str, str]:
    """cache_dir/local_dir as they expand for the caller on that node (or why they don't)."""
    defaults = {"cache_dir": settings.default_cache_dir, "local_dir": settings.default_local_dir}
    out = {}
    for key, default in defaults.items():
        template = getattr(np.storage, key)
        if template is None:
            out[key] = f"{default()} (built-in default)"
            continue
        try:
            out[key] = expand(template, path_variables(node=np.node))
        except ConfigError as e:
            out[key] = f"(not expandable here: {e})"
    return out


def explain_data(policy: Policy, np: NodePolicy, trace, probes, paths) -> dict:
    return {
        "policy": {"path": str(policy.path), "sources": list(policy.sources),
                   "builtin": policy.builtin, "notes": list(policy.notes)},
        "classes_tried": [{"class": t.class_name, "matched": t.matched, "why": t.why}
                          for t in trace],
        "node_policy": np.to_dict(),
        "probes": probes,
        "storage_paths": paths,
    }


def explain_text(policy: Policy, np: NodePolicy, trace, probes, paths) -> str:
    lines: List[str] = []
    add = lines.append
    add("policy:     " + (", ".join(policy.sources) or "(built-in defaults)"))
    for note in policy.notes:
        add(f"            note: {note}")
    add(f"node:       {np.node}   partition: {np.partition or '-'}   "
        f"features: {','.join(np.features) or '-'}")
    add(f"class:      {np.class_name or '(none)'}: {np.reason}")
    for t in trace:
        if not t.matched:
            add(f"            skipped {t.class_name}: {t.why}")
    add("modes:      " + " -> ".join(np.modes) + "   (tried in this order)")
    for mode in probes:
        tag = "" if mode in np.modes else " (user-selectable only)"
        add(f"  {mode}{tag}: probe: {probes[mode]}")
    add("user may choose: " + (", ".join(np.user_modes) or "(none: --mode is refused)"))
    if np.container_engines:  # PBS: container_engine=NAME in select (PBS Professional)
        add("PBS container_engine: " + ", ".join(
            f"{name} -> {mode}" for name, mode in sorted(np.container_engines.items())))
    add("binds:" + ("" if np.binds else "      (none)"))
    for b in np.binds:
        add(f"  {b.src} -> {b.dst} ({b.mode}{', optional' if b.optional else ''})")
    add("devices:    " + (", ".join(np.devices) or "(none)"))
    lines += _env_lines(np)
    s = np.storage
    add("storage:")
    add(f"  cache_dir      {s.cache_dir or '-'}  -> {paths['cache_dir']}")
    add(f"  local_dir      {s.local_dir or '-'}  -> {paths['local_dir']}")
    add(f"  local_quota    {s.local_quota or 'none'}"
        + (f" ({s.local_quota_bytes} bytes)" if s.local_quota_bytes is not None else ""))
    add(f"  stage_timeout  {s.stage_timeout:g} s")
    lines += _registry_lines(np)
    lines += _mpi_gpu_lines(np)
    yes_no = {True: "yes", False: "no"}
    add(f"munge:      {'bind ' + np.munge_socket if np.munge else 'no'}   "
        f"pmix: {yes_no[np.pmix]}   readonly_rootfs: {yes_no[np.readonly_rootfs]}")
    return "\n".join(lines) + "\n"


def _env_lines(np: NodePolicy) -> List[str]:
    e = np.env
    out = ["env:"]
    out += [f"  set      {k}={v}" for k, v in e.set.items()]
    out += [f"  prepend  {k}={v}:${k}" for k, v in e.prepend.items()]
    out += [f"  append   {k}=${k}:{v}" for k, v in e.append.items()]
    if e.unset:
        out.append("  unset    " + " ".join(e.unset))
    out.append("  passthrough " + " ".join(e.passthrough))
    return out


def _registry_lines(np: NodePolicy) -> List[str]:
    r = np.registries
    out = ["registries:",
           "  allow    " + (" ".join(r.allow) or "(any)"),
           "  deny     " + (" ".join(r.deny) or "(none)")]
    out += [f"  mirror   {reg} -> {' '.join(urls)}" for reg, urls in r.mirrors.items()]
    if r.insecure:
        out.append("  insecure " + " ".join(r.insecure))
    if r.ca_file:
        out.append(f"  ca_file  {r.ca_file}")
    return out


def _mpi_gpu_lines(np: NodePolicy) -> List[str]:
    name, profile = np.selected_mpi()  # names were checked when the policy loaded
    mpi = f"mpi:        profile {name}"
    if profile is not None:
        mpi += f" (family {profile.family}, abi_check {profile.abi_check})"
    mpi += "" if np.mpi.fallback else "; no fallback: refusal is an error"
    return [mpi, f"gpu:        vendor {np.gpu.vendor}, cuda_check {np.gpu.cuda_check}"]

