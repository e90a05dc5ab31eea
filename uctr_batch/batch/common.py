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

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import os
from collections.abc import Mapping

from uctr_batch import log
from uctr_batch.batch.job import JobContext
from uctr_batch.errors import UctrError

_log = log.get("batch")

# The variable that carries the job id into policy paths (${JOB_ID}), per scheduler.
SLURM_JOB_ID = "SLURM_JOB_ID"
PBS_JOBID = "PBS_JOBID"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                   "no_proxy")


class NodeFault(UctrError):
    """What only an admin can fix and no user can cause: the root-owned run dir unusable,
    the job user unknown here. The only errors that may drain (Slurm) or offline (PBS) a
    node; anything else fails the job alone (a broken policy too: PolicyFault)."""


def node_step(what: str, func, *args, **kwargs):
    """func(*args, **kwargs), with any failure turned into NodeFault("WHAT: why")."""
    try:
        return func(*args, **kwargs)
    except NodeFault:
        raise
    except UctrError as e:
        raise NodeFault(f"{what}: {e.message}", e.hint) from e
    except (OSError, ValueError) as e:
        raise NodeFault(f"{what}: {e}") from e


class PolicyFault(UctrError):
    """The site policy cannot be used on this node: missing, unreadable, invalid or
    untrusted (group-writable, another owner). The site's to fix and no user's doing, but no
    reason to drain or offline the node either: a careless site would lose every node, one
    container job after another, and the jobs that run no container with them. The
    container job fails with the reason, the hook logs an error, the node stays up."""


POLICY_HINT = ("the site admin must fix the uctr policy on this node (`uctr policy check` "
               "names the problem); jobs without a container image are not affected")


def site_policy(ctx: JobContext, env: Mapping[str, str] | None = None):
    """The trusted site policy resolved for the job's node and partition/queue (PolicyFault
    when it cannot be used: it is root's file)."""
    from uctr_batch.policy import load_policy, resolve

    try:
        return node_step("the site policy", lambda: resolve(
            load_policy(env=env, validated_dir=validated_dir(env)), node=ctx.node,
            partition=ctx.partition, env=env))
    except NodeFault as e:
        raise PolicyFault(f"node {ctx.node} cannot run container jobs: {e.message}",
                          POLICY_HINT) from e


def validated_dir(env: Mapping[str, str] | None):
    """<run dir>/policy: where the hooks keep the policy bytes they validated (root's own,
    node-local: policy/validated.py), or None when it cannot be made root's alone."""
    from uctr_batch.batch import readiness

    path = readiness.run_dir(env) / "policy"
    try:
        readiness.ensure_root_dir(path)
    except OSError:  # a planted or full run dir: write_record() reports it; validate again
        return None
    return path


def policy_fault_fields(ctx: JobContext, fault: "PolicyFault") -> dict:
    """The readiness record that fails a job because of the site policy."""
    return {"status": "error", "image": ctx.image, "message": fault.message,
            "hint": fault.hint}


def write_record(ctx: JobContext, fields: dict, env: Mapping[str, str]):
    """readiness.write_readiness() for the job; NodeFault when the run dir is unusable, but
    a plain UctrError (the job fails, the node stays) when a user owns a part of it: a run
    dir in a world-writable place that someone planted is not the node's fault either. A
    full file system (which users can fill: /run/lock, or /var/tmp beside /var/lib/uctr)
    writes no record, logs an error and returns None: the steps stage the image."""
    from uctr_batch.batch import readiness

    try:
        return node_step("the run dir", readiness.write_readiness, ctx.job_id, ctx.uid,
                         fields, env)
    except NodeFault as e:
        from uctr_batch import fsutil

        full = fsutil.no_space(e.__cause__, readiness.run_dir(env), None,
                               "write the readiness record")
        if full is not None:  # users can fill it (/run/lock is on /run): never a drain
            readiness.remove_readiness(ctx.job_id, env)
            _log.error("uctr: job %s: %s; the job's steps stage its image themselves (keep "
                       "the run dir on a file system users cannot fill)", ctx.job_id,
                       full.message)
            return None
        planted = _user_owned(readiness.run_dir(env), readiness.run_dir(env) / "readiness")
        if planted:
            _log.error("uctr: the run dir is unsafe: %s belongs to uid %d; set UCTR_RUN_DIR "
                       "(or the hook's run_dir) to a root-only place such as /run/uctr",
                       planted[0], planted[1])
            raise UctrError(f"the run dir {planted[0]} belongs to uid {planted[1]}, not root",
                            "the site must keep UCTR_RUN_DIR out of world-writable places")
        raise e


