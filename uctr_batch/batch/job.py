"""The job a Slurm prolog/epilog runs for: ids, user, node and the requested container.

Everything comes from the hook's environment (SLURM_JOB_*, SLURMD_NODENAME, and SPANK_UCTR_*
set by the SPANK plugin through spank_job_control_setenv). Slurm's own ``--container=IMAGE``
is only in the job record, never in the Prolog environment, so it is looked up there, with
pyslurm when it imports (it must be built for the site's Slurm) and else with
``scontrol show job -o``. The plugin's client side sets SPANK_UCTR_NO_IMAGE=1 when it saw
neither option: then there is nothing to look up (a job submitted without the plugin, e.g.
through slurmrestd, is still looked up). The flag is the submitter's word; a false one only
makes that user's steps stage their own image.

Values from SPANK_UCTR_* are the user's requests: the policy decides whether they are allowed.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import os
import re
from collections.abc import Callable, Mapping

from uctr_batch import log
from uctr_batch.errors import ConfigError
from uctr_batch.records import Frozen

_log = log.get("job")

_CONTAINER_RE = re.compile(r"(?:^|\s)Container=(\S*)")
_UNSET = ("", "(null)", "None")


class JobContext(Frozen):
    __slots__ = ("job_id", "uid", "gid", "user", "node", "partition", "image", "mode", "mpi",
                 "gpu")
    # image: --container-image, or Slurm's --container=IMAGE; mode: --container-mode, honoured
    # only if the policy allows it; user, partition, image, mode, mpi, gpu may be None

    @property
    def wants_container(self) -> bool:
        return bool(self.image)


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise ConfigError(f"{name} is not set: not running as a Slurm prolog/epilog",
                          "configure it with Prolog=/Epilog= and PrologFlags=Alloc in slurm.conf")
    return value


def _int(env: Mapping[str, str], name: str) -> int:
    value = _required(env, name)
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} is not a number: {value!r}",
                          f"set {name} to a number, or unset it")


def _gid(env: Mapping[str, str], uid: int) -> int:
    if env.get("SLURM_JOB_GID"):
        return _int(env, "SLURM_JOB_GID")
    import pwd  # older Slurm: the job's primary group is the user's

    return pwd.getpwuid(uid).pw_gid


def from_env(env: Mapping[str, str] | None = None,
             container_lookup: Callable[[str], str | None] | None = None) -> JobContext:
    """The job context of a Prolog/Epilog from its environment (and the job record when the
    image came from ``--container``)."""
    env = os.environ if env is None else env
    job_id = _required(env, "SLURM_JOB_ID")
    uid = _int(env, "SLURM_JOB_UID")
    image = env.get("SPANK_UCTR_IMAGE") or None
    if image is None and env.get("SPANK_UCTR_NO_IMAGE") != "1":
        image = (container_lookup or job_container)(job_id)
    return JobContext(
        job_id=job_id, uid=uid, gid=_gid(env, uid), user=env.get("SLURM_JOB_USER") or None,
        node=env.get("SLURMD_NODENAME") or os.uname().nodename.split(".")[0],
        partition=env.get("SLURM_JOB_PARTITION") or None, image=image,
        mode=env.get("SPANK_UCTR_MODE") or None, mpi=env.get("SPANK_UCTR_MPI") or None,
        gpu=env.get("SPANK_UCTR_GPU") or None,
    )


def job_container(job_id: str) -> str | None:
    """The job's ``--container`` value from the job record, or None."""
    try:
        return _normalise(container_via_pyslurm(job_id))
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001 - a pyslurm built for another Slurm: fall back
        _log.debug("pyslurm lookup of job %s failed (%s); using scontrol", job_id, e)
    return _normalise(container_via_scontrol(job_id))


def container_via_pyslurm(job_id: str) -> str | None:
    """pyslurm >= 23.2 has Job.load(); pyslurm 22.5 has job().find_id() returning dicts."""
    import pyslurm

    if hasattr(pyslurm, "Job"):
        return getattr(pyslurm.Job.load(int(job_id)), "container", None)
    records = pyslurm.job().find_id(str(job_id))
    return records[0].get("container") if records else None


def container_via_scontrol(job_id: str, scontrol: str = "scontrol") -> str | None:
    import subprocess  # not on the hooks' path when the plugin set SPANK_UCTR_IMAGE

    cp = subprocess.run([scontrol, "show", "job", "-o", str(job_id)], capture_output=True,
                        text=True, timeout=30)
    if cp.returncode != 0:
        raise ConfigError(f"cannot read job {job_id} from Slurm: {cp.stderr.strip()}",
                          "the prolog needs scontrol (or pyslurm) to find --container=IMAGE")
    return parse_container(cp.stdout)


def parse_container(show_job_line: str) -> str | None:
    """The Container= field of one ``scontrol show job -o`` line (None when unset)."""
    match = _CONTAINER_RE.search(show_job_line)
    return _normalise(match.group(1)) if match else None


def _normalise(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text in _UNSET else text
