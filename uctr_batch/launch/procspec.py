"""What differs between the ranks of one container: the command and the environment.

The rank that sets up a step's namespace builds the whole RunSpec with run.build_spec (the
semantics `uctr run` has). A rank that joins it only needs its own argv and environment;
it computes them here with the same rules and without run.py's imports (typing, logging):

  argv  image Entrypoint + (the command given, else the image Cmd)   (run.compose_argv)
  cwd   -w > the caller's cwd through a bind > image WorkingDir > /   (choose_cwd, also run's)
  env   envspec.build_env: image Env < policy rules < host passthrough < -e; then the step's
        injection (PMI/MPI: the creator's plan, recorded as `ops`; GPU: this rank's own
        visibility variables), then -e again, so the user's -e always has the last word.

tests/unit/test_launch_procspec.py checks both against run.build_spec and
InjectionPlan.apply_env.
"""

from uctr_batch import envspec
from uctr_batch.errors import UsageError

# The InjectionPlan fields apply_env() reads, in its order (see apply_env_ops).
OPS_FIELDS = ("env_unset", "env_defaults", "env", "env_prepend", "env_append",
              "ld_library_path", "path_prefix")


class Rules:
    """The policy's env section (a dict) with the attributes envspec expects of EnvRules."""

    __slots__ = ("set", "prepend", "append", "unset", "passthrough")

    def __init__(self, section):
        section = section or {}
        self.set = dict(section.get("set") or {})
        self.prepend = dict(section.get("prepend") or {})
        self.append = dict(section.get("append") or {})
        self.unset = tuple(section.get("unset") or ())
        self.passthrough = tuple(section.get("passthrough") or ())


def compose_argv(config, command):
    argv = list(config.get("Entrypoint") or []) + list(command or config.get("Cmd") or [])
    if not argv:
        raise UsageError("no command to run: none given and the image has no Entrypoint or Cmd",
                         "add the command after the image: uctr-exec IMAGE -- CMD ARGS")
    return argv


def base_env(config, policy, host_env, user_env):
    """envspec.build_env with the policy's rules taken from the plain policy dict."""
    return envspec.build_env(config.get("Env") or [], Rules(policy.get("env")), host_env, user_env)


def finish_env(env, host_env, extras, gpu_env, user_env):
    """Add the step's injection to a base environment (see the module docstring)."""
    prefixes = tuple(extras.get("passthrough_prefixes") or ())
    names = set(extras.get("passthrough_names") or ())
    for key, value in host_env.items():
        if key in names or (prefixes and key.startswith(prefixes)):
            env[key] = value
    env = apply_env_ops(extras.get("ops") or {}, env)
    env.update(gpu_env or {})
    for key, value in envspec.parse_user_env(user_env, host_env):
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def choose_cwd(workdir, host_cwd, binds, image_workdir):
    """The working directory (also run.choose_cwd's): -w > the caller's cwd when a bind brings it
    in (mapped through the bind) > the image's WorkingDir > /."""
    if workdir:
        if not workdir.startswith("/"):
            raise UsageError("working directory must be absolute: %s" % workdir,
                             "give a path inside the container that starts with /, e.g. -w /work")
        return _normpath(workdir)
    if host_cwd:
        best = None
        for src, dst, _ro in binds:
            if host_cwd == src or host_cwd.startswith(src.rstrip("/") + "/"):
                if best is None or len(src) > len(best[0]):
                    best = (src, dst)
        if best:
            rest = host_cwd[len(best[0]):].lstrip("/")
            return best[1].rstrip("/") + "/" + rest if rest else best[1]
    return _normpath(image_workdir) if image_workdir else "/"


def _normpath(path):
    import posixpath

    return posixpath.normpath(path)


def ops_of(plan) -> dict:
    """The environment part of an InjectionPlan as plain data (for the step record)."""
    return {name: _plain(getattr(plan, name)) for name in OPS_FIELDS}


def _plain(value):
    return dict(value) if isinstance(value, dict) else list(value)


def apply_env_ops(ops, base):
    """InjectionPlan.apply_env(base) on the plain data of ops_of(plan)."""
    out = dict(base)
    for key in ops.get("env_unset") or ():
        out.pop(key, None)
    for key, value in (ops.get("env_defaults") or {}).items():
        out.setdefault(key, value)
    out.update(ops.get("env") or {})
    for key, value in (ops.get("env_prepend") or {}).items():
        out[key] = _join_path([value], out.get(key))
    for key, value in (ops.get("env_append") or {}).items():
        out[key] = value if not out.get(key) else out[key] + ":" + value
    if ops.get("ld_library_path"):
        out["LD_LIBRARY_PATH"] = _join_path(ops["ld_library_path"], out.get("LD_LIBRARY_PATH"))
    if ops.get("path_prefix"):
        out["PATH"] = _join_path(ops["path_prefix"], out.get("PATH"))
    return out


def _join_path(prefix, rest):
    parts = list(prefix)
    if rest:
        parts.extend(p for p in rest.split(":") if p and p not in parts)
    return ":".join(parts)
