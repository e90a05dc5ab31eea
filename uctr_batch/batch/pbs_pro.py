"""PBS Professional's container syntax, read by the OpenPBS hook beside uctr's own.

PBS Professional sites write:

    qsub -l select=2:ncpus=4:container_engine=singularity -l container_image=IMAGE \\
         -v "PBS_CONTAINER_ARGS=--bind=/scratch:/scratch;--env=OMP_NUM_THREADS=4" job.sh

- ``container_engine`` is a host-level resource requested in ``select``; the site policy's
  ``container_engines`` maps each engine name to a uctr mode (or ``auto``: the class's
  ladder). An explicit ``container_mode`` / ``UCTR_MODE`` wins over it.
- ``PBS_CONTAINER_ARGS`` is a ``;``-separated list of engine arguments. The ones that mean
  something to uctr become its UCTR_* launch settings (binds, environment, working
  directory, GPU, writable, home); any other is refused, naming the argument, because
  silently dropping it would run the job differently from what its owner asked for.

Standard library only: the hook's entry imports this module.
"""

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from uctr_batch import errors

ENGINE_RESOURCE = "container_engine"
ARGS_VARIABLE = "PBS_CONTAINER_ARGS"
MAX_ARGS_LENGTH = 8192  # a -v value; bounded before it is parsed
MAX_ARGS = 128

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENGINE_IN_CHUNK = re.compile(r"(?:^|:)container_engine=(\"[^\"]*\"|'[^']*'|[^:+]*)")

# argument -> what it sets; every spelling PBS Professional users bring from singularity/
# apptainer or docker/podman that has a uctr counterpart
BIND_ARGS = ("--bind", "-B", "--volume", "-v")
ENV_ARGS = ("--env", "-e")
WORKDIR_ARGS = ("--pwd", "-w")
FLAG_ARGS = {"--nv": ("UCTR_GPU", "nvidia"), "--rocm": ("UCTR_GPU", "amd"),
             "--writable": ("UCTR_WRITABLE", "1"), "--no-home": ("UCTR_MOUNT_HOME", "0")}
SUPPORTED = ("--bind/-B/--volume/-v SRC[:DST[:ro|rw]], --env/-e NAME[=VALUE], --pwd/-w DIR, "
             "--nv, --rocm, --writable, --no-home")
# refused with a reason of their own: the same word means something else in one engine
WHY_NOT = {
    "--workdir": "singularity's --workdir is a scratch directory, docker's the working "
                 "directory: use --pwd DIR for the working directory",
    "--fakeroot": "uctr runs the job as its owner; root in the container is not offered",
    "--net": "containers share the host network under uctr",
    "--network": "containers share the host network under uctr",
    "--no-https": "registries and their TLS settings belong to the site policy",
    "--contain": "uctr binds what the site policy says; use --no-home to leave out $HOME",
}


@dataclass
class ContainerArgs:
    """PBS_CONTAINER_ARGS, translated."""
    mounts: List[str] = field(default_factory=list)  # SRC:DST:ro|rw (UCTR_MOUNTS syntax)
    env: Dict[str, str] = field(default_factory=dict)  # NAME=VALUE set in the container
    env_names: List[str] = field(default_factory=list)  # NAMEs copied (UCTR_ENV_NAMES)
    settings: Dict[str, str] = field(default_factory=dict)  # UCTR_WORKDIR, UCTR_GPU, ...

    def environment(self, current: Dict[str, str]) -> Dict[str, str]:
        """The launch environment to add, given the job's CURRENT one: mounts and names
        join what the job set itself; a UCTR_* setting the job set itself wins."""
        out = {k: v for k, v in self.settings.items() if not current.get(k)}
        if self.mounts:
            out["UCTR_MOUNTS"] = ",".join(filter(None, [current.get("UCTR_MOUNTS")]
                                                 + self.mounts))
        names = self.env_names + [n for n in self.env if n not in self.env_names]
        if names:
            out["UCTR_ENV_NAMES"] = ",".join(filter(None, [current.get("UCTR_ENV_NAMES")]
                                                    + names))
        out.update(self.env)
        return out


def _refuse(arg: str, why: str) -> errors.UsageError:
    return errors.UsageError(f"{ARGS_VARIABLE}: {arg} {why}",
                             f"uctr understands {SUPPORTED}; separate arguments with ';'")


