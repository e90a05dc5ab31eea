"""What every batch integration does for a job on a node, whichever scheduler asked.

The Slurm prolog/epilog and the PBS hooks differ only in how they learn about the job (a
JobContext) and how they report back; the steps in between are these:

    validate_request(image, mode, mpi, node_policy)   reference syntax, site allow/deny,
                                                      mode and MPI profile allowed here
    stage_as_user(ctx, node_policy, env)              pull + node-local rootfs, as the job user
    record_fields(ctx, outcome)                       the readiness record for uctr-exec
    release_as_user(ctx, node_policy, env)            epilogue: drop references, keep the quota

A user mistake comes back as an outcome dict {"status": "error", "fault": "user", ...}: the
scheduler fails the job with its message and leaves the node alone.
"""

from typing import Mapping, Optional

from uctr_batch import log
from uctr_batch.batch.job import JobContext
from uctr_batch.errors import UctrError

_log = log.get("batch")

# The variable that carries the job id into policy paths (${JOB_ID}), per scheduler.
SLURM_JOB_ID = "SLURM_JOB_ID"
PBS_JOBID = "PBS_JOBID"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                   "no_proxy")


def site_policy(ctx: JobContext, env: Optional[Mapping[str, str]] = None):
    """The trusted site policy resolved for the job's node and partition/queue."""
    from uctr_batch.policy import load_policy, resolve

    return resolve(load_policy(env=env), node=ctx.node, partition=ctx.partition, env=env)


def validate_request(image: str, mode: Optional[str], mpi: Optional[str], node_policy) -> None:
    """Raise the UctrError a user must fix: a reference that does not parse, an image the
    site refuses, a mode or MPI profile not allowed by NODE_POLICY."""
    from uctr_batch.image import pull, reference
    from uctr_batch.policy import registry_settings

    ref = reference.parse(image)
    if ref.is_registry:
        pull.check_allowed(ref, registry_settings(node_policy))
    node_policy.mode_ladder(mode)
    node_policy.selected_mpi(mpi)


def check_request(ctx: JobContext, node_policy) -> Optional[dict]:
    """validate_request() as a user-error outcome, or None when the request is fine."""
    from uctr_batch.batch import stage

    try:
        validate_request(ctx.image, ctx.mode, ctx.mpi, node_policy)
    except UctrError as e:
        return stage.error_outcome(e, stage.USER)
    return None


def staging_environment(job_id: str, env: Mapping[str, str],
                        job_id_var: str = SLURM_JOB_ID) -> dict:
    """What a staging child needs from the hook's environment, with the job id under the
    scheduler's own variable (it fills ${JOB_ID} and ${SLURM_JOB_ID}/${PBS_JOBID})."""
    from uctr_batch.batch import stage

    out = stage.job_environment(job_id, env)
    # a site that reaches registries through a proxy sets it for the hook or daemon
    out.update((name, env[name]) for name in PROXY_VARIABLES if env.get(name))
    if job_id_var != SLURM_JOB_ID:
        out.pop(SLURM_JOB_ID, None)
        out[job_id_var] = str(job_id)
    return out


def stage_as_user(ctx: JobContext, node_policy, env: Mapping[str, str],
                  job_id_var: str = SLURM_JOB_ID, timeout: Optional[float] = None) -> dict:
    """stage.stage_outcome() computed as the job user in a forked child (never as root)."""
    from uctr_batch.batch import privdrop, stage

    who = privdrop.Identity.of(ctx.uid, ctx.gid)
    child_env = staging_environment(ctx.job_id, env, job_id_var)
    # stage() stops itself at its timeout with a clear message; this is the backstop
    backstop = (timeout or node_policy.storage.stage_timeout) + 30
    try:
        return privdrop.run_as(who, _stage_outcome, ctx.image, ctx.job_id, node_policy,
                               timeout, env=child_env, timeout=backstop)
    except UctrError as e:  # the child timed out or died: the job's problem, not the node's
        return stage.error_outcome(e, stage.USER if type(e) is UctrError else stage.NODE)


def _stage_outcome(image: str, job_id: str, node_policy, timeout: Optional[float]) -> dict:
    """stage.stage_outcome() with its own timeout passed positionally: run_as() keeps the
    `timeout` keyword for itself."""
    from uctr_batch.batch import stage

    return stage.stage_outcome(image, job_id=job_id, node_policy=node_policy, timeout=timeout)


def record_fields(ctx: JobContext, outcome: dict) -> dict:
    """The readiness record of OUTCOME (see readiness.py for the two shapes)."""
    fields = {"status": outcome["status"], "image": ctx.image}
    keys = ("reference", "rootfs", "bundle", "manifest_digest") if outcome["status"] == "ok" \
        else ("message", "hint")
    fields.update((k, outcome.get(k)) for k in keys)
    return fields


def describe_outcome(ctx: JobContext, outcome: dict, seconds: float) -> str:
    """One log line for a staging outcome."""
    where = f"job {ctx.job_id} on {ctx.node}"
    if outcome["status"] == "ok":
        how = "unpacked" if outcome.get("unpacked") else "reused"
        return (f"{where}: staged {ctx.image} as {outcome.get('manifest_digest')} ({how}) "
                f"in {seconds:.1f} s")
    return f"{where}: {outcome.get('fault')} error staging {ctx.image}: {outcome.get('message')}"


def release_as_user(ctx: JobContext, node_policy, env: Mapping[str, str],
                    job_id_var: str = SLURM_JOB_ID) -> dict:
    """Epilogue side: as the job user, drop the job's in-use references and enforce the
    node-local quota. Returns {"references": n, "evicted": [digest, ...]}."""
    from uctr_batch.batch import privdrop, stage

    who = privdrop.Identity.of(ctx.uid, ctx.gid)
    return privdrop.run_as(who, stage.release_job, ctx.job_id, node_policy=node_policy,
                           env=staging_environment(ctx.job_id, env, job_id_var),
                           timeout=node_policy.storage.stage_timeout)
