"""uctr-batch hook for OpenPBS: run jobs inside a container image.

    qsub -l container_image=docker.io/library/debian:12 job.sh     (or -v UCTR_IMAGE=...)

Installed with `uctr pbs install` for the events queuejob, execjob_begin, execjob_prologue,
execjob_launch and execjob_end (execjob_epilogue is handled like execjob_end), with the JSON
config imported as application/x-config (see site-config/pbs/).

This file only parses the event, asks uctr (`python -m uctr_batch pbs hook`, JSON on stdin
and stdout; the logic is uctr_batch/batch/pbs.py) and applies the answer. Jobs that ask for
no image are accepted without starting anything. pbs_python runs it with __name__ set to
'builtins'; it needs the standard library only.
"""

import json
import socket
import subprocess
import traceback

import pbs

IMAGE_RESOURCE = "container_image"
MODE_RESOURCE = "container_mode"
JOB_VARIABLES = ("UCTR_IMAGE", "UCTR_MODE", "UCTR_MPI", "UCTR_GPU", "UCTR_JOB_SHELL",
                 "PBS_CONTAINER_ARGS")
SELECT_RESOURCE = "select"  # PBS Professional syntax: container_engine=NAME in its chunks
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ANSWER_MARGIN = 3  # seconds between uctr's deadline and the hook alarm
EXIT_EVENTS = ("execjob_epilogue", "execjob_end")
LOG_LEVELS = {"error": "LOG_ERROR", "warning": "LOG_WARNING", "info": "EVENT_JOB",
              "debug": "EVENT_DEBUG"}


def event_name(event_type):
    for name in ("queuejob", "execjob_begin", "execjob_prologue", "execjob_launch",
                 "execjob_epilogue", "execjob_end"):
        if event_type == getattr(pbs, name.upper(), None):
            return name
    return None


def _text(value):
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def resource(job, name):
    try:
        return _text(job.Resource_List[name])
    except Exception:  # the resource is not defined on this server
        return None


def variables(job):
    found = {}
    try:
        listed = job.Variable_List or {}
        for name in JOB_VARIABLES:
            if _text(listed.get(name)):
                found[name] = _text(listed.get(name))
    except Exception:
        pass
    return found


def job_fields(job):
    queue = getattr(job, "queue", None)
    return {
        "id": _text(getattr(job, "id", None)),
        "euser": _text(getattr(job, "euser", None)),
        "egroup": _text(getattr(job, "egroup", None)),
        "queue": _text(getattr(queue, "name", None) or queue),
        "resources": {name: value for name, value in
                      ((IMAGE_RESOURCE, resource(job, IMAGE_RESOURCE)),
                       (MODE_RESOURCE, resource(job, MODE_RESOURCE)),
                       (SELECT_RESOURCE, resource(job, SELECT_RESOURCE))) if value},
        "variables": variables(job),
    }


def wants_container(fields):
    """An image, or PBS Professional's container syntax (refused at qsub without an image)."""
    return bool(fields["resources"].get(IMAGE_RESOURCE) or fields["variables"].get("UCTR_IMAGE")
                or fields["variables"].get("PBS_CONTAINER_ARGS")
                or "container_engine=" in (fields["resources"].get(SELECT_RESOURCE) or ""))


def read_config():
    path = getattr(pbs, "hook_config_filename", None)
    if not path:
        return {}
    with open(path) as f:
        return json.load(f)


def local_node():
    try:
        return pbs.get_local_nodename()
    except Exception:
        return socket.gethostname().split(".")[0]


def pbs_home():
    try:
        return pbs.get_pbs_conf().get("PBS_HOME")
    except Exception:
        return None


def alarm_of(event, config):
    try:
        return float(event.alarm)
    except Exception:  # not every pbs module exposes the alarm to the hook
        return float(config.get("alarm") or 30)


def build_request(event, name, fields, config):
    request = {"event": name, "config": config, "job": fields, "node": local_node(),
               "alarm": alarm_of(event, config)}
    if name == "execjob_launch":
        request["launch"] = {"progname": event.progname, "argv": list(event.argv or []),
                             "env": dict(event.env or {})}
    if name != "queuejob":
        request["pbs_home"] = pbs_home()  # mom_priv/jobs: which jobs are still on this host
    if name != "queuejob":
        try:
            request["vnodes"] = list(event.vnode_list.keys())
        except Exception:
            request["vnodes"] = []
    return request


