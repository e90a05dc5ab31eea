"""This node's resolved site policy, cached per user in the node-local directory.

Resolving the policy means YAML, a JSON schema check and maybe `scontrol` for node
features: tens of milliseconds, too much for every rank of every step. The first rank on a
node resolves it and writes the result twice, beside each other:

    <local base>/policy/<node>[@<partition>].json     for people and tools (NodePolicy.to_dict)
    <local base>/policy/<node>[@<partition>].marshal  what the ranks read (no json import)

<local base> is UCTR_LOCAL_DIR, else /tmp/uctr-$UID: the policy cannot say where its own
cache lives. A cached entry is used while the policy file, its conf.d directory and every
drop-in keep the (mtime, ctime, size, inode) they had before the resolution; this is
exactly what uctr_batch.policy.paths fingerprints, re-read here with plain os.stat calls
(that module imports hashlib, json and pathlib). Node name, partition, policy path and the
Python version (marshal's format) must match too.

The hot path (load() with a valid entry) imports nothing beyond the interpreter's start-up
set; yaml and jsonschema are loaded only by resolve_and_store().
"""

import marshal
import os
import sys

from uctr_batch.errors import ConfigError, StorageError

FORMAT = 1
MAX_CACHE_BYTES = 4 << 20  # a cached NodePolicy is a few KiB; anything bigger is not ours
DEFAULT_POLICY = "/etc/uctr/policy.yaml"  # as uctr_batch.policy.paths.DEFAULT_POLICY
DROPIN_DIR = "conf.d"
# ${NAME}s storage paths may use (uctr_batch.policy.model.PATH_VARIABLES)
PATH_VARIABLES = ("UID", "GID", "USER", "HOME", "HOSTNAME", "JOB_ID", "SLURM_JOB_ID", "PBS_JOBID")


# -- where ------------------------------------------------------------------------------

def local_base(env=None) -> str:
    """UCTR_LOCAL_DIR, else /tmp/uctr-$UID (settings.default_local_dir, without its imports)."""
    env = os.environ if env is None else env
    return _env_dir(env, "UCTR_LOCAL_DIR") or "/tmp/uctr-%d" % os.getuid()


def _env_dir(env, name: str):
    """env[name] when set; it must be absolute (settings.env_dir, without its imports)."""
    value = env.get(name)
    if value and not value.startswith("/"):
        raise ConfigError("%s must be an absolute path: %r" % (name, value[:80]),
                          "e.g. %s=/scratch/$USER/uctr, or unset %s for the default" % (name, name))
    return value


def default_cache_dir(env=None) -> str:
    """UCTR_CACHE, else $XDG_CACHE_HOME/uctr, else ~/.cache/uctr (settings.default_cache_dir)."""
    env = os.environ if env is None else env
    if env.get("UCTR_CACHE"):
        return _env_dir(env, "UCTR_CACHE")
    xdg = env.get("XDG_CACHE_HOME")
    return os.path.join(xdg if xdg else os.path.join(os.path.expanduser("~"), ".cache"), "uctr")


def policy_path(env) -> str:
    return env.get("UCTR_POLICY") or DEFAULT_POLICY


def current_node(env) -> str:
    """Slurm's name for this node, else the short host name (policy.resolver.current_node)."""
    return (env.get("SLURMD_NODENAME") or os.uname().nodename).split(".")[0]


def current_partition(env):
    return env.get("SLURM_JOB_PARTITION") or env.get("PBS_QUEUE") or None


def cache_base(env) -> str:
    """local_base(), or the fallback root prepared for this user on this node when another
    user owns it or can write to it (batch.location; only then is it imported)."""
    base = local_base(env)
    try:
        st = os.lstat(base)
    except OSError:
        return base  # not there yet: store() creates it, or refuses a planted parent
    if (st.st_mode & 0o170000) == 0o040000 and st.st_uid == os.geteuid() \
            and not st.st_mode & 0o022:
        return base
    from uctr_batch.batch.location import fallback_for

    return fallback_for(base, env) or base


