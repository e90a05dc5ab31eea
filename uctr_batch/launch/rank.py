"""Who am I? The rank context, from whichever launcher started this process.

Launchers are tried in a fixed order; the first whose variables are present wins. Each
answer also says which launcher it came from, for `-v` output and tests.
"""

import os
import socket
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional


@dataclass(frozen=True)
class RankContext:
    launcher: str  # slurm | pmix | ompi | hydra | pmi | pbs | pals | single
    rank: int
    size: int
    local_rank: int
    local_size: Optional[int]  # None when the launcher does not say
    node_id: Optional[int]
    job_id: str  # "" when not in a batch job
    step_id: str  # "" when not in a step
    hostname: str

    @property
    def step_key(self) -> str:
        """Identifies one job step on this node: ranks with the same key share a namespace."""
        if self.job_id:
            return f"{self.job_id}.{self.step_id or 'x'}"
        return f"pid{os.getppid()}"


def _int(env: Mapping[str, str], *names: str) -> Optional[int]:
    for name in names:
        value = env.get(name, "")
        if value.strip().lstrip("-").isdigit():
            return int(value)
    return None


def _tasks_per_node(value: str, node_id: Optional[int]) -> Optional[int]:
    """Expand SLURM_STEP_TASKS_PER_NODE like "2(x3),1" and pick this node's count."""
    counts: List[int] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if "(x" in item:
            n, rep = item.rstrip(")").split("(x")
            counts.extend([int(n)] * int(rep))
        elif item.isdigit():
            counts.append(int(item))
    if not counts:
        return None
    if node_id is not None and 0 <= node_id < len(counts):
        return counts[node_id]
    return counts[0] if len(set(counts)) == 1 else None


def _slurm(env) -> Optional[RankContext]:
    rank = _int(env, "SLURM_PROCID")
    if rank is None or "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return None
    node_id = _int(env, "SLURM_NODEID")
    local_size = _tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), node_id)
    return RankContext(
        "slurm", rank, _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1,
        _int(env, "SLURM_LOCALID") or 0, local_size, node_id,
        env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", "")),
        env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "")), "",
    )


def _ompi(env) -> Optional[RankContext]:
    rank = _int(env, "OMPI_COMM_WORLD_RANK")
    if rank is None:
        return None
    return RankContext(
        "ompi", rank, _int(env, "OMPI_COMM_WORLD_SIZE") or 1,
        _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0, _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"),
        _int(env, "OMPI_COMM_WORLD_NODE_RANK"), *_batch_ids(env), "",
    )


def _hydra(env) -> Optional[RankContext]:
    if "MPI_LOCALRANKID" not in env or _int(env, "PMI_RANK") is None:
        return None
    return RankContext(
        "hydra", _int(env, "PMI_RANK"), _int(env, "PMI_SIZE") or 1,
        _int(env, "MPI_LOCALRANKID") or 0, _int(env, "MPI_LOCALNRANKS"), None,
        *_batch_ids(env), "",
    )


def _pmix(env) -> Optional[RankContext]:
    rank = _int(env, "PMIX_RANK")
    if rank is None:
        return None
    return RankContext(
        "pmix", rank, _int(env, "PMIX_SIZE") or 1, _int(env, "PMIX_LOCAL_RANK") or 0,
        _int(env, "PMIX_LOCAL_SIZE"), None, env.get("PMIX_NAMESPACE", ""), "", "",
    )


def _pmi(env) -> Optional[RankContext]:
    rank = _int(env, "PMI_RANK")
    if rank is None:
        return None
    return RankContext(
        "pmi", rank, _int(env, "PMI_SIZE") or 1, _int(env, "PMI_LOCAL_RANK") or 0,
        _int(env, "PMI_LOCAL_SIZE"), None, *_batch_ids(env), "",
    )


def _pals(env) -> Optional[RankContext]:
    rank = _int(env, "PALS_RANKID")
    if rank is None:
        return None
    return RankContext(
        "pals", rank, _int(env, "PALS_SIZE", "PMI_SIZE") or 1, _int(env, "PALS_LOCAL_RANKID") or 0,
        _int(env, "PALS_LOCAL_SIZE"), _int(env, "PALS_NODEID"), *_batch_ids(env), "",
    )


def _pbs(env) -> Optional[RankContext]:
    if "PBS_JOBID" not in env:
        return None
    task = _int(env, "PBS_TASKNUM") or 1
    return RankContext("pbs", task - 1, 1, 0, None, None, env["PBS_JOBID"],
                       env.get("PBS_TASKNUM", ""), "")


def _single(env) -> RankContext:
    return RankContext("single", 0, 1, 0, 1, 0, *_batch_ids(env), "")


def _batch_ids(env):
    """Job and step ids of the enclosing batch job, when a launcher runs inside one."""
    if env.get("SLURM_JOB_ID"):
        return env["SLURM_JOB_ID"], env.get("SLURM_STEP_ID", "")
    if env.get("PBS_JOBID"):
        return env["PBS_JOBID"], ""
    return "", ""


# Order matters: Slurm steps also export PMIX_*/PMI_* vars; mpirun inside a job exports
# OMPI_* on top of SLURM_* (without SLURM_STEP_ID in its ranks' env when started by orted).
_DETECTORS: List[Callable] = [_ompi, _hydra, _slurm, _pmix, _pals, _pmi, _pbs]


def detect(env: Optional[Mapping[str, str]] = None) -> RankContext:
    env = os.environ if env is None else env
    for detector in _DETECTORS:
        ctx = detector(env)
        if ctx is not None:
            return _with_host(ctx)
    return _with_host(_single(env))


def _with_host(ctx: RankContext) -> RankContext:
    from dataclasses import replace

    return replace(ctx, hostname=socket.gethostname())