def uctr_environment(config):
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8"}
    if config.get("pythonpath"):
        env["PYTHONPATH"] = config["pythonpath"]
    env.update(config.get("environment") or {})
    return env


def ask_uctr(request, config):
    """uctr's answer to REQUEST; a made-up one when uctr cannot answer in time."""
    argv = [config.get("python") or "/usr/bin/python3", "-m", "uctr_batch", "pbs", "hook",
            "--event", request["event"]]
    timeout = max(2.0, request["alarm"] - ANSWER_MARGIN)
    try:
        done = subprocess.run(argv, input=json.dumps(request).encode(), capture_output=True,
                              timeout=timeout, env=uctr_environment(config), cwd="/")
        answer = json.loads(done.stdout.decode() or "null")
        if done.returncode != 0 or not isinstance(answer, dict):
            raise RuntimeError("exit %d: %s" % (done.returncode,
                                                done.stderr.decode(errors="replace").strip()[-500:]))
    except subprocess.TimeoutExpired:  # in doubt (a slow registry? a slow node?): no offline
        return failed(request, config, "uctr did not answer within %.0f s" % timeout,
                      offline=False)
    except Exception as e:
        return failed(request, config, "cannot run uctr (%s): %s" % (argv[0], e))
    stderr = done.stderr.decode(errors="replace").strip()
    if stderr:
        answer.setdefault("log", []).append(["debug", "uctr: " + stderr[-2000:]])
    return answer


def failed(request, config, why, offline=True):
    """uctr itself does not work here: a problem of this host, never of the job's owner."""
    name = request["event"]
    if name == "queuejob":
        return {"action": "reject", "message": "uctr: cannot check the container request: " + why,
                "log": [["error", why]]}
    if name in EXIT_EVENTS:
        return {"action": "accept", "log": [["error", "uctr: cleanup skipped: " + why]]}
    message = "uctr: node %s cannot run container jobs: %s" % (request["node"], why)
    return {"action": "reject", "message": message, "job_action": "rerun",
            "offline": offline and config.get("node_fault", "offline") == "offline",
            "comment": ("uctr: " + why)[:200], "log": [["error", message]]}


def apply(event, answer, node):
    for level, text in answer.get("log") or []:
        pbs.logmsg(getattr(pbs, LOG_LEVELS.get(level, "EVENT_DEBUG")), text)
    if "progname" in answer:
        event.progname = answer["progname"]
    if "argv" in answer:
        event.argv = list(answer["argv"])
    for name, value in (answer.get("env") or {}).items():
        event.env[name] = value
    if answer.get("job_comment"):
        set_comment(event.job, answer["job_comment"])
    if answer.get("offline"):
        offline_local_vnodes(event, node, answer.get("comment") or "uctr: node fault")
    if answer.get("job_action") == "rerun":
        event.job.rerun()
    elif answer.get("job_action") == "delete":
        event.job.delete()
    if answer.get("action") == "reject":
        event.reject(answer.get("message") or "uctr: rejected")
    event.accept()


def set_comment(job, text):
    """The job's comment (qstat -f), where this event lets a hook set it; the same text is
    in the job's .e file and the MoM log either way."""
    try:
        job.comment = text
    except Exception as e:
        pbs.logmsg(pbs.EVENT_DEBUG, "uctr: cannot set the job comment here: %s" % e)


def offline_local_vnodes(event, node, comment):
    for name in list(event.vnode_list.keys()):
        if name == node or name.startswith(node + "["):
            vnode = event.vnode_list[name]
            vnode.state = pbs.ND_OFFLINE
            vnode.comment = comment


def main():
    event = pbs.event()
    name = event_name(event.type)
    if name is None:
        event.accept()
    fields = job_fields(event.job)
    if not wants_container(fields):
        event.accept()
    config = read_config()
    request = build_request(event, name, fields, config)
    apply(event, ask_uctr(request, config), request["node"])


if __name__ in ("builtins", "__builtin__"):
    try:
        main()
    except SystemExit:  # accept() and reject() end the hook this way
        pass
    except Exception:
        pbs.logmsg(pbs.LOG_ERROR, "uctr hook: " + traceback.format_exc().replace("\n", " | "))
        pbs.event().reject("uctr hook failed: %s" % traceback.format_exc().splitlines()[-1])