def parse_args(text: Optional[str]) -> ContainerArgs:
    """Translate PBS_CONTAINER_ARGS or raise UsageError naming the first bad argument."""
    out = ContainerArgs()
    if not text or not text.strip():
        return out
    if len(text) > MAX_ARGS_LENGTH:
        raise _refuse(f"({len(text)} characters)", f"is longer than {MAX_ARGS_LENGTH}")
    items = [item.strip() for item in text.split(";") if item.strip()]
    if len(items) > MAX_ARGS:
        raise _refuse(f"({len(items)} arguments)", f"has more than {MAX_ARGS}")
    for item in items:
        name, value = _split(item)
        _apply(out, name, value, item)
    return out


def _split(item: str) -> Tuple[str, Optional[str]]:
    """'--bind=/a:/b', '--bind /a:/b', '-B /a' -> (name, value); '--nv' -> ('--nv', None)."""
    if item.startswith("--") and "=" in item.split()[0]:
        name, _, value = item.partition("=")
        return name, value.strip()
    name, _, value = item.partition(" ")
    return name, (value.strip() or None)


def _apply(out: ContainerArgs, name: str, value: Optional[str], item: str) -> None:
    if name in FLAG_ARGS:
        if value is not None:
            raise _refuse(item, "takes no value")
        key, setting = FLAG_ARGS[name]
        out.settings[key] = setting
        return
    if name in WHY_NOT or not (name in BIND_ARGS or name in ENV_ARGS or name in WORKDIR_ARGS):
        raise _refuse(name, "is not supported by uctr" + (f" ({WHY_NOT[name]})"
                                                          if name in WHY_NOT else ""))
    if not value:
        raise _refuse(item, "needs a value")
    if name in BIND_ARGS:
        out.mounts += [_bind(name, spec) for spec in value.split(",") if spec.strip()]
    elif name in ENV_ARGS:
        _env(out, name, value)
    else:
        if not value.startswith("/") or "," in value:
            raise _refuse(f"{name} {value}", "needs an absolute directory inside the container")
        out.settings["UCTR_WORKDIR"] = value


def _bind(name: str, spec: str) -> str:
    parts = spec.strip().split(":")
    if len(parts) > 3 or not all(p.startswith("/") for p in parts[:2] if p) or not parts[0]:
        raise _refuse(f"{name} {spec}", "is not SRC[:DST[:ro|rw]] with absolute paths")
    flags = parts[2] if len(parts) == 3 else "rw"
    if flags not in ("ro", "rw"):
        raise _refuse(f"{name} {spec}", f"has the bind option {flags!r}; uctr takes ro or rw")
    dst = parts[1] if len(parts) > 1 and parts[1] else parts[0]
    return f"{parts[0]}:{dst}:{flags}"


def _env(out: ContainerArgs, name: str, value: str) -> None:
    key, sep, setting = value.partition("=")
    if not _NAME.match(key):
        raise _refuse(f"{name} {value}", "does not start with a variable name")
    if key.startswith("UCTR_"):
        raise _refuse(f"{name} {value}", "sets a uctr setting; give it with qsub -v instead")
    if sep:
        out.env[key] = setting
    elif key not in out.env_names:
        out.env_names.append(key)


# -- container_engine -----------------------------------------------------------------------
def select_engines(select: Optional[str]) -> Tuple[str, ...]:
    """The distinct container_engine values of a select statement's chunks."""
    found: List[str] = []
    for chunk in str(select or "").split("+"):
        for match in _ENGINE_IN_CHUNK.finditer(chunk):
            value = match.group(1).strip("\"'").strip()
            if value and value not in found:
                found.append(value)
    return tuple(found)


def engine_mode(engines: Tuple[str, ...], node_policy) -> Optional[str]:
    """The mode the site maps the job's engine to (None: the class's ladder)."""
    if not engines:
        return None
    known = dict(getattr(node_policy, "container_engines", None) or {})
    if len(engines) > 1:
        raise errors.UsageError(f"the select chunks ask for different container_engine "
                                f"values: {', '.join(engines)}",
                                "one job runs in one image: ask for one engine in every "
                                "chunk, or leave container_engine out")
    engine = engines[0]
    if engine not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise errors.UsageError(f"container_engine={engine} is not an engine this site "
                                f"offers (engines in the site policy: {listed})",
                                "leave container_engine out to get the site's default, or "
                                "ask for a mode with -l container_mode=MODE")
    mode = known[engine]
    return None if mode == "auto" else mode