def _root_only(*paths) -> bool:
    """Every one of PATHS is a real directory of root's that nobody else can write."""
    import stat

    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            return False
    return True


def _user_owned(*paths):
    """(path, uid) of the first of PATHS that exists and is not root's, else None."""
    for path in paths:
        try:
            uid = os.lstat(path).st_uid
        except OSError:
            continue
        if uid != 0:
            return str(path), uid
    return None


# The job user's release child can be stopped (SIGSTOP) by that user: an epilog that waited
# for it as long as staging may take could outlast the site's PrologEpilogTimeout (drain).
RELEASE_TIMEOUT = 60.0


# -- stale records ----------------------------------------------------------------------------
STALE_AFTER = 3600.0  # a record younger than this is never swept (its job may be starting)
SWEEP_LIMIT = 8  # records looked at per sweep: bounded work in every prolog/begin hook
SWEEP_BUDGET = 5.0  # seconds a sweep may take in all; the rest waits for the next one


def sweep_stale_records(env: Mapping[str, str], job_gone, *, keep: str = "", node_policy=None,
                        also=None, budget: float = SWEEP_BUDGET,
                        job_id_var: str = SLURM_JOB_ID, now: float | None = None) -> list:
    """Remove readiness records (and, as their users, the jobs' in-use references) of jobs
    that ended without an epilog here: older than STALE_AFTER and job_gone(job_id) True,
    or older than stage.JOB_REF_MAX_AGE whatever job_gone says. KEEP (the job starting now)
    is never touched. Looks at SWEEP_LIMIT records at most, oldest first; ALSO(job_id) is
    called for each record removed (the scheduler's own files). Stops after BUDGET seconds
    (job_gone() and the releases included). Never raises."""
    import time

    from uctr_batch.batch import readiness, stage

    deadline = time.monotonic() + budget
    now = time.time() if now is None else now
    removed = []
    directory = readiness.run_dir(env) / "readiness"
    if not _root_only(readiness.run_dir(env), directory):
        return removed  # names in a directory others control are theirs to choose: never
    try:
        entries = []
        for entry in os.scandir(directory):
            if entry.name.startswith(".") or entry.name == keep:
                continue
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            if age > STALE_AFTER:
                entries.append((age, entry.name))
    except OSError:
        return removed
    for age, job_id in sorted(entries, reverse=True)[:SWEEP_LIMIT]:
        if time.monotonic() >= deadline:
            break
        try:
            if age <= stage.JOB_REF_MAX_AGE and not job_gone(job_id):
                continue
        except Exception:  # noqa: BLE001 - in doubt, keep it
            continue
        record = _raw_record(directory / job_id)
        if not readiness.remove_readiness(job_id, env):
            continue
        removed.append(job_id)
        if also is not None:
            also(job_id)
        _release_stale(job_id, record, env, job_id_var, node_policy,
                       max(0.5, deadline - time.monotonic()))
    return removed


def _raw_record(path) -> dict:
    from uctr_batch.batch import readiness

    try:
        with open(path, "rb") as f:
            return readiness.parse_record(f.read(65536).decode("utf-8", "replace"))
    except OSError:
        return {}


