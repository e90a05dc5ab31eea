"""The payload's environment, built the same way for every mode.

Precedence, lowest first (issue 3, "Same semantics in every mode"):
  1. the image's Env (PATH defaults to DEFAULT_PATH when the image sets none);
  2. the site policy's rules, in this order: set, prepend, append, unset;
  3. host variables matching a passthrough pattern (SLURM_*, PMI_*, PMIX_*, OMPI_*, PALS_*,
     PBS_*, CUDA_VISIBLE_DEVICES, TERM, HOME, USER and the policy's own): they override the
     image, because launchers and schedulers wire ranks through them;
  4. the user's -e K=V, last. `-e K` copies K from the host, or removes K if the host has none.
Every other host variable is dropped.

Pure functions on dicts, no imports beyond the interpreter's start-up set: the per-rank
launcher calls build_env() on its hot path. `rules` is the policy's EnvRules
(uctr_batch.policy.model): attributes set, prepend, append, unset, passthrough.
"""

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def parse_image_env(lines) -> dict:
    """Image config Env (["K=V", ...]) -> dict; a line without '=' sets an empty value."""
    env = {}
    for line in lines or ():
        key, _, value = line.partition("=")
        if key:
            env[key] = value
    return env


def apply_rules(env: dict, rules) -> dict:
    """Policy set, prepend (VALUE:old), append (old:VALUE), unset; returns a new dict."""
    env = dict(env)
    env.update(rules.set)
    for key, value in rules.prepend.items():
        env[key] = value + ":" + env[key] if env.get(key) else value
    for key, value in rules.append.items():
        env[key] = env[key] + ":" + value if env.get(key) else value
    for key in rules.unset:
        env.pop(key, None)
    return env


def matches(name: str, patterns) -> bool:
    """fnmatch-style test; the common 'PREFIX_*' and exact names avoid importing re."""
    for pattern in patterns:
        if pattern == name:
            return True
        star = pattern.find("*")
        if star == len(pattern) - 1 and "?" not in pattern and "[" not in pattern:
            if name.startswith(pattern[:-1]):
                return True
        elif star >= 0 or "?" in pattern or "[" in pattern:
            import fnmatch

            if fnmatch.fnmatchcase(name, pattern):
                return True
    return False


def passthrough(host_env, patterns) -> dict:
    return {k: v for k, v in host_env.items() if matches(k, patterns)}


def parse_user_env(items, host_env):
    """-e arguments -> [(key, value or None)]; None means 'remove' (host has no such var)."""
    out = []
    for item in items or ():
        key, sep, value = item.partition("=")
        if not key:
            from uctr_batch.errors import UsageError

            raise UsageError("bad -e argument: %r" % item, "use -e NAME=VALUE or -e NAME")
        out.append((key, value if sep else host_env.get(key)))
    return out


def build_env(image_env, rules, host_env, user_env=()) -> dict:
    """The final environment; image_env is the image's Env list or a dict."""
    env = dict(image_env) if isinstance(image_env, dict) else parse_image_env(image_env)
    env.setdefault("PATH", DEFAULT_PATH)
    env = apply_rules(env, rules)
    env.update(passthrough(host_env, rules.passthrough))
    for key, value in parse_user_env(user_env, host_env):
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env
