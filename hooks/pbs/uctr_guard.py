"""uctr-batch guard for OpenPBS: refuse container jobs while the uctr hook is away.

`uctr pbs uninstall` and `uctr pbs disable` leave this queuejob hook behind (created before
the uctr hook goes, so no job slips through between); `uctr pbs install` deletes it once the
uctr hook is enabled again. Without it, a job asking for an image would be accepted and its
script would run on the host, outside the image the user asked for.

A job asks for a container with -l container_image=..., -v UCTR_IMAGE=..., or (PBS
Professional syntax) container_engine=... in a select chunk. Everything else is accepted.
Standard library and the pbs module only; pbs_python runs it with __name__ 'builtins'.
"""

import pbs

MESSAGE = ("uctr: container jobs are not accepted now: the uctr-batch hook is not installed or "
           "is disabled on this PBS server, and the job would run on the host (hint: ask "
           "your administrator; leave out %s to run the job on the host)")


def _text(value):
    if value is None:
        return ""
    return str(value).strip()


def _resource(job, name):
    try:
        return _text(job.Resource_List[name])
    except Exception:  # the resource is not defined on this server (any more)
        return ""


def _variable(job, name):
    try:
        return _text((job.Variable_List or {}).get(name))
    except Exception:
        return ""


def container_request(job):
    """What in JOB asks for a container ('' if nothing)."""
    if _resource(job, "container_image"):
        return "-l container_image"
    if _variable(job, "UCTR_IMAGE"):
        return "-v UCTR_IMAGE"
    if "container_engine=" in _resource(job, "select"):
        return "container_engine in select"
    return ""


def main():
    event = pbs.event()
    if event.type != getattr(pbs, "QUEUEJOB", event.type):
        event.accept()
    asked = container_request(event.job)
    if asked:
        pbs.logmsg(pbs.EVENT_DEBUG, "uctr guard: refused a job with " + asked)
        event.reject(MESSAGE % asked)
    event.accept()


if __name__ in ("builtins", "__builtin__"):
    try:
        main()
    except SystemExit:  # accept() and reject() end the hook this way
        pass
    except Exception as e:  # fail closed: a broken guard must not let container jobs through
        pbs.event().reject("uctr guard failed (%s); container jobs are refused" % e)
