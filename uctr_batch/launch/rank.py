"""Who am I? The rank context, from whichever launcher started this process.

Launchers are tried in a fixed order; the first whose variables are present wins. Each
answer also says which launcher it came from, for `--verbose` output and tests.

Runs on every rank before anything else, so it imports nothing beyond the interpreter's
start-up set (no dataclasses, socket or typing: each costs milliseconds per rank).
"""

import os

_FIELDS = ("launcher", "rank", "size", "local_rank", "local_size", "node_id", "job_id",
           "step_id", "hostname", "launch_id")


class RankContext:
    """One rank's place in its job. Immutable plain data.

    launcher    slurm | pmix | ompi | hydra | pmi | pbs | pals | single
    rank, size  global rank and world size (size 1 when the launcher does not say)
    local_rank  rank among the processes of this step on this node (0 when unknown)
    local_size  processes of this step on this node, None when the launcher does not say
    node_id     index of this node in the step, or None
    job_id      batch job id ("" outside a batch job); step_id ("" when not in a step)
    hostname    this node's host name
    launch_id   what identifies one launch when there is no job id: the PMIx namespace of
                an mpirun, else "" (then the parent pid stands in, see step_key)
    """

    __slots__ = _FIELDS

    def __init__(self, launcher, rank, size, local_rank, local_size, node_id, job_id, step_id,
                 hostname="", launch_id=""):
        values = (launcher, rank, size, local_rank, local_size, node_id, job_id, step_id,
                  hostname, launch_id)
        for name, value in zip(_FIELDS, values):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("RankContext is immutable")

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in _FIELDS)

    __hash__ = None

    def __repr__(self):
        return "RankContext(%s)" % ", ".join("%s=%r" % (f, getattr(self, f)) for f in _FIELDS)

    def replace(self, **changes):
        values = {f: getattr(self, f) for f in _FIELDS}
        values.update(changes)
        return RankContext(**values)

    @property
    def step_key(self) -> str:
        """Identifies one job step on this node: ranks with the same key share a namespace.

        In a batch job: JOB.STEP. Outside one: the launch's PMIx namespace (every rank of one
        mpirun has it), else the parent's pid (mpirun, hydra's proxy, xargs: one per node).
        """
        if self.job_id:
            return "%s.%s" % (self.job_id, self.step_id or "x")
        if self.launch_id:
            return "ns-" + self.launch_id
        return "pid%d" % os.getppid()

    @property
    def prefix(self) -> str:
        """'uctr[rank 3]' when there are several ranks, else 'uctr' (for diagnostics)."""
        return "uctr[rank %d]" % self.rank if self.size > 1 else "uctr"


def _int(env, *names):
    for name in names:
        value = env.get(name, "").strip()
        if value.lstrip("-").isdigit():
            return int(value)
    return None


def _tasks_per_node(value: str, node_id):
    """Expand SLURM_STEP_TASKS_PER_NODE like "2(x3),1" and pick this node's count."""
    counts = []
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


def _launch_id(env) -> str:
    """A file-name-safe PMIx namespace, or ''."""
    ns = env.get("PMIX_NAMESPACE", "")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in ns)[:100]


def _slurm(env):
    rank = _int(env, "SLURM_PROCID")
    if rank is None or "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return None
    node_id = _int(env, "SLURM_NODEID")
    local_size = _tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), node_id)
    return RankContext(
        "slurm", rank, _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1,
        _int(env, "SLURM_LOCALID") or 0, local_size, node_id,
        env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", "")),
        env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "")),
    )


def _ompi(env):
    rank = _int(env, "OMPI_COMM_WORLD_RANK")
    if rank is None:
        return None
    return RankContext(
        "ompi", rank, _int(env, "OMPI_COMM_WORLD_SIZE") or 1,
        _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0, _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"),
        _int(env, "OMPI_COMM_WORLD_NODE_RANK"), *_batch_ids(env),
    )


def _hydra(env):
    if "MPI_LOCALRANKID" not in env or _int(env, "PMI_RANK") is None:
        return None
    return RankContext(
        "hydra", _int(env, "PMI_RANK"), _int(env, "PMI_SIZE") or 1,
        _int(env, "MPI_LOCALRANKID") or 0, _int(env, "MPI_LOCALNRANKS"), None, *_batch_ids(env),
    )


def _pmix(env):
    rank = _int(env, "PMIX_RANK")
    if rank is None:
        return None
    return RankContext(
        "pmix", rank, _int(env, "PMIX_SIZE") or 1, _int(env, "PMIX_LOCAL_RANK") or 0,
        _int(env, "PMIX_LOCAL_SIZE"), None, env.get("PMIX_NAMESPACE", ""), "",
    )


def _pmi(env):
    rank = _int(env, "PMI_RANK")
    if rank is None:
        return None
    return RankContext(
        "pmi", rank, _int(env, "PMI_SIZE") or 1, _int(env, "PMI_LOCAL_RANK") or 0,
        _int(env, "PMI_LOCAL_SIZE"), None, *_batch_ids(env),
    )


def _pals(env):
    rank = _int(env, "PALS_RANKID")
    if rank is None:
        return None
    return RankContext(
        "pals", rank, _int(env, "PALS_SIZE", "PMI_SIZE") or 1, _int(env, "PALS_LOCAL_RANKID") or 0,
        _int(env, "PALS_LOCAL_SIZE"), _int(env, "PALS_NODEID"), *_batch_ids(env),
    )


def _pbs(env):
    if "PBS_JOBID" not in env:
        return None
    task = _int(env, "PBS_TASKNUM") or 1
    return RankContext("pbs", task - 1, 1, 0, None, None, env["PBS_JOBID"],
                       env.get("PBS_TASKNUM", ""))


def _single(env):
    return RankContext("single", 0, 1, 0, 1, 0, *_batch_ids(env))


def _batch_ids(env):
    """Job and step ids of the enclosing batch job, when a launcher runs inside one."""
    if env.get("SLURM_JOB_ID"):
        return env["SLURM_JOB_ID"], env.get("SLURM_STEP_ID", "")
    if env.get("PBS_JOBID"):
        return env["PBS_JOBID"], ""
    return "", ""


# Order matters: Slurm steps also export PMIX_*/PMI_* vars; mpirun inside a job exports
# OMPI_* on top of SLURM_* (without SLURM_STEP_ID in its ranks' env when started by orted).
_DETECTORS = (_ompi, _hydra, _slurm, _pmix, _pals, _pmi, _pbs)


def detect(env=None) -> RankContext:
    env = os.environ if env is None else env
    for detector in _DETECTORS:
        ctx = detector(env)
        if ctx is not None:
            break
    else:
        ctx = _single(env)
    return ctx.replace(hostname=os.uname().nodename, launch_id=_launch_id(env))
