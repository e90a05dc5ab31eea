"""A test double of OpenPBS's `pbs` hook module, for contract tests where no PBS runs.

It follows the documented interface (openpbs doc/man1/pbs_module.7B, pbs_hook_attributes.7B)
and the behaviour of its implementation (src/modules/python/pbs/v1/_svr_types.py,
src/resmom/mom_hook_func.c), limited to what a job hook uses:

  pbs.event(): .type, .hook_name, .job, .vnode_list (MoM events), .progname/.argv/.env
               (execjob_launch only; the only event attributes a hook may set),
               .accept() / .reject(msg): record the result and raise SystemExit
  event.job:   .id, .euser, .egroup, .queue (.name), .Resource_List[name] (None if unset),
               .Variable_List (dict), .rerun() / .delete() (MoM events only)
  vnode:       .state, .comment
  pbs.hook_config_filename, pbs.logmsg(level, msg), pbs.get_local_nodename(),
  pbs.get_pbs_conf() (PBS_HOME, PBS_EXEC),
  event type, log and vnode state constants (values from src/include/hook.h and
  src/lib/Libpython/module_pbs_v1.c)

A hook that ends without accept() or reject() is accepted; an unhandled exception rejects
(as pbs_python does). Each event runs in a fresh interpreter, like pbs_python under MoM:
`python -m tests.pbs.pbs_double` reads a spec (JSON) on stdin and prints the result (JSON).
HookRunner starts it in its own session with an alarm and kills that session afterwards,
as MoM does (kill(-hook, SIGKILL) after every hook, alarm or not).
"""

import builtins
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]

EVENT_TYPES = {"queuejob": 0x01, "execjob_begin": 0x40, "execjob_prologue": 0x80,
               "execjob_epilogue": 0x100, "execjob_end": 0x200, "execjob_launch": 0x800}
MOM_EVENTS = 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800 | 0x1000 | 0x2000 | 0x4000
ND_FREE, ND_OFFLINE = 0x0, 0x1
LOG_CONSTANTS = {"LOG_DEBUG": 5, "LOG_WARNING": 6, "LOG_ERROR": 7, "EVENT_ERROR": 0x1,
                 "EVENT_SYSTEM": 0x2, "EVENT_ADMIN": 0x4, "EVENT_JOB": 0x8, "EVENT_DEBUG": 0x80,
                 "EVENT_DEBUG2": 0x100, "EVENT_DEBUG3": 0x400, "EVENT_DEBUG4": 0x800}


class EventIncompatibleError(Exception):
    """Raised (as by pbs) when an event attribute does not exist for this event type."""


class BadAttributeValueError(Exception):
    pass


class _Results:
    def __init__(self):
        self.accepted: Optional[bool] = None
        self.reject_message: Optional[str] = None
        self.logs: List[list] = []


class ResourceList(dict):
    """Job resources: an unset resource reads as None."""

    def __getitem__(self, name):
        return self.get(name)


class Queue:
    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return self.name


class Vnode:
    def __init__(self, name: str):
        self.name = name
        self.state = ND_FREE
        self.comment = None


class Job:
    def __init__(self, spec: dict, event_type: int):
        self._event_type = event_type
        self.id = spec.get("id")
        self.euser = spec.get("euser")
        self.egroup = spec.get("egroup")
        self.queue = Queue(spec["queue"]) if spec.get("queue") else None
        self.Resource_List = ResourceList(spec.get("Resource_List") or {})
        self.Variable_List = dict(spec.get("Variable_List") or {})
        self.rerun_requested = False
        self.delete_requested = False
        self.comment = None  # settable; a real MoM may refuse it (the hook tolerates that)

    def rerun(self):
        if not self._event_type & MOM_EVENTS:
            raise NotImplementedError("rerun(): only for mom hooks")
        self.rerun_requested = True

    def delete(self):
        if not self._event_type & MOM_EVENTS:
            raise NotImplementedError("delete(): only for mom hooks")
        self.delete_requested = True


class Event:
    _SETTABLE = ("progname", "argv", "env")

    def __init__(self, spec: dict, results: _Results):
        name = spec["event"]
        param = {"job": Job(spec.get("job") or {}, EVENT_TYPES[name])}
        if EVENT_TYPES[name] & MOM_EVENTS:
            param["vnode_list"] = {n: Vnode(n) for n in spec.get("vnodes") or []}
        if name == "execjob_launch":
            param.update(progname=spec.get("progname"), argv=list(spec.get("argv") or []),
                         env=dict(spec.get("env") or {}))
        object.__setattr__(self, "_param", param)
        object.__setattr__(self, "_results", results)
        object.__setattr__(self, "type", EVENT_TYPES[name])
        object.__setattr__(self, "hook_name", spec.get("hook_name", "uctr"))

    def __getattr__(self, key):
        try:
            return self._param[key]
        except KeyError:
            raise EventIncompatibleError(f'"{key}" not found in self._param') from None

    def __setattr__(self, name, value):
        if name in self._param and name in self._SETTABLE:
            self._param[name] = value
            return
        raise BadAttributeValueError(f"event attribute '{name}' is readonly")

    def accept(self, ecode=0):
        if self._results.accepted is None:
            self._results.accepted = True
        raise SystemExit(str(ecode))

    def reject(self, emsg="", ecode=255):
        if self._results.accepted is None:
            self._results.accepted = False
            self._results.reject_message = emsg
        raise SystemExit(str(ecode))


