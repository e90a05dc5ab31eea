"""Replay templates: the next steps of a request set their container up without Python.

When the Python launcher has set up a step's N1 container (launch.main, run_shared), it
knows everything the next step with the same request needs: the mounts it made, in order
(modes.n1.setup_namespace records them), the records to write, and what would make any of
it stale. It writes that down, beside the step's fast-join record, as a replay template:

    <launch dir>/fast-replay-<key>.rec      (launchers/c/record.md, "Replay templates")

The SPANK plugin's local task 0 of a later step (launchers/c/replay.c) finds the template
of its request, checks it, and sets the container up in C: a holder process replays the
mounts, the task writes the step's records and joins like the other tasks. Only what varies
from one step of the same request to the next is substituted: the job and step ids. Any
doubt sends the task through uctr-exec, as before.

A template is written only where the replay gives what the Python launcher would give:
  * the step adds nothing of its own (no PMI directory of the step exists: MPI plugin
    none, or PMI-2 without directories; the C side checks, for the new step, that the
    same directories are still absent);
  * no policy path names the job, no per-rank GPU visibility, no --verbose, no fallback,
    no named container (its steps are noted for --container-name=NAME:exec, and the last
    rank of a --container-save step saves it);
  * the job and step ids are plain numbers (Slurm's).
It is good until the recipe expires (recipe.MAX_AGE) and while the files it depends on
(policy, drop-ins, ld cache, GPU nodes, policy bind sources, identity files, the bundle's
completion marker, the shared cache's file for a tag) are unchanged: replay_stat and
replay_marker lines.
"""

import os
import sys

from uctr_batch.launch.recipe import digest_bytes as digest  # C: fc_digest

PREFIX = "fast-replay-"
VARY = ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_ID")  # may differ; the rest must not
JOB, STEP = "\x01J", "\x01S"  # stand-ins in the templates: C writes the ids in their place
PARTITION_ENV = ("SLURM_JOB_PARTITION", "PBS_QUEUE")  # policy_cache.current_partition


def key(env, host_cwd, prefix) -> str:
    """The template's name part, from what the SPANK plugin's task knows of its request
    before it reads anything (C: rp_key)."""
    text = "\0".join([env.get("UCTR_IMAGE", ""), host_cwd or "/"] + list(prefix))
    return digest(text.encode("utf-8", "surrogateescape"))


def name(template_key: str) -> str:
    return PREFIX + template_key + ".rec"


def prepare(launch, entry):
    """(why not, []) or ("", the template's own lines), computed before the container is
    set up: afterwards the host's files are out of sight. complete() adds the rest."""
    env = launch.env
    if launch.opts.verbosity > 0:
        return "--verbose", []
    if launch.box is not None or launch.opts.name or launch.opts.save:
        return "a named container (--container-name, --container-save)", []
    if entry.get("step_part"):
        return "the step adds binds or devices of its own", []
    if not all((env.get(k) or "x").isdigit() and (env.get(k) or "").isascii() for k in VARY):
        return "no Slurm job and step ids", []
    if any(k.startswith("PMIX_DSTORE_") for k in env):
        return "PMIx dstore variables", []
    from uctr_batch.launch import recipe

    if recipe.names_the_job(launch.policy):
        return "a policy path names the job", []
    try:
        return "", own_lines(launch, entry)
    except (OSError, ValueError, KeyError) as e:
        return "cannot describe the container: %s" % e, []


def complete(record_lines, own, ops):
    """The template: the step's fast-join record, prepare()'s lines and the setup the
    container took (n1.setup_namespace); None when the record asks for Python."""
    if any(ln[0] == "fallback" for ln in record_lines) or not ops or ops[-1][0] != "pivot":
        return None
    return list(record_lines) + list(own) + [("replay_op",) + tuple(op) for op in ops]


