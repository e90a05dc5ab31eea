"""Node -> first matching class -> NodePolicy (the merged class body, plain data).

A class matches when every criterion in its `match` holds (hostlist, regex, features,
partition); classes are tried in order and the first match wins; with no match, `defaults`
apply. The class body is layered as built-in < defaults < class (model.merge_body).
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import functools
import os
import re
from collections.abc import Iterable, Mapping, Sequence

from uctr_batch import log, settings
from uctr_batch.errors import UctrError
from uctr_batch.policy.load import Policy, load_policy
from uctr_batch.policy.model import NodePolicy, builtin_body, merge_body
from uctr_batch.records import Frozen

_log = log.get("policy")


class MatchResult(Frozen):
    __slots__ = ("class_name", "matched", "why")  # why: the criteria that matched, or the
    # first one that did not


def short_name(host: str) -> str:
    return host.split(".")[0]


def current_node(env: Mapping[str, str] | None = None) -> str:
    """Slurm's name for this node (SLURMD_NODENAME), else the short host name."""
    env = os.environ if env is None else env
    return short_name(env.get("SLURMD_NODENAME") or os.uname().nodename)


def current_partition(env: Mapping[str, str] | None = None) -> str | None:
    """The job's Slurm partition or PBS queue; None outside a job."""
    env = os.environ if env is None else env
    return env.get("SLURM_JOB_PARTITION") or env.get("PBS_QUEUE") or None


def node_features(node: str) -> tuple[str, ...]:
    """Slurm's ActiveFeatures of `node` via scontrol; () where Slurm cannot tell."""
    from uctr_batch import proc

    try:
        cp = proc.run(["scontrol", "show", "node", "-o", node], check=False, timeout=10)
    except UctrError as e:
        _log.debug("node features unknown: %s", e)
        return ()
    out = cp.stdout.decode(errors="replace")
    m = re.search(r"\bActiveFeatures=(\S*)", out) or re.search(r"\bFeatures=(\S*)", out)
    if cp.returncode != 0 or not m:
        return ()
    return tuple(f for f in m.group(1).split(",") if f and f != "(null)")


@functools.lru_cache(maxsize=64)
def _hostlist_members(expression: str) -> frozenset[str]:
    import hostlist

    return frozenset(hostlist.expand_hostlist(expression))


def _criteria(match: Mapping, node: str, partition: str | None,
              features: frozenset[str]) -> Iterable[tuple[bool, str]]:
    """(holds, words) for each criterion of a class's match, in a fixed order."""
    if "hostlist" in match:
        expr = match["hostlist"]
        ok = node in _hostlist_members(expr)
        yield ok, f"hostlist {expr}" if ok else f"node {node} is not in hostlist {expr}"
    if "regex" in match:
        rx = match["regex"]
        ok = re.fullmatch(rx, node) is not None
        yield ok, f"regex {rx}" if ok else f"node {node} does not match regex {rx}"
    if "features" in match:
        missing = [f for f in match["features"] if f not in features]
        yield not missing, ("features " + ",".join(match["features"]) if not missing
                            else f"node lacks feature(s) {','.join(missing)}")
    if "partition" in match:
        want = match["partition"]
        want = [want] if isinstance(want, str) else list(want)
        ok = partition in want
        words = "/".join(want)
        if ok:
            yield True, f"partition {partition}"
        elif partition is None:
            yield False, f"no partition known (wants {words}; outside a job give --partition)"
        else:
            yield False, f"partition {partition} is not {words}"


def match_trace(classes: Sequence[Mapping], node: str, partition: str | None = None,
                features: Iterable[str] = ()) -> list[MatchResult]:
    """Each class tried in order up to and including the first that matches."""
    features = frozenset(features)
    trace = []
    for cls in classes:
        results = list(_criteria(cls["match"], node, partition, features))
        failed = [words for ok, words in results if not ok]
        matched = not failed
        why = " and ".join(words for _, words in results) if matched else failed[0]
        trace.append(MatchResult(cls["name"], matched, why))
        if matched:
            break
    return trace


def _uses_features(classes: Sequence[Mapping]) -> bool:
    return any("features" in c["match"] for c in classes)


def resolve(policy: Policy, node: str | None = None, partition: str | None = None,
            features: Iterable[str] | None = None,
            env: Mapping[str, str] | None = None) -> NodePolicy:
    """The NodePolicy of `node` (default: this node) for a load.Policy.

    partition defaults to the job's (SLURM_JOB_PARTITION / PBS_QUEUE); features default to
    Slurm's ActiveFeatures of the node, asked only when some class matches on features.
    """
    node = short_name(node or current_node(env))
    if partition is None:
        partition = current_partition(env)
    if features is None:
        features = node_features(node) if _uses_features(policy.classes) else ()
    features = tuple(sorted(set(features)))
    trace = match_trace(policy.classes, node, partition, features)
    body = merge_body(builtin_body(), policy.defaults)
    hit = trace[-1] if trace and trace[-1].matched else None
    if hit:
        cls = next(c for c in policy.classes if c["name"] == hit.class_name)
        body = merge_body(body, {k: v for k, v in cls.items() if k not in ("name", "match")})
        reason = f'matched class "{hit.class_name}" by {hit.why}'
    elif policy.builtin:
        reason = "no site policy: built-in defaults"
    else:
        reason = "no class matched: policy defaults apply"
    return NodePolicy.from_body(
        body, policy.mpi_profiles, node=node, partition=partition, features=features,
        class_name=hit.class_name if hit else None, reason=reason,
        sources=tuple(policy.sources), fingerprint=policy.fingerprint, builtin=policy.builtin)


def current_node_policy(node: str | None = None, partition: str | None = None,
                        features: Iterable[str] | None = None,
                        env: Mapping[str, str] | None = None) -> NodePolicy:
    """Load the (trusted) site policy and resolve it for this node: the one-call entry."""
    return resolve(load_policy(env=env), node, partition, features, env)


def registry_settings(node_policy: NodePolicy) -> settings.RegistryConfig:
    """The policy's registry rules as the `base` of settings.registry_config()."""
    r = node_policy.registries
    return settings.RegistryConfig(insecure=tuple(r.insecure), mirrors=dict(r.mirrors),
                                   ca_file=r.ca_file, allow=tuple(r.allow), deny=tuple(r.deny))