def _release_stale(job_id: str, record: dict, env: Mapping[str, str], job_id_var: str,
                   node_policy, timeout: float) -> None:
    """Drop a vanished job's in-use references as its user (best effort, bounded)."""
    uid = record.get("uid", "")
    if not uid.isdigit() or int(uid) == 0 or os.geteuid() != 0:
        return
    from uctr_batch.batch import privdrop, stage

    try:
        who = privdrop.Identity.of(int(uid))
        privdrop.run_as(who, stage.release_job, job_id, node_policy=node_policy,
                        env=staging_environment(job_id, env, job_id_var), timeout=timeout)
    except Exception as e:  # noqa: BLE001 - the references expire on their own
        _log.debug("cannot release the references of vanished job %s: %s", job_id, e)


def validate_request(image: str, mode: str | None, mpi: str | None, node_policy) -> None:
    """Raise the UctrError a user must fix: a reference that does not parse, an image the
    site refuses, a mode or MPI profile not allowed by NODE_POLICY."""
    from uctr_batch.image import pull, reference
    from uctr_batch.policy import registry_settings

    ref = reference.parse(image)
    if ref.is_registry:
        pull.check_allowed(ref, registry_settings(node_policy))
    node_policy.mode_ladder(mode)
    node_policy.selected_mpi(mpi)


def check_request(ctx: JobContext, node_policy) -> dict | None:
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
                  job_id_var: str = SLURM_JOB_ID, timeout: float | None = None) -> dict:
    """stage.stage_outcome() computed as the job user in a forked child (never as root).

    A node-local directory the user cannot trust (another user created it first, a
    planted parent, the user's own chmod) is no node fault: as root, prepare the user's
    fallback directory on this node (location.prepare_fallback) and stage again there.
    Whatever else fails in the child (a bug, the child killed, a timeout) fails the job."""
    from uctr_batch.batch import location, privdrop, stage

    who = privdrop.Identity.of(ctx.uid, ctx.gid)
    child_env = staging_environment(ctx.job_id, env, job_id_var)
    # stage() stops itself at its timeout with a clear message; this is the backstop
    backstop = (timeout or node_policy.storage.stage_timeout) + 30
    for attempt in range(2):
        try:
            outcome = privdrop.run_as(who, _stage_outcome, ctx.image, ctx.job_id, node_policy,
                                      timeout, env=child_env, timeout=backstop)
        except UctrError as e:  # the child timed out, was killed or hit a bug: the job's
            return stage.error_outcome(e, stage.USER)
        base = outcome.get("relocate") if outcome.get("status") == "error" else None
        if not base or attempt or os.geteuid() != 0:
            return outcome
        try:
            where = location.prepare_fallback(base, ctx.uid, ctx.gid, child_env)
        except (OSError, ValueError) as e:
            _log.warning("job %s: cannot prepare a fallback node-local directory for uid %d "
                         "in %s: %s", ctx.job_id, ctx.uid, base, e)
            return outcome
        _log.warning("job %s: %s; using %s instead", ctx.job_id, outcome.get("message"), where)
    return outcome


def _stage_outcome(image: str, job_id: str, node_policy, timeout: float | None) -> dict:
    """stage.stage_outcome() with its own timeout passed positionally: run_as() keeps the
    `timeout` keyword for itself."""
    import gc

    gc.enable()  # the Slurm prolog pauses it for its start-up (hooks/slurm/prolog.py)
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
                    job_id_var: str = SLURM_JOB_ID, timeout: float | None = None) -> dict:
    """Epilogue side: as the job user, drop the job's in-use references and enforce the
    node-local quota. Returns {"references": n, "evicted": [digest, ...]}."""
    from uctr_batch.batch import privdrop, stage

    who = privdrop.Identity.of(ctx.uid, ctx.gid)
    return privdrop.run_as(who, stage.release_job, ctx.job_id, node_policy=node_policy,
                           env=staging_environment(ctx.job_id, env, job_id_var),
                           timeout=min(timeout or RELEASE_TIMEOUT, RELEASE_TIMEOUT,
                                       node_policy.storage.stage_timeout))
