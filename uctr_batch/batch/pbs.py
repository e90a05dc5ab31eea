"""OpenPBS integration: the logic behind hooks/pbs/uctr_hook.py, and `uctr pbs ...`.

The hook runs inside pbs_server (queuejob) or pbs_python under pbs_mom (execjob_*). It only
turns the event into a request, runs ``python -m uctr_batch pbs hook`` with it as JSON on
stdin, and applies the JSON answer. Everything else is here, and shared with Slurm through
batch/common.py:

    queuejob            the image reference parses and the site policy allows it
    execjob_begin       (every node) validate on this node, start the stager, wait a little
    execjob_prologue    (first node) wait for the stager a little longer
    execjob_launch      job shell and TM tasks -> uctr-exec IMAGE -- CMD (env: UCTR_*)
    execjob_end         (every node; execjob_epilogue alike) stop the stager, release, quota

Staging runs in a detached *stager* (its own session, so neither MoM's alarm nor the
`kill(-hook, SIGKILL)` MoM sends after every hook can cut it short). It stages as the job
user (common.stage_as_user), writes the readiness record for uctr-exec and an outcome file
for the hooks. A hook waits for it only as long as its alarm allows; what is still running
then continues, and the next event (or uctr-exec, which takes the same locks) picks it up.
A stager killed mid-pull leaves partial blobs that the next attempt resumes.

A user error (bad reference, refused image, auth, not found) fails the job with its message
and never touches the vnode. A node fault (unusable node-local storage, broken policy, uctr
not working) requeues the job and, with "node_fault": "offline" (the default), offlines
this host's vnodes, the PBS counterpart of Slurm draining a node.

Standard library only at import time: `uctr` builds its parser with this module imported.
"""

import argparse
import fcntl
import json
import os
import pwd
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from uctr_batch import envnum, errors, log

_log = log.get("pbs")

QUEUEJOB = "queuejob"
EXECJOB_BEGIN = "execjob_begin"
EXECJOB_PROLOGUE = "execjob_prologue"
EXECJOB_LAUNCH = "execjob_launch"
EXECJOB_EPILOGUE = "execjob_epilogue"
EXECJOB_END = "execjob_end"
EVENTS = (QUEUEJOB, EXECJOB_BEGIN, EXECJOB_PROLOGUE, EXECJOB_LAUNCH, EXECJOB_EPILOGUE, EXECJOB_END)
INSTALLED_EVENTS = (QUEUEJOB, EXECJOB_BEGIN, EXECJOB_PROLOGUE, EXECJOB_LAUNCH, EXECJOB_END)

IMAGE_RESOURCE = "container_image"
MODE_RESOURCE = "container_mode"
# -v NAME=VALUE job variables the hook reads (the resources above win over UCTR_IMAGE/MODE)
JOB_VARIABLES = ("UCTR_IMAGE", "UCTR_MODE", "UCTR_MPI", "UCTR_GPU", "UCTR_JOB_SHELL",
                 "PBS_CONTAINER_ARGS")  # the last: PBS Professional's syntax, see pbs_pro.py
SELECT_RESOURCE = "select"  # its chunks may ask for container_engine (PBS Professional)

ALARM_MARGIN = 8.0  # seconds kept free below the hook alarm: start-up, answer, apply
SWEEP_BUDGET = 2.0  # seconds execjob_begin spends at most on other jobs' leftovers
DISCARD_BUDGET = 3.0  # seconds a rejecting start event spends at most on the job's records
COMMENT_MAX = 480  # characters of a job comment the hook sets (qstat -f shows it)
STATE_DIR = "pbs"  # under the run dir: <job>.lock, <job>.outcome, <job>.log (root, 0700)

# PBS's own tools: a TM task running them stays on the host wherever the job shell runs.
PBS_TOOLS = ("pbs_attach", "pbs_tmrsh")
# Programs TM starts that stay on the host when the job shell does (the default list of
# the host_programs key): MPI daemons a PBS-aware host mpiexec started through TM (TM
# directly, or pbs_tmrsh), which start the ranks themselves, with `uctr-exec IMAGE` in the
# user's mpiexec line. With the job shell in the container, the mpiexec that asked for them
# is the image's, so the daemons are the image's too and run inside it, and so do the ranks
# they fork (only PBS_TOOLS and uctr-exec stay out).
DEFAULT_HOST_PROGRAMS = ("orted", "prted", "prte", "prterun", "hydra_pmi_proxy",
                         "hydra_bstrap_proxy", "pmi_proxy", "pbs_attach", "pbs_tmrsh",
                         "uctr-exec")