def own_lines(launch, entry) -> list:
    """The replay_* lines (see the module docstring) and the partition the policy was
    resolved for."""
    from uctr_batch.launch import policy_cache, recipe, staged
    from uctr_batch.inject import pmi

    env, spec = launch.env, entry["spec"]
    _handover, prefix, _complete = launch.fast_request_parts()
    lines = [("require", k, env[k]) if k in env else ("absent", k) for k in PARTITION_ENV]
    lines.append(("replay_key", key(env, launch.host_cwd, prefix)))
    created = recipe_created(entry)
    lines.append(("replay_until", str(int(created + recipe.MAX_AGE))))
    lines.append(("replay_limit", str(int(launch.timeout))))
    lines.append(("replay_python", str(sys.version_info[0]), str(sys.version_info[1])))
    watched = policy_cache.watched_paths(policy_cache.policy_path(env))
    host = [row[0] for row in recipe.host_state(recipe.policy_bind_sources(launch.policy, env))]
    identity = [p for p in (spec.get("passwd"), spec.get("group")) if p]
    tag = index_ref(launch)
    for row in policy_cache.stat_rows(watched + host + identity + tag):
        lines.append(("replay_stat",) + tuple(str(v) for v in row))
    lines.append(("replay_marker", os.path.join(launch.image.bundle, staged.MARKER),
                  launch.image.manifest_digest))
    lines += [("replay_vary", k) for k in VARY]
    sentinel = dict(env, SLURM_JOB_ID=JOB, SLURM_JOBID=JOB, SLURM_STEP_ID=STEP)
    for path in pmi._slurm_pmix_dirs(sentinel, launch.policy, JOB, STEP):
        lines.append(("replay_absent_dir", path))
    lines.append(("replay_nskey", nskey_template(launch)))
    import marshal

    lines.append(("replay_extras", marshal.dumps(entry["extras"]).hex()))
    manifest = entry.get("manifest_path")
    if manifest:
        with open(manifest, "rb") as f:
            lines.append(("replay_manifest", manifest, f.read().hex()))
    lines += [("replay_warning", w) for w in entry.get("warnings") or ()]
    lines.append(("replay_command", launch.argv[0]))
    return lines


def index_ref(launch) -> list:
    """The shared cache's file the index entry of a tag depends on (staged.lookup), as a
    one-path list; [] for a digest. ValueError when the entry is not this image's."""
    from uctr_batch.launch import staged
    from uctr_batch.launch.nodelock import open_private_dir, read_marshal

    fd = open_private_dir(staged.launch_dir(launch.local_dir))
    try:
        entry = read_marshal(fd, "img-%s.idx" % staged.image_key(launch.opts.image))
    finally:
        os.close(fd)
    if not isinstance(entry, dict) or entry.get("manifest_digest") != \
            launch.image.manifest_digest:
        raise ValueError("no index entry for the image")
    ref = entry.get("ref")
    return [ref[0]] if ref else []


def recipe_created(entry) -> float:
    import time

    return entry.get("created") or time.time()


def nskey_template(launch) -> str:
    """repr() of the namespace key's inputs with the ids replaced by JOB and STEP: the C
    creator puts the new step's ids back and hashes it (recipe.digest). Checked here: with
    this step's ids it gives this step's key."""
    from uctr_batch.launch import recipe

    env = launch.env
    sentinel = dict(env, SLURM_JOB_ID=JOB, SLURM_JOBID=JOB, SLURM_STEP_ID=STEP)
    text = repr(recipe.inputs(launch.image_part, sentinel))
    again = fill(text, env["SLURM_JOBID"], env["SLURM_STEP_ID"])
    if again != repr(launch.inputs):
        raise ValueError("the namespace key does not come back from its template")
    return text


def fill(text: str, job: str, step: str) -> str:
    """The template TEXT with the ids put back (C: rp_fill)."""
    return text.replace(repr(JOB), repr(job)).replace(repr(STEP), repr(step))


def write(dir_fd: int, template_key: str, lines) -> None:
    from uctr_batch.launch import fastrec

    data = fastrec.dumps([(fastrec.HEADER, str(fastrec.VERSION))] + list(lines) + [("end",)])
    if len(data) > fastrec.MAX_BYTES:
        return
    tmp = fastrec._write_temporary(dir_fd, name(template_key), data)
    os.replace(tmp, name(template_key), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