def cache_stem(env) -> str:
    node, partition = current_node(env), current_partition(env)
    name = node + ("@" + partition if partition else "")
    return os.path.join(cache_base(env), "policy", name.replace("/", "_"))


# -- validity ---------------------------------------------------------------------------

def watched_paths(path: str):
    """The policy file, its drop-in directory and each drop-in (policy.paths.watched_paths)."""
    dropins = os.path.join(os.path.dirname(path), DROPIN_DIR)
    try:
        names = sorted(n for n in os.listdir(dropins)
                       if n.endswith(".yaml") and not n.startswith("."))
    except OSError:
        names = []
    return [path, dropins] + [os.path.join(dropins, n) for n in names]


def stat_rows(paths):
    """(path, mtime, ctime, size, inode) per path, (path,) for a missing one."""
    rows = []
    for p in paths:
        try:
            st = os.stat(p)
            rows.append((p, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
        except OSError:
            rows.append((p,))
    return tuple(rows)


def _identity(env):
    return {"format": FORMAT, "python": tuple(sys.version_info[:2]), "node": current_node(env),
            "partition": current_partition(env), "policy_path": policy_path(env)}


# -- the entry points --------------------------------------------------------------------

def load(env=None) -> dict:
    """The node policy as a plain dict (NodePolicy.to_dict()), from the cache when current."""
    env = os.environ if env is None else env
    cached = read_cached(env)
    if cached is not None:
        return cached
    return resolve_and_store(env)


def read_cached(env):
    """The cached policy dict if it is still current, else None."""
    fd = _open_cached(cache_stem(env) + ".marshal")
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        # our own regular file of sane size only: a FIFO, device or huge file is not a cache;
        # nor a second name of a file of ours that was linked in (protected_hardlinks off)
        if st.st_uid != os.geteuid() or (st.st_mode & 0o170000) != 0o100000 \
                or st.st_nlink != 1:
            return None
        if st.st_size > MAX_CACHE_BYTES:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            entry = marshal.loads(f.read(MAX_CACHE_BYTES))
    except (OSError, EOFError, ValueError, TypeError):
        return None
    finally:
        os.close(fd)
    if not isinstance(entry, dict) or entry.get("key") != _identity(env):
        return None
    if entry.get("watch") != stat_rows(watched_paths(policy_path(env))):
        return None
    return entry.get("policy")


def _open_cached(path: str):
    """A descriptor of PATH (BASE/policy/NAME) opened through BASE and policy/, each a
    directory of ours that nobody else can write (no symlinks followed): in a directory
    another user controls, they choose what the cache says. None when that does not hold."""
    policy_dir, name = os.path.split(path)
    base, sub = os.path.split(policy_dir)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fds = []
    try:
        for where in (base, sub):
            fds.append(os.open(where, flags | os.O_DIRECTORY, dir_fd=fds[-1] if fds else None))
            st = os.fstat(fds[-1])
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return None
        return os.open(name, flags | os.O_NONBLOCK, dir_fd=fds[-1])
    except OSError:
        return None
    finally:
        for fd in fds:
            os.close(fd)


def full_python() -> None:
    """Make site-packages importable when the launcher shim started Python with -S.

    launchers/uctr-exec runs a checkout with `python3 -S`: skipping site's .pth processing
    saves ~2 ms on every rank, and the hot path needs nothing outside the standard library.
    The cold paths (policy resolution: yaml, jsonschema, hostlist; staging: requests,
    zstandard) call this first."""
    if sys.flags.no_site and "site" not in sys.modules:
        import site

        site.main()


def resolve_and_store(env) -> dict:
    """Resolve the site policy for this node (yaml, schema) and cache the result."""
    full_python()
    from uctr_batch.policy import current_node_policy

    rows = stat_rows(watched_paths(policy_path(env)))  # before reading: a change shows later
    node_policy = current_node_policy(env=env)
    import json

    data = json.loads(json.dumps(node_policy.to_dict()))  # lists, as a cached copy has them
    try:
        store(env, data, rows)
    except (OSError, StorageError) as e:  # a cache we cannot write (planted dir) only costs time
        from uctr_batch import log

        log.get("launch").debug("cannot cache the node policy: %s", e)
    return data


def store(env, data: dict, rows) -> None:
    import json

    from uctr_batch import fsutil

    stem = cache_stem(env)
    base = os.path.dirname(os.path.dirname(stem))  # cache_base(): the fallback if planted
    fsutil.ensure_private_dir(base, "the node-local directory")
    fsutil.make_private_subdir(os.path.dirname(stem))
    entry = {"key": _identity(env), "watch": rows, "policy": data}
    fsutil.write_atomic(stem + ".json", json.dumps(data, indent=1, sort_keys=True).encode() + b"\n")
    fsutil.write_atomic(stem + ".marshal", marshal.dumps(entry))


# -- reading the plain dict ---------------------------------------------------------------

def section(policy: dict, name: str) -> dict:
    return policy.get(name) or {}


def stage_timeout(policy: dict, env=None) -> float:
    """UCTR_STAGE_TIMEOUT, else the policy's storage.stage_timeout (600 s built in)."""
    env = os.environ if env is None else env
    from uctr_batch.envnum import number  # errors only: fine on the per-rank path

    value = number("UCTR_STAGE_TIMEOUT", env, None)
    if value is not None:
        return value
    return float(section(policy, "storage").get("stage_timeout") or 600.0)


def storage_dirs(policy: dict, env=None):
    """(shared cache dir, node-local dir) for this user, as batch.stage.storage_dirs decides
    them: UCTR_CACHE / UCTR_LOCAL_DIR, else the policy's templates with ${...} expanded,
    else the defaults."""
    env = os.environ if env is None else env
    storage = section(policy, "storage")
    variables = None
    dirs = []
    for override, template, default in (
            ("UCTR_CACHE", storage.get("cache_dir"), default_cache_dir),
            ("UCTR_LOCAL_DIR", storage.get("local_dir"), local_base)):
        if template and not env.get(override):
            variables = variables or path_variables(env)
            dirs.append(expand(template, variables))
        else:
            dirs.append(default(env))
    return dirs[0], dirs[1]


def path_variables(env) -> dict:
    """Values of ${UID} ${GID} ${USER} ${HOME} ${HOSTNAME} ${JOB_ID}... for the caller
    (policy.model.path_variables)."""
    import pwd

    uid = os.getuid()
    user, home, gid = str(uid), "/", os.getgid()
    try:
        pw = pwd.getpwuid(uid)
        user, home, gid = pw.pw_name, pw.pw_dir, pw.pw_gid
    except KeyError:
        pass
    values = {"UID": str(uid), "GID": str(gid), "USER": user, "HOME": home,
              "HOSTNAME": os.uname().nodename.split(".")[0],
              "JOB_ID": env.get("SLURM_JOB_ID") or env.get("PBS_JOBID") or "nojob"}
    for name in ("SLURM_JOB_ID", "PBS_JOBID"):
        if env.get(name):
            values[name] = env[name]
    return values


def expand(template: str, variables: dict) -> str:
    """Replace ${NAME} (policy.model.expand; the policy check already rejected unknown names)."""
    out, rest = [], template
    while "${" in rest:
        head, _, tail = rest.partition("${")
        name, closed, rest = tail.partition("}")
        if not closed or name not in variables:
            raise ConfigError("policy path %r uses ${%s}, which is not set here" % (template, name),
                              "use ${JOB_ID}, which is 'nojob' outside a batch job")
        out += [head, variables[name]]
    out.append(rest)
    return "".join(out)


def mode_ladder(policy: dict, requested=None):
    """The modes to try (NodePolicy.mode_ladder on the plain dict)."""
    if requested is None:
        return tuple(policy.get("modes") or ())
    if requested in (policy.get("user_modes") or ()):
        return (requested,)
    from uctr_batch.policy.model import NodePolicy  # raises the ModeError that explains why

    return NodePolicy.from_dict(policy).mode_ladder(requested)