def build_module(spec: dict, results: _Results) -> types.ModuleType:
    module = types.ModuleType("pbs")
    event = Event(spec, results)
    for name, value in EVENT_TYPES.items():
        setattr(module, name.upper(), value)
    for name, value in LOG_CONSTANTS.items():
        setattr(module, name, value)
    module.MOM_EVENTS = MOM_EVENTS
    module.ND_FREE, module.ND_OFFLINE = ND_FREE, ND_OFFLINE
    module.EventIncompatibleError = EventIncompatibleError
    module.BadAttributeValueError = BadAttributeValueError
    module.hook_config_filename = spec.get("config_file")
    module.event = lambda: event
    module.logmsg = lambda level, message: results.logs.append([level, str(message)])
    module.get_local_nodename = lambda: spec.get("local_node", "node1")
    module.get_pbs_conf = lambda: {"PBS_HOME": spec.get("pbs_home", "/var/spool/pbs"),
                                   "PBS_EXEC": "/opt/pbs"}
    return module


def run_hook(hook_file: str, spec: dict) -> dict:
    """Run HOOK_FILE for the event described by SPEC, in this interpreter."""
    results = _Results()
    module = build_module(spec, results)
    sys.modules["pbs"] = module
    exception = None
    code = compile(Path(hook_file).read_text(), hook_file, "exec")
    # pbs_python runs the hook's code with __name__ == 'builtins' (runpy would replace the
    # real builtins module while it runs)
    namespace = {"__name__": "builtins", "__file__": hook_file, "__builtins__": builtins}
    try:
        exec(code, namespace)
    except SystemExit:
        pass
    except Exception as e:  # pbs_python: an unhandled exception rejects the event
        exception = f"{type(e).__name__}: {e}"
        if results.accepted is None:
            results.accepted = False
    finally:
        del sys.modules["pbs"]
    event = module.event()
    result = {"accepted": results.accepted is not False, "reject_message": results.reject_message,
              "exception": exception, "logs": results.logs,
              "job_rerun": event.job.rerun_requested, "job_delete": event.job.delete_requested,
              "job_comment": event.job.comment}
    if "vnode_list" in event._param:
        result["vnodes"] = {n: {"state": v.state, "comment": v.comment}
                            for n, v in event.vnode_list.items()}
    if spec["event"] == "execjob_launch":
        result.update(progname=event.progname, argv=event.argv, env=event.env)
    return result


class HookRunner:
    """Runs a hook file per event in a fresh process, with MoM's alarm and clean-up."""

    def __init__(self, hook_file: Path, config_file: Path, node: str = "node1"):
        self.hook_file, self.config_file, self.node = hook_file, config_file, node

    def spec(self, event: str, job: dict, **extra) -> dict:
        spec = {"event": event, "job": job, "config_file": str(self.config_file),
                "local_node": self.node, "vnodes": [self.node]}
        spec.update(extra)
        return spec

    def run(self, event: str, job: dict, alarm: float = 30.0, **extra) -> dict:
        """The result dict, plus "alarm": True when the hook overran ALARM and was killed,
        "seconds" it took and "hook_pid"."""
        spec = self.spec(event, job, **extra)
        started = time.monotonic()
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.pbs.pbs_double", str(self.hook_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=REPO, env=_clean_env(), start_new_session=True)
        try:
            out, err = child.communicate(json.dumps(spec).encode(), timeout=alarm)
            result = json.loads(out.decode() or "{}")
            result.setdefault("stderr", err.decode(errors="replace"))
            result["alarm"] = False
        except subprocess.TimeoutExpired:
            result = {"alarm": True, "accepted": False}
        finally:
            _kill_group(child.pid)  # MoM: kill(-child, SIGKILL), always
            child.wait()
        result["seconds"] = time.monotonic() - started
        result["hook_pid"] = child.pid
        return result


def _clean_env() -> Dict[str, str]:
    # pbs_python starts with MoM's environment, not the test's: nothing of ours leaks
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":
    sys.stdout.write(json.dumps(run_hook(sys.argv[1], json.load(sys.stdin))) + "\n")