# -- configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class HookConfig:
    """hooks/pbs/uctr_hook.json, as imported with `qmgr ... application/x-config`."""
    python: str = "/usr/bin/python3"  # interpreter with uctr_batch (the hook runs it)
    pythonpath: Optional[str] = None  # where uctr_batch lives when it is not installed
    uctr_exec: str = "/usr/local/bin/uctr-exec"  # absolute path on the execution hosts
    policy: Optional[str] = None  # site policy file (default /etc/uctr/policy.yaml)
    run_dir: Optional[str] = None  # node-local readiness records (default /run/uctr)
    stage_timeout: Optional[float] = None  # the stager's bound (default: the policy's)
    begin_wait: float = 20.0  # execjob_begin blocks its MoM: wait at most this long there
    alarm: float = 60.0  # the hook's alarm, when the event does not say it
    job_shell: str = "container"  # "container": the job script runs in the image; "host"
    node_fault: str = "offline"  # "offline": offline this host's vnodes; "requeue": only requeue
    host_programs: Tuple[str, ...] = DEFAULT_HOST_PROGRAMS
    environment: Dict[str, str] = field(default_factory=dict)  # extra env for uctr (proxies)
    pin: str = "submit"  # "submit": queuejob pins IMAGE:tag to its digest; "prolog": no pin

    @classmethod
    def from_dict(cls, data: Mapping) -> "HookConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known - {"comment"})
        if unknown:
            raise errors.ConfigError(f"unknown key(s) in the PBS hook config: {', '.join(unknown)}",
                                     "keys: " + ", ".join(sorted(known)))
        values = {k: v for k, v in data.items() if k in known and v is not None}
        if "host_programs" in values:
            values["host_programs"] = tuple(values["host_programs"])
        for key in ("stage_timeout", "begin_wait", "alarm"):
            if key in values:
                values[key] = _number(key, values[key])
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        choices = {"job_shell": ("container", "host"), "node_fault": ("offline", "requeue"),
                   "pin": ("submit", "prolog")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise errors.ConfigError(
                    f"PBS hook config: {key} is {getattr(self, key)!r}",
                    f"use one of: {', '.join(allowed)}")
        for key in ("python", "uctr_exec"):
            if not os.path.isabs(getattr(self, key)):
                raise errors.ConfigError(f"PBS hook config: {key} must be an absolute path",
                                         "`uctr pbs install` writes the paths of this host")

    def to_dict(self) -> dict:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["host_programs"] = list(self.host_programs)
        return data

    def uctr_environment(self) -> Dict[str, str]:
        """UCTR_* settings every uctr process started for the job needs."""
        env = {}
        if self.policy:
            env["UCTR_POLICY"] = self.policy
        if self.run_dir:
            env["UCTR_RUN_DIR"] = self.run_dir
        return env


def _number(key: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise errors.ConfigError(f"PBS hook config: {key} is not a number: {value!r}",
                                 f"fix {key} in the hook config (`uctr pbs install --dry-run` "
                                 f"prints a good one)") from None
    if number <= 0:
        raise errors.ConfigError(f"PBS hook config: {key} must be positive",
                                 f"fix {key} in the hook config (`uctr pbs install --dry-run` "
                                 f"prints a good one)")
    return number


# -- the job ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What the user asked for: -l container_image/container_mode or -v UCTR_*."""
    image: Optional[str]
    mode: Optional[str]
    mpi: Optional[str]
    gpu: Optional[str]
    job_shell: Optional[str]
    engines: Tuple[str, ...] = ()  # container_engine values in select (PBS Professional)
    container_args: Optional[str] = None  # PBS_CONTAINER_ARGS (PBS Professional)

    @property
    def pbs_pro_syntax(self) -> bool:
        return bool(self.engines or self.container_args)


def _value(mapping: Mapping, name: str) -> Optional[str]:
    value = (mapping or {}).get(name)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def job_request(job: Mapping) -> Request:
    from uctr_batch.batch import pbs_pro

    resources, variables = job.get("resources") or {}, job.get("variables") or {}
    return Request(
        image=_value(resources, IMAGE_RESOURCE) or _value(variables, "UCTR_IMAGE"),
        mode=_value(resources, MODE_RESOURCE) or _value(variables, "UCTR_MODE"),
        mpi=_value(variables, "UCTR_MPI"), gpu=_value(variables, "UCTR_GPU"),
        job_shell=_value(variables, "UCTR_JOB_SHELL"),
        engines=pbs_pro.select_engines(_value(resources, SELECT_RESOURCE)),
        container_args=_value(variables, pbs_pro.ARGS_VARIABLE))


def request_mode(request: Request, node_policy) -> Optional[str]:
    """The mode asked for: container_mode/UCTR_MODE, else what the site policy maps the
    select's container_engine to (None: the class's ladder). Raises UsageError."""
    from uctr_batch.batch import pbs_pro

    if request.mode:
        return request.mode
    return pbs_pro.engine_mode(request.engines, node_policy)


def check_pbs_pro(request: Request, node_policy) -> Optional[str]:
    """request_mode(), with PBS_CONTAINER_ARGS checked too (raises UsageError)."""
    from uctr_batch.batch import pbs_pro

    pbs_pro.parse_args(request.container_args)
    return request_mode(request, node_policy)


def job_context(req: Mapping):
    """The JobContext of an execjob_* request (the job user from euser/egroup)."""
    from uctr_batch.batch.job import JobContext

    job = req["job"]
    user = job.get("euser")
    if not user:
        raise errors.ConfigError(f"job {job.get('id')} has no euser",
                                 "the PBS server sent a job without its user: check the "
                                 "hook's event input (uctr pbs hook)")
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise errors.ConfigError(f"job user {user} has no passwd entry on this node",
                                 "the user must resolve on every execution host (check "
                                 "nsswitch.conf, sssd or LDAP there)") from None
    gid = pw.pw_gid
    if job.get("egroup"):
        import grp

        try:
            gid = grp.getgrnam(job["egroup"]).gr_gid
        except KeyError:
            pass  # PBS already checked the group; the passwd entry's is the safe choice
    request = job_request(job)
    return JobContext(job_id=str(job["id"]), uid=pw.pw_uid, gid=gid, user=user,
                      node=_short(req.get("node") or os.uname().nodename),
                      partition=job.get("queue") or None, image=request.image,
                      mode=request.mode, mpi=request.mpi, gpu=request.gpu)


def _short(host: str) -> str:
    return str(host).split(".")[0]


# -- answers ------------------------------------------------------------------------------
class Answer(dict):
    """What the hook applies: action accept|reject, message, job_action (rerun|delete),
    offline (this host's vnodes) with comment, progname/argv/env for execjob_launch, and
    log lines [level, text] for the daemon's log."""

    def __init__(self, action: str = "accept", **fields):
        super().__init__(action=action, log=[], **fields)

    def note(self, level: str, text: str) -> "Answer":
        self["log"].append([level, text])
        return self


def accept(**fields) -> Answer:
    return Answer("accept", **fields)


def reject(message: str, job_action: Optional[str] = None, **fields) -> Answer:
    return Answer("reject", message=message, job_action=job_action, **fields)


def user_error(message: str, hint: Optional[str] = None, job_action: Optional[str] = "delete"
               ) -> Answer:
    """The job fails with the message; the vnode is left alone."""
    text = f"uctr: {message}" + (f" (hint: {hint})" if hint else "")
    return reject(text, job_action).note("info", text)


def report(message: str, hint: Optional[str] = None, code: int = errors.EXIT_USER) -> Answer:
    """Launch, instead of the job shell or task, a host /bin/sh that prints uctr's error and
    hint on its standard error (the job's .e file, which its owner can read) and exits
    CODE: a user error found on the node reaches the user, and nothing of the job runs.
    The text goes in as arguments, never into the shell's code."""
    lines = [f"error: uctr: {message}"] + ([f"hint: {hint}"] if hint else [])
    argv = ["/bin/sh", "-c", 'for line; do printf "%%s\\n" "$line" >&2; done; exit %d'
            % int(code), "uctr"] + lines
    answer = accept(progname="/bin/sh", argv=argv, job_comment=_comment(message, hint))
    return answer.note("info", f"uctr: {message}" + (f" (hint: {hint})" if hint else ""))


def _comment(message: str, hint: Optional[str]) -> str:
    """The job comment (qstat -f) for a user error: the message, then the hint."""
    return (f"uctr: {message}" + (f" (hint: {hint})" if hint else ""))[:COMMENT_MAX]


def node_fault(config: HookConfig, node: str, message: str) -> Answer:
    """Requeue the job; with node_fault=offline also take this host's vnodes out."""
    text = f"uctr: node {node} cannot run container jobs: {message}"
    answer = reject(text, "rerun").note("error", text)
    answer["job_comment"] = (text + "; the job is requeued")[:COMMENT_MAX]  # qstat -f
    if config.node_fault == "offline":
        answer["offline"] = True
        answer["comment"] = f"uctr: {message}"[:200]
    return answer


# -- dispatch -----------------------------------------------------------------------------
def handle(req: Mapping, env: Optional[Mapping[str, str]] = None) -> Answer:
    """The answer to one hook request (never raises)."""
    env = os.environ if env is None else env
    event = req.get("event")
    node = _short(req.get("node") or os.uname().nodename)
    try:
        config = HookConfig.from_dict(req.get("config") or {})
    except errors.UctrError as e:  # which vnodes to offline is in the config: only requeue
        return failure(event, HookConfig(node_fault="requeue"), node,
                       f"broken hook configuration: {e.message}")
    try:
        request = job_request(req.get("job") or {})
        if request.image is None:
            if event == QUEUEJOB and request.pbs_pro_syntax:
                return user_error("container_engine and PBS_CONTAINER_ARGS need an image",
                                  "add -l container_image=IMAGE", job_action=None)
            return accept()  # the hook skips these itself; this is the same rule
        if event == QUEUEJOB:
            return queuejob(req, config, env)
        if event in (EXECJOB_BEGIN, EXECJOB_PROLOGUE):
            return stage_event(req, config, env)
        if event == EXECJOB_LAUNCH:
            return launch(req, config, env)
        if event in (EXECJOB_EPILOGUE, EXECJOB_END):
            return cleanup(req, config, env)
        return accept().note("warning", f"uctr: event {event!r} is not handled; accepted")
    except Exception as e:  # noqa: BLE001 - see failure(): only a NodeFault is the node's
        _log.debug("hook request failed", exc_info=True)
        from uctr_batch.batch.common import NodeFault, PolicyFault

        message = e.message if isinstance(e, errors.UctrError) else f"{type(e).__name__}: {e}"
        if isinstance(e, NodeFault) or event in (QUEUEJOB, EXECJOB_EPILOGUE, EXECJOB_END):
            return failure(event, config, node, message)
        if isinstance(e, PolicyFault):  # the site's to fix: the job fails, the vnode stays
            hint, level = e.hint, ("error", f"uctr: {message} (the vnode is not offlined)")
        else:  # a bug or an input uctr did not expect: in doubt the job fails, the vnode stays
            message = f"internal error while preparing the container job: {message}"
            hint, level = "this is a bug in uctr-batch; the MoM log has details", None
        if event == EXECJOB_LAUNCH:
            answer = report(message, hint)
        else:
            answer = defer_failure(req, config, env, stage_error(message, hint))
        return answer.note(*level) if level else answer


def failure(event: Optional[str], config: HookConfig, node: str, message: str) -> Answer:
    """uctr could not do its part for a reason only an admin can fix (common.NodeFault, a
    broken hook config): refuse the submission, requeue (and maybe offline) for a job
    start, only log for a job end."""
    if event == QUEUEJOB:
        return reject(f"uctr: cannot check the container request: {message}").note("error", message)
    if event in (EXECJOB_EPILOGUE, EXECJOB_END):
        return accept().note("error", f"uctr: cleanup incomplete: {message}")
    return node_fault(config, node, message)


# -- queuejob -----------------------------------------------------------------------------
def queuejob(req: Mapping, config: HookConfig, env: Mapping[str, str]) -> Answer:
    """Refuse at submission what no node would run: bad syntax, an image the site refuses,
    a mode or MPI profile it never allows. Nodes check again with their own class."""
    from uctr_batch.batch import common
    from uctr_batch.policy import load_policy, resolve

    request = job_request(req["job"])
    policy = load_policy(env=_with(env, config.uctr_environment()))
    node_policy = resolve(policy, node=_short(req.get("node") or os.uname().nodename),
                          partition=req["job"].get("queue") or None, features=())
    try:
        mode = check_pbs_pro(request, node_policy)
        common.validate_request(request.image, mode, request.mpi, node_policy)
        _check_job_shell(request.job_shell)
    except errors.UctrError as e:
        return user_error(e.message, e.hint, job_action=None)
    answer = accept()
    if config.pin == "submit":
        try:
            pinned = _pin(request.image, node_policy)
        except errors.UctrError as e:
            return user_error(f"cannot resolve {request.image} to a digest at submission: "
                              f"{e.message}", e.hint or "is the registry reachable from the PBS "
                              "server? (a site can set \"pin\": \"prolog\" in the hook config)",
                              job_action=None)
        answer["set"] = _pinned_attributes(req["job"], request.image, pinned)
    return answer.note("debug", f"uctr: {req['job'].get('id') or 'new job'}: "
                                f"container image {request.image} accepted")


def _pin(image: str, node_policy) -> str:
    """IMAGE:tag -> IMAGE@sha256:... (pull.pin), asked once by the server for the whole job,
    so that every execution host stages the same image even if the tag moves meanwhile. The
    server has no user credentials: its own (root's `uctr login`) or none. The manifest goes
    to a scratch store: the server is no node and keeps no cache."""
    import tempfile

    from uctr_batch import settings
    from uctr_batch.image import pull
    from uctr_batch.image.store import Store
    from uctr_batch.policy import registry_settings

    config = settings.registry_config(base=registry_settings(node_policy))
    with tempfile.TemporaryDirectory(prefix="uctr-pin-") as scratch:
        return pull.pin(image, config, Store(Path(scratch)))


def _pinned_attributes(job: Mapping, image: str, pinned: str) -> Dict[str, Dict[str, str]]:
    """The job attributes queuejob sets: the digest where the image came from (resource or
    -v UCTR_IMAGE), the tag kept for display as UCTR_IMAGE_TAG."""
    out: Dict[str, Dict[str, str]] = {"resources": {}, "variables": {}}
    if pinned == image:
        return out
    if _value(job.get("resources") or {}, IMAGE_RESOURCE):
        out["resources"][IMAGE_RESOURCE] = pinned
    else:
        out["variables"]["UCTR_IMAGE"] = pinned
    out["variables"]["UCTR_IMAGE_TAG"] = image
    return out


def _check_job_shell(value: Optional[str]) -> None:
    if value not in (None, "container", "host"):
        raise errors.UctrError(f"UCTR_JOB_SHELL={value} is not container or host",
                               "-v UCTR_JOB_SHELL=host runs the job script on the host, "
                               "where a PBS-aware mpiexec can start `uctr-exec IMAGE` ranks")


def _job_shell_outcome(job: Mapping) -> Optional[dict]:
    from uctr_batch.batch import stage

    try:
        _check_job_shell(job_request(job).job_shell)
    except errors.UctrError as e:
        return stage.error_outcome(e, stage.USER)
    return None


def _with(env: Mapping[str, str], extra: Mapping[str, str]) -> Dict[str, str]:
    merged = dict(env)
    merged.update(extra)
    return merged


# -- execjob_begin / execjob_prologue -----------------------------------------------------
def stage_event(req: Mapping, config: HookConfig, env: Mapping[str, str]) -> Answer:
    """Check the request on this node, make sure a stager runs (or ran), wait for it as
    long as this event may block, and fail the job only for what its owner must fix."""
    from uctr_batch.batch import common, readiness

    env = _with(env, config.uctr_environment())
    ctx = common.node_step("the job's user", job_context, req)
    node_policy = common.site_policy(ctx, env)  # broken or untrusted: PolicyFault, see handle()
    started = time.monotonic()
    if req.get("event") == EXECJOB_BEGIN:
        sweep(req, ctx, node_policy, env)
    ctx, refused = _resolve_mode(ctx, req["job"], node_policy)
    refused = refused or common.check_request(ctx, node_policy) or _job_shell_outcome(req["job"])
    if refused:
        return defer_failure(req, config, env, refused, ctx=ctx)
    if req.get("event") == EXECJOB_BEGIN:
        _forget_earlier_run(ctx, env)
    budget = wait_budget(req, config) - (time.monotonic() - started)
    outcome = await_stager(ctx, config, env, max(0.5, budget))
    if outcome is None:
        return accept().note("info", f"uctr: job {ctx.job_id} on {ctx.node}: still staging "
                                     f"{ctx.image}; it continues in the background")
    if outcome["status"] == "ok":
        return accept().note("info", "uctr: " + common.describe_outcome(
            ctx, outcome, outcome.get("seconds", 0.0)))
    if outcome.get("fault") == "node":
        discard_job(ctx, node_policy, env, budget=DISCARD_BUDGET)
        return node_fault(config, ctx.node, outcome["message"])
    return defer_failure(req, config, env, dict(outcome, message=f"cannot stage {ctx.image} "
                                                f"on {ctx.node}: {outcome['message']}"), ctx=ctx)


def _resolve_mode(ctx, job: Mapping, node_policy):
    """(ctx with the mode the site maps container_engine to, None), or (ctx, the user-error
    outcome of a bad container_engine or PBS_CONTAINER_ARGS)."""
    from uctr_batch import records
    from uctr_batch.batch import stage

    try:
        mode = check_pbs_pro(job_request(job), node_policy)
    except errors.UctrError as e:
        return ctx, stage.error_outcome(e, stage.USER)
    return (records.replace(ctx, mode=mode) if mode != ctx.mode else ctx), None


def stage_error(message: str, hint: Optional[str]) -> dict:
    from uctr_batch.batch import stage

    return {"status": "error", "fault": stage.USER, "message": message, "hint": hint}


def defer_failure(req: Mapping, config: HookConfig, env: Mapping[str, str], outcome: dict,
                  ctx=None) -> Answer:
    """A user error found at execjob_begin/prologue: record it and accept, so that the
    launch reports it on the job's stderr (report()) and the job ends with it, rather than
    rejecting, which leaves its owner only "Execution server rejected request". The job is
    then ended by its launch and gets its execjob_end, which removes the records.
    Where the records cannot be written: reject and delete the job, as before."""
    from uctr_batch.batch import common, readiness

    env = _with(env, config.uctr_environment())
    message, hint = outcome["message"], outcome.get("hint")
    try:
        ctx = ctx or job_context(req)
        failed = dict(outcome, image=ctx.image, status="error")
        readiness.write_readiness(ctx.job_id, ctx.uid, common.record_fields(ctx, failed), env)
        _ensure_state_dir(env)
        _write_outcome(ctx.job_id, failed, env)
    except Exception as e:  # noqa: BLE001 - no place for the record: fail the job now
        _log.debug("cannot record the failure: %s", e)
        _discard_quietly(req, config, env)
        return user_error(message, hint)
    answer = accept(job_comment=_comment(message, hint))
    return answer.note("info", f"uctr: job {ctx.job_id} on {ctx.node}: {message}; the job "
                               "ends with this message at its launch")


def discard_job(ctx, node_policy, env: Mapping[str, str], budget: float) -> bool:
    """A job rejected by a start event gets no execjob_end: stop its stager, remove its
    records and (as its user, within BUDGET seconds) its in-use references. Never raises;
    True when something was removed."""
    from uctr_batch.batch import privdrop, readiness, stage

    found = False
    deadline = time.monotonic() + budget
    try:
        stop_stager(ctx.job_id, env, timeout=budget / 2)
        found = readiness.remove_readiness(ctx.job_id, env)
        found = _remove_state(ctx.job_id, env) or found
        if found:
            child_env = common_staging_environment(ctx.job_id, env)
            privdrop.run_as(privdrop.Identity.of(ctx.uid, ctx.gid), stage.release_job,
                            ctx.job_id, node_policy=node_policy, env=child_env,
                            timeout=max(0.5, deadline - time.monotonic()))
    except Exception as e:  # noqa: BLE001 - stale references expire; the sweeper helps
        _log.debug("discarding job %s: %s", ctx.job_id, e)
    return found


def common_staging_environment(job_id: str, env: Mapping[str, str]) -> Dict[str, str]:
    from uctr_batch.batch import common

    return common.staging_environment(job_id, env, common.PBS_JOBID)


def _discard_quietly(req: Mapping, config: HookConfig, env: Mapping[str, str]) -> None:
    """discard_job() for a request that failed half-way (no policy at hand)."""
    try:
        env = _with(env, config.uctr_environment())
        ctx = job_context(req)
        stop_stager(ctx.job_id, env, timeout=1.0)
        from uctr_batch.batch import readiness

        readiness.remove_readiness(ctx.job_id, env)
        _remove_state(ctx.job_id, env)
    except Exception:  # noqa: BLE001
        pass


def sweep(req: Mapping, ctx, node_policy, env: Mapping[str, str]) -> list:
    """Remove what jobs that left this node without an execjob_end left behind (bounded,
    never raises; see common.sweep_stale_records). A job is gone when MoM has no file of
    it in mom_priv/jobs (known only when the hook passed PBS_HOME)."""
    from uctr_batch.batch import common

    jobs_dir = os.path.join(req["pbs_home"], "mom_priv", "jobs") if req.get("pbs_home") else None

    def gone(job_id: str) -> bool:
        if jobs_dir is None or not os.path.isdir(jobs_dir):
            return False
        if stager_running(job_id, env):
            return False
        prefix = job_id + "."
        with os.scandir(jobs_dir) as entries:
            return not any(e.name.startswith(prefix) for e in entries)

    # MoM blocks on execjob_begin: a small share of the hook's time, the rest goes next time
    removed = common.sweep_stale_records(env, gone, keep=ctx.job_id, node_policy=node_policy,
                                         also=lambda job_id: _remove_state(job_id, env),
                                         budget=SWEEP_BUDGET, job_id_var=common.PBS_JOBID)
    removed += _sweep_state(env, gone, keep=ctx.job_id)
    if removed:
        _log.info("uctr: removed the records of %d vanished job(s): %s", len(removed),
                  " ".join(removed))
    return removed


def _sweep_state(env: Mapping[str, str], gone, keep: str) -> list:
    """State files (<job>.lock/.outcome/.log) of gone jobs that have no readiness record."""
    from uctr_batch.batch import common, stage

    from uctr_batch.batch import readiness

    now, jobs = time.time(), {}
    if not common._root_only(readiness.run_dir(env), state_dir(env)):
        return []
    try:
        with os.scandir(state_dir(env)) as entries:
            for entry in entries:
                job_id, _, kind = entry.name.rpartition(".")
                if kind not in ("lock", "outcome", "log") or not job_id or job_id == keep:
                    continue
                age = now - entry.stat(follow_symlinks=False).st_mtime
                jobs[job_id] = min(age, jobs.get(job_id, age))
    except OSError:
        return []
    removed = []
    stale = sorted(((age, j) for j, age in jobs.items() if age > common.STALE_AFTER), reverse=True)
    for age, job_id in stale[:common.SWEEP_LIMIT]:
        try:
            if age <= stage.JOB_REF_MAX_AGE and not gone(job_id):
                continue
            if stager_running(job_id, env):
                continue
            if _remove_state(job_id, env):
                removed.append(job_id)
        except Exception:  # noqa: BLE001 - in doubt, keep it
            continue
    return removed


def _forget_earlier_run(ctx, env: Mapping[str, str]) -> None:
    """A requeued job keeps its id: what a failed earlier run on this node recorded (a node
    fault since fixed, say), or a root filesystem evicted since, must not decide this run."""
    from uctr_batch.batch import readiness

    outcome = read_outcome(ctx.job_id, env)
    if outcome is None or (outcome["status"] == "ok" and os.path.isdir(outcome.get("rootfs", ""))):
        return
    state_path(ctx.job_id, "outcome", env).unlink(missing_ok=True)
    readiness.remove_readiness(ctx.job_id, env)


def wait_budget(req: Mapping, config: HookConfig) -> float:
    """How long this event may wait for the stager and still answer before its alarm."""
    alarm = float(req.get("alarm") or config.alarm)
    budget = alarm - ALARM_MARGIN
    if req.get("event") == EXECJOB_BEGIN:  # MoM itself waits for execjob_begin hooks
        budget = min(budget, config.begin_wait)
    return max(0.5, budget)


def await_stager(ctx, config: HookConfig, env: Mapping[str, str], budget: float
                 ) -> Optional[dict]:
    """The stager's outcome for ctx.image within BUDGET seconds, else None (still running).

    A stager that died without an outcome (killed with its node, or by a previous job end)
    is started again: its partial downloads are resumed."""
    deadline = time.monotonic() + budget
    starts = 0
    while True:
        outcome = read_outcome(ctx.job_id, env)
        if outcome is not None and outcome.get("image") == ctx.image:
            return outcome
        if not stager_running(ctx.job_id, env):
            if starts >= 3:
                raise errors.InternalError(f"the stager for job {ctx.job_id} keeps dying; "
                                           f"see {state_path(ctx.job_id, 'log', env)}")
            if start_stager(ctx, config, env) is not None:
                starts += 1
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


# -- the stager ---------------------------------------------------------------------------
def state_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    from uctr_batch.batch import readiness

    return readiness.run_dir(env) / STATE_DIR


def state_path(job_id: str, kind: str, env: Optional[Mapping[str, str]] = None) -> Path:
    from uctr_batch.batch import readiness

    name = readiness.record_path(job_id, env).name  # the same job-id checks
    return state_dir(env) / f"{name}.{kind}"


def _ensure_state_dir(env: Mapping[str, str]) -> Path:
    from uctr_batch import fsutil

    directory = state_dir(env)
    fsutil.ensure_private_dir(directory, "the PBS hook state directory")
    return directory


def start_stager(ctx, config: HookConfig, env: Mapping[str, str]) -> Optional[int]:
    """Start the detached stager for ctx unless one runs; return its pid (None: one ran).

    The lock is taken here and handed to the stager as an inherited descriptor, so it is
    held from this moment until the stager exits: nobody can see "not running" between."""
    _ensure_state_dir(env)
    lock = state_path(ctx.job_id, "lock", env)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        state_path(ctx.job_id, "outcome", env).unlink(missing_ok=True)  # another image's
        os.ftruncate(fd, 0)  # no stale pid from an earlier stager while this one starts
        payload = json.dumps({"job": _context_dict(ctx), "config": config.to_dict()})
        with open(state_path(ctx.job_id, "log", env), "ab") as log_file:
            child = subprocess.Popen(
                [sys.executable, "-m", "uctr_batch", "pbs", "stage", "--lock-fd", str(fd)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log_file,
                pass_fds=(fd,), start_new_session=True,
                env=_with(_stager_environment(env), config.environment),
                close_fds=True)
        child.stdin.write(payload.encode())
        child.stdin.close()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{child.pid}\n".encode(), 0)
        _log.debug("started stager %d for job %s", child.pid, ctx.job_id)
        return child.pid
    finally:
        os.close(fd)


def _stager_environment(env: Mapping[str, str]) -> Dict[str, str]:
    from uctr_batch.batch.common import PROXY_VARIABLES

    keep = ("PATH", "LANG", "PYTHONPATH", "UCTR_POLICY", "UCTR_RUN_DIR", "UCTR_VERBOSE")
    return {k: env[k] for k in keep + PROXY_VARIABLES if env.get(k)}


def _context_dict(ctx) -> dict:
    return {k: getattr(ctx, k) for k in ("job_id", "uid", "gid", "user", "node", "partition",
                                         "image", "mode", "mpi", "gpu")}


def stager_running(job_id: str, env: Mapping[str, str]) -> bool:
    """True while a stager holds the job's lock."""
    try:
        fd = os.open(state_path(job_id, "lock", env), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's shared lock


def read_outcome(job_id: str, env: Mapping[str, str]) -> Optional[dict]:
    try:
        return json.loads(state_path(job_id, "outcome", env).read_text())
    except (OSError, ValueError):
        return None


def _write_outcome(job_id: str, outcome: dict, env: Mapping[str, str]) -> None:
    from uctr_batch import fsutil

    fsutil.write_atomic(state_path(job_id, "outcome", env), json.dumps(outcome).encode())


def run_stager(payload: Mapping, env: Mapping[str, str]) -> dict:
    """The stager's work (root, own session): stage as the job user, then record the
    outcome for uctr-exec (readiness) and for the hooks (outcome file)."""
    from uctr_batch.batch import common, readiness, stage
    from uctr_batch.batch.job import JobContext

    ctx = JobContext(**payload["job"])
    config = HookConfig.from_dict(payload.get("config") or {})
    started = time.monotonic()
    try:
        node_policy = common.site_policy(ctx, env)
        outcome = common.check_request(ctx, node_policy) or common.stage_as_user(
            ctx, node_policy, env, common.PBS_JOBID, timeout=config.stage_timeout)
    except Exception as e:  # noqa: BLE001 - a broken policy (PolicyFault) or a bug: the job's
        _log.debug("stager failed", exc_info=True)
        outcome = stage.error_outcome(e, stage.NODE if isinstance(e, common.NodeFault)
                                      else stage.USER)
    outcome = dict(outcome, image=ctx.image, seconds=round(time.monotonic() - started, 3))
    readiness.write_readiness(ctx.job_id, ctx.uid, common.record_fields(ctx, outcome), env)
    _write_outcome(ctx.job_id, outcome, env)
    _log.info("uctr stager: %s", common.describe_outcome(ctx, outcome, outcome["seconds"]))
    return outcome


def stop_stager(job_id: str, env: Mapping[str, str], timeout: float = 10.0) -> bool:
    """Kill the job's stager and everything in its session (its unprivileged child has a
    process group of its own). Returns True if one was running."""
    if not stager_running(job_id, env):
        return False
    try:
        sid = int(state_path(job_id, "lock", env).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    if sid <= 1 or not _our_stager_session(sid):
        return False
    deadline = time.monotonic() + timeout
    while stager_running(job_id, env) and time.monotonic() < deadline:
        for pid in session_members(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return True


def _our_stager_session(sid: int) -> bool:
    """Whether session SID is a stager's: its leader, if still there, is root's `uctr pbs
    stage`. A pid read from a lock file can be stale and reused by anyone's session leader;
    once the leader is gone the number stays reserved while its session has members."""
    try:
        if os.stat(f"/proc/{sid}").st_uid != 0:
            return False
        with open(f"/proc/{sid}/cmdline", "rb") as f:
            argv = f.read(4096).split(b"\0")
    except FileNotFoundError:
        return True  # leader gone: members (its staging child) may remain; the sid is theirs
    except OSError:
        return False
    if argv == [b""]:  # mid-exec: the descriptors are closed before argv is set up
        return True  # root's all the same, and a process no other session can contain
    return any(argv[i:i + 2] == [b"pbs", b"stage"] for i in range(len(argv)))


def session_members(sid: int) -> List[int]:
    """Pids whose session id is SID (field 6 of /proc/PID/stat)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 3 and fields[3] == str(sid):
            members.append(int(entry))
    return members


# -- execjob_launch -----------------------------------------------------------------------
def launch(req: Mapping, config: HookConfig, env: Mapping[str, str]) -> Answer:
    """Run the job shell (unless the job shell stays on the host) and every TM task that is
    not an MPI daemon through uctr-exec; give all of them the UCTR_* settings."""
    job = req["job"]
    request = job_request(job)
    outcome = read_outcome(str(job["id"]), _with(env, config.uctr_environment()))
    if outcome and outcome.get("image") == request.image and outcome["status"] != "ok":
        if outcome.get("fault") == "node":
            return node_fault(config, _short(req.get("node") or os.uname().nodename),
                              outcome["message"])
        message = outcome["message"]  # execjob_begin's "cannot stage IMAGE on NODE: ..."
        if request.image not in message:  # the stager's own words do not name the image
            message = f"cannot run in {request.image}: {message}"
        return report(message, outcome.get("hint"))
    rootfs = outcome.get("rootfs") if outcome and outcome["status"] == "ok" else None
    spec = req.get("launch") or {}
    progname, argv = spec.get("progname") or "", list(spec.get("argv") or [])
    command = launch_command(config, request, progname, argv, rootfs)
    job_env = spec.get("env") or {}
    try:
        env_set = launch_environment(config, request)
        env_set.update(pbs_pro_environment(req, config, env, request, job_env))
    except errors.UctrError as e:  # qalter may have changed what queuejob checked
        return report(e.message, e.hint)
    if job_env.get("UCTR_ARGV0"):
        env_set["UCTR_ARGV0"] = ""  # inherited (qsub -V in a Slurm step): not our argv
    if command is not None and not argv and req.get("pbs_home"):
        missing = script_interpreter_missing(req["pbs_home"], str(job["id"]), rootfs)
        if missing:
            return report(f"the job script's interpreter {missing} is not in the image "
                          f"{request.image}", "install it in the image, or start the script "
                          "with a #! line the image has (e.g. #!/bin/sh), or run the script on "
                          "the host with -v UCTR_JOB_SHELL=host", code=127)
        env_set["UCTR_MOUNTS"] = _with_script_dir(env_set.get("UCTR_MOUNTS")
                                                  or job_env.get("UCTR_MOUNTS"), req["pbs_home"])
    answer = accept(env=env_set)
    if command is not None:
        answer.update(progname=command[0], argv=command)
        answer.note("debug", f"uctr: {job['id']}: {' '.join(command)}")
    return answer


def pbs_pro_environment(req: Mapping, config: HookConfig, env: Mapping[str, str],
                        request: Request, job_env: Mapping[str, str]) -> Dict[str, str]:
    """UCTR_* settings from PBS Professional's syntax: the mode the site maps
    container_engine to, and PBS_CONTAINER_ARGS (see pbs_pro.py). Raises UsageError."""
    from uctr_batch.batch import common, pbs_pro

    out = pbs_pro.parse_args(request.container_args).environment(dict(job_env))
    if request.engines and not request.mode:
        ctx = job_context(req)
        mode = request_mode(request, common.site_policy(ctx, _with(env,
                                                                   config.uctr_environment())))
        if mode:
            out["UCTR_MODE"] = mode
    return out


# where a #! line's program is looked for when it is `env PROGRAM` (the usual PATH)
IMAGE_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
SHEBANG_MAX = 256  # bytes of the script's first line read (Linux reads 256 as well)


def script_interpreter_missing(pbs_home: str, job_id: str, rootfs: Optional[str]
                               ) -> Optional[str]:
    """The #! interpreter of the job script (mom_priv/jobs/JOB.SC) when the image at ROOTFS
    lacks it, else None (also when it cannot tell: still staging, no #! line, no script).
    Without this check a `#!/bin/bash` script in an image without bash fails with exit 127
    and a message that names MoM's copy of the script instead."""
    if not rootfs:
        return None
    try:
        interpreter = _shebang(os.path.join(pbs_home, "mom_priv", "jobs", job_id + ".SC"))
        if not interpreter:
            return None
        program, _, rest = interpreter.partition(" ")
        if not program.startswith("/"):
            return None
        root = Path(rootfs)
        if not _exists_in(root, program):
            return program
        words = rest.split()
        if os.path.basename(program) == "env" and words and not words[0].startswith("-") \
                and "/" not in words[0]:
            if not any(_exists_in(root, f"{d}/{words[0]}") for d in IMAGE_PATH):
                return f"{words[0]} (run by {interpreter})"
    except (OSError, ValueError):  # the image's links are the user's: never a hook failure
        return None
    return None


def _shebang(path: str) -> Optional[str]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        head = os.read(fd, SHEBANG_MAX)
    finally:
        os.close(fd)
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    return line or None


def _with_script_dir(mounts: Optional[str], pbs_home: str) -> str:
    """UCTR_MOUNTS plus MoM's job script directory, read-only at the same place.

    MoM feeds the job shell the *path* of the script on stdin (SHELL_INVOKE); the shell
    in the container must find it there. The directory is bound, not the file, because
    its name is not always the job id; it is mode 0751, so a job still opens only its
    own script."""
    scripts = os.path.join(pbs_home, "mom_priv", "jobs")
    own = f"{scripts}:{scripts}:ro"
    return f"{mounts},{own}" if mounts else own


def launch_environment(config: HookConfig, request: Request) -> Dict[str, str]:
    # UCTR_PYTHON: the launchers/uctr-exec shim runs on it; it has uctr's dependencies,
    # which the first rank on a node needs to resolve the policy
    env = {"UCTR_IMAGE": request.image, "UCTR_PYTHON": config.python}
    for name, value in (("UCTR_MODE", request.mode), ("UCTR_MPI", request.mpi),
                        ("UCTR_GPU", request.gpu)):
        if value:
            env[name] = value
    env.update(config.uctr_environment())
    return env


def launch_command(config: HookConfig, request: Request, progname: str, argv: Sequence[str],
                   rootfs: Optional[str]) -> Optional[List[str]]:
    """The new argv (progname = argv[0]) or None to leave the launch alone.

    MoM passes no argv for the job shell (it builds "-bash" itself afterwards); a TM task
    (pbsdsh, tm_spawn, pbs_tmrsh) comes with its argv."""
    prefix = [config.uctr_exec, request.image, "--"]
    shell_on_host = (request.job_shell or config.job_shell) == "host"
    if not argv:
        if shell_on_host:
            return None
        return prefix + [shell_in_image(progname or "/bin/sh", rootfs)]
    program = os.path.basename(_unquoted(progname or argv[0]))
    if program in PBS_TOOLS or program == os.path.basename(config.uctr_exec):
        return None
    if shell_on_host and program in config.host_programs:
        # a host MPI daemon: the user's mpiexec line wraps the ranks. hydra's rsh launcher
        # quotes the proxy's path for a remote shell, and pbs_tmrsh passes it on to TM
        # without one: MoM would exec '"/usr/bin/hydra_pmi_proxy"' (seen on a real OpenPBS)
        if argv[0] != _unquoted(argv[0]):
            return [_unquoted(argv[0])] + list(argv[1:])
        return None
    return prefix + list(argv)


def _unquoted(word: str) -> str:
    """WORD without the one pair of quotes a launcher put around it for a remote shell."""
    if len(word) >= 2 and word[0] == word[-1] and word[0] in "\"'":
        return word[1:-1]
    return word


def shell_in_image(shell: str, rootfs: Optional[str]) -> str:
    """SHELL if the image has it (or we cannot tell yet), else /bin/sh."""
    if not rootfs or not shell.startswith("/"):
        return shell
    root = Path(rootfs)
    try:
        for candidate in (shell, "/usr" + shell):
            if _exists_in(root, candidate):
                return shell
    except (OSError, ValueError):  # the image's links are the user's: never a hook failure
        return shell
    return "/bin/sh"


def _exists_in(root: Path, path: str, depth: int = 0) -> bool:
    """Whether PATH exists inside ROOT, following symlinks as the container would."""
    if depth > 16:
        return False
    current = root
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for i, part in enumerate(parts):
        candidate = current / part if part != ".." else current.parent
        if not str(candidate).startswith(str(root)):
            candidate = root
        if candidate.is_symlink():
            target = os.readlink(candidate)
            base = "/" if target.startswith("/") else "/" + str(current.relative_to(root))
            rest = "/".join([target] + parts[i + 1:])
            return _exists_in(root, os.path.normpath(os.path.join(base, rest)), depth + 1)
        if not os.path.lexists(candidate):
            return False
        current = candidate
    return True


# -- execjob_end / execjob_epilogue -------------------------------------------------------
def cleanup(req: Mapping, config: HookConfig, env: Mapping[str, str]) -> Answer:
    """Stop a stager still at work, drop the job's references as the job user, keep the
    node-local quota, remove the job's records. Never fails the job or the node."""
    from uctr_batch.batch import common, readiness

    env = _with(env, config.uctr_environment())
    ctx = job_context(req)
    answer = accept()
    if stop_stager(ctx.job_id, env):
        answer.note("info", f"uctr: job {ctx.job_id} on {ctx.node}: stopped its stager; "
                            "the next pull of the image resumes its downloads")
    staged = readiness.remove_readiness(ctx.job_id, env)
    staged = _remove_state(ctx.job_id, env) or staged
    if not staged:
        return answer  # nothing was staged for this job here
    result = common.release_as_user(ctx, common.site_policy(ctx, env), env, common.PBS_JOBID,
                                    timeout=wait_budget(req, config))  # within the alarm
    return answer.note("info", f"uctr: job {ctx.job_id} on {ctx.node}: removed "
                               f"{result['references']} reference(s), evicted "
                               f"{len(result['evicted'])} bundle(s)")


def _remove_state(job_id: str, env: Mapping[str, str]) -> bool:
    found = False
    for kind in ("outcome", "lock", "log"):
        try:
            state_path(job_id, kind, env).unlink()
            found = True
        except FileNotFoundError:
            pass
    return found


# -- uctr pbs hook|stage|install|uninstall -------------------------------------------------
def add_arguments(p: argparse.ArgumentParser, parser_class) -> None:
    sub = p.add_subparsers(dest="pbs_command", metavar="ACTION", parser_class=parser_class)
    sub.required = True
    for name, what in (("install", "create the resources and the hook with qmgr"),
                       ("uninstall", "delete the hook and the resources with qmgr; a guard "
                                     "hook then refuses container jobs"),
                       ("disable", "disable the hook with qmgr; a guard hook refuses "
                                   "container jobs until `uctr pbs install`")):
        action = sub.add_parser(name, help=what, description=what)
        action.add_argument("--dry-run", action="store_true",
                            help="print the qmgr commands (and the hook config) only")
        action.add_argument("--hook-name", default="uctr", help="PBS hook name (default uctr)")
        action.add_argument("--qmgr", default="qmgr", help="qmgr to run (default: from PATH)")
        if name == "install":
            action.add_argument("--config", metavar="FILE",
                                help="hook config to import (default: written for this host)")
            action.add_argument("--policy", metavar="FILE", help="site policy path for the hook")
            action.add_argument("--uctr-exec", metavar="PATH",
                                help="uctr-exec on the execution hosts (default: found here)")
            action.add_argument("--c-front", metavar="DIR",
                                help="build the C front of uctr-exec into DIR (node-local, on "
                                     "every execution host) and start ranks through it")
            action.add_argument("--alarm", type=envnum.bounded_int(10, 3600), default=60,
                                help="hook alarm in seconds (default 60)")
            action.add_argument("--no-mode-resource", action="store_true",
                                help="do not create the container_mode resource")
            action.add_argument("--no-engine-resource", action="store_true",
                                help="do not create the container_engine host resource")
    # internal, unlisted: the hook's entry (JSON in and out) and the detached stager
    hook = sub.add_parser("hook")
    hook.add_argument("--event", help="for ps and logs only: the request names its event")
    stager = sub.add_parser("stage")
    stager.add_argument("--lock-fd", type=envnum.bounded_int(0, 1 << 20), required=True)


def cmd_pbs(args) -> int:
    if args.pbs_command == "hook":
        return cmd_hook(args)
    if args.pbs_command == "stage":
        return cmd_stage(args)
    from uctr_batch.batch import pbs_install

    if args.pbs_command == "install":
        return pbs_install.install(args, out=sys.stdout)
    args.disable_only = args.pbs_command == "disable"
    return pbs_install.uninstall(args, out=sys.stdout)


def cmd_hook(args) -> int:
    """Read a request on stdin, print the answer on stdout: the hook's only call."""
    try:
        req = json.loads(sys.stdin.read() or "{}")
    except ValueError as e:
        answer = reject(f"uctr: unreadable hook request: {e}", "rerun")
    else:
        answer = handle(req)
    sys.stdout.write(json.dumps(_encodable(answer)) + "\n")
    return 0


def _encodable(value):
    """VALUE with every string UTF-8 encodable: a user's image name with bytes that are not
    UTF-8 (lone surrogates) would make pbs.logmsg() or event.reject() in the hook raise,
    and the job would be requeued instead of failed with the message."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encodable(v) for v in value]
    return value


def cmd_stage(args) -> int:
    """The detached stager: keep the inherited lock until the outcome is written."""
    try:  # only the hook starts it: by hand, a clean error and not a traceback
        os.set_inheritable(args.lock_fd, False)
        payload = json.loads(sys.stdin.read())
    except (OSError, ValueError) as e:
        raise errors.UsageError(f"not started by the PBS hook: {e}",
                                "`uctr pbs stage` is internal to the hook; do not run it by "
                                "hand") from None
    run_stager(payload, os.environ)
    os.close(args.lock_fd)
    return 0
