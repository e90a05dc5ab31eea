"""`uctr pbs install` and `uctr pbs uninstall`: the qmgr steps, run or printed.

install:
    create resource container_image type=string      job-wide: no flag=h, not in sched_config
    set resource container_image flag = m            sent to the MoMs: execjob hooks see it
    create resource container_mode type=string       (both unless --no-mode-resource)
    create resource container_engine type=string, flag=h   host-level (PBS Professional's
                                                     syntax; unless --no-engine-resource)
    set resource container_mode flag = m
    create hook uctr
    set hook uctr event = "queuejob,execjob_begin,execjob_prologue,execjob_launch,execjob_end"
    set hook uctr alarm = 60, fail_action = none, enabled = true
    import hook uctr application/x-python default hooks/pbs/uctr_hook.py
    import hook uctr application/x-config default <hook config>
    delete hook uctr_guard                               only if a guard was left behind

Without flag=m, pbs_server keeps a custom job-wide resource to itself: the execjob hooks on
the MoMs would see no container_image in Resource_List (found on a real OpenPBS; the `set`
also fixes a resource created earlier without it). The event is set before the imports:
MoMs only receive the files of an enabled hook with events. fail_action stays "none": a
hook failure must never offline a vnode by itself (the hook offlines vnodes only for node
faults, and only when its config says so). Creations are skipped when qmgr already knows
the object, so install can be run again to update the hook. uninstall deletes the hook,
then container_image and container_mode (a resource that jobs in the history still name
is kept, with a warning); container_engine stays, as vnodes may offer it. Before it deletes anything, uninstall (and `uctr pbs disable`, which only
disables the hook) creates the guard: a queuejob hook (hooks/pbs/uctr_guard.py) that refuses
jobs asking for an image, which would otherwise run on the host. install deletes the guard
last, once the uctr hook is enabled, so no container job is accepted unchecked in between.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, TextIO

from uctr_batch import errors, log
from uctr_batch.batch import pbs

_log = log.get("pbs")

REPO_HOOK_DIR = Path(__file__).resolve().parents[2] / "hooks" / "pbs"
HOOK_FILE = "uctr_hook.py"
GUARD_FILE = "uctr_guard.py"  # left behind by uninstall/disable, deleted by install
CONFIG_FILE = "uctr_hook.json"  # qmgr takes a config by its suffix: .json


@dataclass(frozen=True)
class Step:
    command: str  # one qmgr -c command
    exists: Optional[str] = None  # qmgr -c query that succeeds when the step is not needed

    def argv(self, qmgr: str) -> List[str]:
        return [qmgr, "-c", self.command]


def install_steps(hook: str, hook_file: Path, config_file: Path, alarm: int,
                  mode_resource: bool = True, engine_resource: bool = True) -> List[Step]:
    from uctr_batch.batch.pbs_pro import ENGINE_RESOURCE

    resources = [pbs.IMAGE_RESOURCE] + ([pbs.MODE_RESOURCE] if mode_resource else [])
    steps = []
    for name in resources:
        steps += [Step(f"create resource {name} type=string", exists=f"list resource {name}"),
                  Step(f"set resource {name} flag = m")]
    if engine_resource:  # PBS Professional's: host-level, asked for in select chunks
        steps.append(Step(f"create resource {ENGINE_RESOURCE} type=string, flag=h",
                          exists=f"list resource {ENGINE_RESOURCE}"))
    steps.append(Step(f"create hook {hook}", exists=f"list hook {hook}"))
    steps += [Step(f'set hook {hook} event = "{",".join(pbs.INSTALLED_EVENTS)}"'),
              Step(f"set hook {hook} alarm = {alarm}"),
              Step(f"set hook {hook} fail_action = none"),
              Step(f"set hook {hook} enabled = true"),
              Step(f"import hook {hook} application/x-python default {_qmgr_path(hook_file)}"),
              Step(f"import hook {hook} application/x-config default {_qmgr_path(config_file)}")]
    guard = guard_name(hook)  # last: the uctr hook checks container jobs from now on
    steps.append(Step(f"delete hook {guard}", exists=f"list hook {guard}"))
    return steps


def uninstall_steps(hook: str, guard_file: Path) -> List[Step]:
    # the guard first: from then on no container job is accepted to run on the host;
    # then the reverse of install (a query that FAILS means there is nothing to delete)
    return [*guard_steps(hook, guard_file),
            Step(f"delete hook {hook}", exists=f"list hook {hook}"),
            *(Step(f"delete resource {name}", exists=f"list resource {name}")
              for name in (pbs.MODE_RESOURCE, pbs.IMAGE_RESOURCE))]


def disable_steps(hook: str, guard_file: Path) -> List[Step]:
    """The guard, then the hook disabled (kept, with its config, for a later install)."""
    return [*guard_steps(hook, guard_file), Step(f"set hook {hook} enabled = false",
                                                            exists=f"list hook {hook}")]


def guard_name(hook: str) -> str:
    return f"{hook}_guard"


def guard_steps(hook: str, guard_file: Path) -> List[Step]:
    """The queuejob hook that refuses container jobs while HOOK is gone or disabled. A
    queuejob hook that raises rejects the job: the guard fails closed."""
    guard = guard_name(hook)
    return [Step(f"create hook {guard}", exists=f"list hook {guard}"),
            Step(f"set hook {guard} event = queuejob"),
            Step(f"set hook {guard} enabled = true"),
            Step(f"import hook {guard} application/x-python default {_qmgr_path(guard_file)}")]


def _qmgr_path(path: Path) -> str:
    text = str(path)
    if any(c.isspace() for c in text) or '"' in text:
        raise errors.UsageError(
            f"qmgr cannot import a file whose path has spaces or quotes: {text}",
            "copy it to a plain path first")
    return text


# -- the hook config ----------------------------------------------------------------------
def default_config(policy: Optional[str], uctr_exec: Optional[str], alarm: int) -> pbs.HookConfig:
    """A hook config for execution hosts laid out like this one."""
    import uctr_batch

    package_parent = Path(uctr_batch.__file__).resolve().parent.parent
    return pbs.HookConfig(
        python=sys.executable, pythonpath=None if _installed_package() else str(package_parent),
        uctr_exec=os.path.abspath(uctr_exec or find_uctr_exec()),
        policy=policy or os.environ.get("UCTR_POLICY") or None,
        run_dir=os.environ.get("UCTR_RUN_DIR") or None, alarm=float(alarm))


def with_c_front(config: pbs.HookConfig, directory: str, dry_run: bool) -> pbs.HookConfig:
    """Build the C front of uctr-exec (docs/launcher.md, "Two paths") into DIRECTORY, a
    node-local path that every execution host has (copy it there), for the Python
    uctr-exec of CONFIG; the hook then starts ranks through the front."""
    import dataclasses

    from uctr_batch.batch import cfront

    if not os.path.isabs(directory):
        raise errors.UsageError(f"--c-front must be an absolute path: {directory}",
                                "give a node-local directory, e.g. --c-front /usr/local/lib/uctr")
    target = os.path.join(directory, "uctr-exec")
    if not dry_run:
        if cfront.compiler() is None:
            raise errors.ConfigError("--c-front needs make and a C compiler on this host",
                                     "install them, or leave --c-front out (Python per rank)")
        from uctr_batch import fsutil

        os.makedirs(directory, 0o755, exist_ok=True)
        fsutil.write_atomic(Path(target), cfront.build_front(REPO_HOOK_DIR.parents[1],
                                                             config.uctr_exec, ()), 0o755)
    return dataclasses.replace(config, uctr_exec=target)


def find_uctr_exec() -> str:
    """uctr-exec beside this Python, on PATH, or the shim in the checkout.

    Run from a checkout (the hook config then names it as pythonpath), the checkout's shim
    comes first: uctr-exec beside the Python would run whatever uctr_batch is installed
    there, another version than the hook's (seen on a real OpenPBS: an older installed copy
    refused the policy the hook had accepted)."""
    beside = Path(sys.executable).parent / "uctr-exec"
    shim = REPO_HOOK_DIR.parents[1] / "launchers" / "uctr-exec"
    candidates = [beside, shutil.which("uctr-exec"), shim]
    if not _installed_package():
        candidates.insert(0, shim)
    for candidate in candidates:
        if candidate and os.access(str(candidate), os.X_OK):
            return str(candidate)
    return str(beside)


def _installed_package() -> bool:
    """Whether this uctr_batch is an installed one (site-packages), not a checkout."""
    import uctr_batch

    package_parent = Path(uctr_batch.__file__).resolve().parent.parent
    return any(part in ("site-packages", "dist-packages") for part in package_parent.parts)


def load_config(path: str) -> pbs.HookConfig:
    from uctr_batch import fsutil  # a regular file of at most 1 MiB: not /dev/zero, no FIFO

    data = fsutil.read_regular_file(path, 1 << 20, "the hook config",
                                    "check the --config path, or leave --config out to write one "
                                    "for this host")
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise errors.ConfigError(f"the hook config {path} is not JSON: {e}",
                                 "give the JSON file `uctr pbs install --dry-run` prints, or "
                                 "leave --config out") from e
    if not isinstance(parsed, dict):
        raise errors.ConfigError(f"the hook config {path} is not a JSON object",
                                 "give the JSON file `uctr pbs install --dry-run` prints, or "
                                 "leave --config out")
    return pbs.HookConfig.from_dict(parsed)


def config_json(config: pbs.HookConfig) -> str:
    """One key per line (unset keys left out): easy to read and to diff."""
    items = [(k, v) for k, v in config.to_dict().items() if v not in (None, {})]
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in items) + "\n}\n"


# -- running ------------------------------------------------------------------------------
def install(args, out: TextIO) -> int:
    if not args.dry_run:
        _require(args.qmgr)
    if args.config:
        config = load_config(args.config)
    else:
        config = default_config(args.policy, args.uctr_exec, args.alarm)
        if getattr(args, "c_front", None):
            config = with_c_front(config, args.c_front, args.dry_run)
    hook_file = _hook_file(HOOK_FILE)
    if not os.access(config.uctr_exec, os.X_OK):
        _log.warning("uctr-exec is not at %s on this host; it must be there on every "
                     "execution host (--uctr-exec PATH)", config.uctr_exec)
    if args.dry_run:
        out.write(f"# {CONFIG_FILE}, imported as application/x-config:\n")
        out.write("".join(f"#   {line}\n" for line in config_json(config).splitlines()))
        steps = install_steps(args.hook_name, hook_file, Path(CONFIG_FILE), args.alarm,
                              mode_resource=not args.no_mode_resource,
                              engine_resource=not args.no_engine_resource)
        return _print_steps(steps, args.qmgr, out)
    with tempfile.TemporaryDirectory(prefix="uctr-pbs-") as tmp:
        config_file = Path(tmp) / CONFIG_FILE
        config_file.write_text(config_json(config))
        os.chmod(tmp, 0o755)  # qmgr hands the path to pbs_server, which reads it as root
        steps = install_steps(args.hook_name, hook_file, config_file, args.alarm,
                              mode_resource=not args.no_mode_resource,
                              engine_resource=not args.no_engine_resource)
        return _run_steps(steps, args.qmgr, out, "install")


def uninstall(args, out: TextIO) -> int:
    """uninstall, or with args.disable_only `uctr pbs disable`: both leave the guard."""
    guard_file = _hook_file(GUARD_FILE)
    what = "disable" if getattr(args, "disable_only", False) else "uninstall"
    steps = (disable_steps if what == "disable" else uninstall_steps)(args.hook_name, guard_file)
    if args.dry_run:
        return _print_steps(steps, args.qmgr, out)
    _require(args.qmgr)
    return _run_steps(steps, args.qmgr, out, what)


def _hook_file(name: str) -> Path:
    path = REPO_HOOK_DIR / name
    if not path.is_file():
        raise errors.ConfigError(f"the hook file is missing: {path}",
                                 "run `uctr pbs` from a complete uctr-batch checkout or "
                                 "installation")
    return path


def _require(qmgr: str) -> None:
    if shutil.which(qmgr) is None:
        raise errors.ConfigError(f"{qmgr} not found: is OpenPBS installed on this host?",
                                 "run on the PBS server host, or see --dry-run")


def _print_steps(steps: List[Step], qmgr: str, out: TextIO) -> int:
    for step in steps:
        word = "unless" if step.command.startswith("create") else "only if"
        when = f"   # {word}: {qmgr} -c {shlex.quote(step.exists)}" if step.exists else ""
        out.write(shlex.join(step.argv(qmgr)) + when + "\n")
    return 0


def _run_steps(steps: List[Step], qmgr: str, out: TextIO, what: str) -> int:
    for step in steps:
        if step.exists and _not_needed(step, _query(qmgr, step.exists)):
            out.write(f"# skipped, nothing to do: {step.command}\n")
            continue
        out.write(shlex.join(step.argv(qmgr)) + "\n")
        cp = subprocess.run(step.argv(qmgr), capture_output=True, text=True, timeout=120)
        if cp.returncode == 0:
            continue
        detail = (cp.stderr or cp.stdout).strip()
        if step.command.startswith("delete resource") and "busy" in detail.lower():
            # finished jobs in the job history still name it: the hook is gone, which is
            # what matters; the resource can go once the history has expired
            _log.warning("kept %s: jobs (finished ones in the job history too) still "
                         "request it; later: %s -c '%s'", step.command.split()[-1], qmgr,
                         step.command)
            continue
        raise errors.ConfigError(f"uctr pbs {what}: qmgr -c '{step.command}' failed: {detail}",
                                 _hint_for(step.command, detail))
    return 0


def _not_needed(step: Step, exists: bool) -> bool:
    """A create of what exists, or a delete of what does not."""
    return exists if step.command.startswith("create") else not exists


def _query(qmgr: str, command: str) -> bool:
    """True when qmgr knows the object the query names."""
    cp = subprocess.run([qmgr, "-c", command], capture_output=True, text=True, timeout=60)
    return cp.returncode == 0


def _hint_for(command: str, detail: str) -> Optional[str]:
    if "Unauthorized" in detail or "permission" in detail.lower():
        return "run as root (or a PBS manager) on the server host"
    return None
