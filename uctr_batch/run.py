"""`uctr run`: image or rootfs + command line + site policy -> RunSpec -> the mode ladder.

    uctr run [--mode M] [-v SRC:DST[:ro]]... [-e K=V]... [-w DIR] [--root] [--read-only]
             IMAGE|BUNDLE|ROOTFS [--] CMD...

build_spec() is the one place the semantics shared by every mode are decided (the per-rank
launcher calls it too):
  argv     docker rules: Entrypoint + (CMD given ? CMD : image Cmd); --entrypoint replaces it
  env      envspec.build_env: image Env < policy set/prepend/append/unset < host passthrough
           (SLURM_* PMI_* ...) < -e
  cwd      -w, else the caller's cwd if a bind brings it in, else the image WorkingDir, else /
  binds    policy binds, then -v (a -v onto the same destination replaces the policy's)
  identity the caller's uid/gid (0/0 with --root), synthetic /etc/passwd and /etc/group
  devices  the policy's device list (standard /dev nodes are always there)
  readonly --read-only or the policy's readonly_rootfs
exec_ladder() tries the policy's modes in order; the first whose probe passes replaces this
process. `--mode M` must be one the policy lets users choose, and must work here (exit 3).
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import os
import sys
from collections.abc import Mapping, Sequence

from uctr_batch import envspec, identity
from uctr_batch.errors import ModeError, UctrError, UsageError
from uctr_batch.modes.base import ModeUnavailable, check_command, get_mode
from uctr_batch.modes.spec import RunSpec


def _log():
    """uctr_batch.log, imported only when something is logged: uctr-exec's creator builds its
    container with build_spec on the first step of each job, almost never logs there (it
    reports through launch.main.Diag), and logging with threading and traceback is ~4 ms."""
    from uctr_batch import log

    return log


Bind = tuple[str, str, bool]
RESERVED_DESTINATIONS = ("/", "/dev", "/proc", "/sys")  # mounted by the modes themselves
ROOTFS, IMAGE_JSON = "rootfs", "image.json"  # a bundle's layout (uctr_batch.image.rootfs)


# --- the site policy --------------------------------------------------------------------

def node_policy():
    """This node's resolved policy (built-in defaults without a file), through the per-node
    cache uctr-exec keeps: resolving YAML against the schema costs tens of ms per start."""
    from uctr_batch.launch import policy_cache
    from uctr_batch.policy.model import NodePolicy

    return NodePolicy.from_dict(policy_cache.load())


# --- what to run ------------------------------------------------------------------------

class Target:
    """A root filesystem and the image runtime config that goes with it (may be empty).
    sif: ROOTFS is an Apptainer image file, run as it is in mode S1 (image/sif.py)."""

    def __init__(self, rootfs: str, config: Mapping | None = None, reference: str = "",
                 sif: bool = False):
        self.rootfs = rootfs
        self.config = dict(config or {})
        self.reference = reference
        self.sif = sif


def sif_target(image: str) -> Target | None:
    """The Target of IMAGE when it names an Apptainer image file (SIF), else None."""
    from uctr_batch.image import sif

    path = sif.sif_path(image)
    if path is None:
        return None
    return Target(sif.checked(path), sif.config(), image, sif=True)


def looks_like_path(text: str) -> bool:
    """A rootfs or bundle directory; a path to a file is an image file (squashfs, as in
    pyxis), a missing path is reported by target_from_path."""
    if os.path.isfile(text):
        return False
    return text.startswith(("/", "./", "../")) or text in (".", "..") or os.path.isdir(text)


def target_from_path(text: str) -> Target:
    """A bundle dir (rootfs/ + image.json), a bundle's rootfs/, or any rootfs directory."""

    path = os.path.abspath(text)
    if not os.path.isdir(path):
        raise UsageError(f"no such rootfs or bundle directory: {text}",
                         "give an image reference, a bundle from `uctr create`, or a rootfs directory")
    parent = os.path.dirname(path)
    if os.path.isdir(os.path.join(path, ROOTFS)) and os.path.isfile(os.path.join(path, IMAGE_JSON)):
        bundle, rootfs = path, os.path.join(path, ROOTFS)
    elif os.path.basename(path) == ROOTFS and os.path.isfile(os.path.join(parent, IMAGE_JSON)):
        bundle, rootfs = parent, path
    else:
        return Target(path)
    import json  # not image.rootfs.read_image_json: that module costs ~9 ms of imports here

    try:
        with open(os.path.join(bundle, IMAGE_JSON), encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):  # a bundle dir anyone made: no traceback for `[1]`
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError) as e:
        raise UctrError(f"cannot read the image config of bundle {bundle}: {e}",
                        f"recreate it: uctr rm {bundle} && uctr create IMAGE") from e
    from uctr_batch.modes.spec import check_config

    return Target(rootfs, check_config(meta.get("config"), bundle), meta.get("reference") or "")


def target_from_image(args) -> Target:
    """Pull (unless cached) and unpack (unless unpacked) an image; its bundle's Target.
    Cache, registry rules and bundles exactly as `uctr pull` / `uctr create` use them."""
    from uctr_batch.image import pull, rootfs as bundles

    store, config = pull.command_context(args)
    record = pull.ensure_image(args.image, config, store, getattr(args, "platform", None),
                               pull=not getattr(args, "no_pull", False))
    return target_from_path(str(bundles.create(record, store)))


# --- building the RunSpec ---------------------------------------------------------------

def compose_argv(config: Mapping, command: Sequence[str],
                 entrypoint: str | None = None) -> list[str]:
    if entrypoint is not None:  # docker: --entrypoint also drops the image's Cmd
        argv = ([entrypoint] if entrypoint else []) + list(command)
    else:
        argv = list(config.get("Entrypoint") or []) + list(command or config.get("Cmd") or [])
    if not argv:
        raise UsageError("no command to run: none given and the image has no Entrypoint or Cmd",
                         "add the command after the image: uctr run IMAGE -- CMD ARGS")
    return argv


def parse_volume(text: str, cwd: str) -> Bind:
    """-v SRC[:DST[:ro|rw]] -> (absolute src, dst, read_only)."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise UsageError(f"bad -v argument: {text}", "use -v SRC[:DST[:ro|rw]]")
    src = os.path.normpath(os.path.join(cwd, parts[0]))
    dst = parts[1] if len(parts) > 1 and parts[1] else src
    option = parts[2] if len(parts) > 2 else "rw"
    if option not in ("ro", "rw"):
        raise UsageError(f"bad -v option {option!r} in {text}", "the option is ro or rw")
    if not dst.startswith("/"):
        raise UsageError(f"bind destination must be absolute: {text}", "use -v SRC:/path/in/container")
    if not os.path.exists(src):
        raise UsageError(f"bind source does not exist: {src}", "create it first, or fix the path")
    dst = os.path.normpath(dst).replace("//", "/")
    if dst in RESERVED_DESTINATIONS:  # crun then fails opening /dev/null, with no hint
        raise UsageError(f"cannot bind onto {dst}: the container's /, /dev, /proc and /sys "
                         "are set up by uctr",
                         "bind onto a path below it (e.g. -v SRC:/dev/shm) or another path")
    return src, dst, option == "ro"


def policy_binds(policy, env: Mapping[str, str] | None = None) -> list[Bind]:
    """The policy's binds with ${...} expanded; a missing optional source is skipped."""
    from uctr_batch.errors import ConfigError
    from uctr_batch.policy.model import expand, path_variables

    binds, variables = [], None
    for b in policy.binds:
        if "${" in b.src + b.dst:
            variables = variables or path_variables(env=env)
        src = expand(b.src, variables) if "${" in b.src else b.src
        dst = expand(b.dst, variables) if "${" in b.dst else b.dst
        if not os.path.exists(src):
            if b.optional:
                _log().get("run").debug("policy bind %s skipped: source missing", src)
                continue
            raise ConfigError(f"site policy binds {src}, which does not exist on this node",
                              "ask the site to fix the policy or mark the bind optional")
        binds.append((src, dst, b.mode == "ro"))
    return binds


def merge_binds(policy_side: Sequence[Bind], user_side: Sequence[Bind]) -> list[Bind]:
    """Policy binds, then the user's; a user bind replaces a policy bind of the same dst.
    Sorted (stably) by destination depth so a bind inside another bind lands on top of it."""
    user_dsts = {dst for _src, dst, _ro in user_side}
    merged = [b for b in policy_side if b[1] not in user_dsts] + list(user_side)
    return sorted(merged, key=lambda b: b[1].rstrip("/").count("/"))


def choose_cwd(workdir: str | None, host_cwd: str | None, binds: Sequence[Bind],
               image_workdir: str | None) -> str:
    """-w > the caller's cwd when a bind brings it in (mapped through the bind) > image > /.
    One implementation, kept import-light in procspec for the ranks that join a namespace."""
    from uctr_batch.launch.procspec import choose_cwd as choose

    return choose(workdir, host_cwd, binds, image_workdir)


def state_dir() -> str:
    """Per-user node-local scratch (synthetic passwd files, OCI runtime state)."""
    from uctr_batch import fsutil, settings

    base = settings.default_local_dir()
    fsutil.ensure_private_dir(base, "the node-local directory")
    path = base / "run"
    fsutil.make_private_subdir(path)
    return str(path)


def build_spec(target: Target, policy, *, command: Sequence[str] = (),
               entrypoint: str | None = None, volumes: Sequence[str] = (),
               user_env: Sequence[str] = (), workdir: str | None = None, root: bool = False,
               read_only: bool = False, devices: Sequence[str] = (),
               extra_binds: Sequence[Bind] = (), host_env: Mapping[str, str] | None = None,
               host_cwd: str | None = None, scratch: str | None = None) -> RunSpec:
    """The RunSpec for target under policy (see the module docstring for the rules)."""
    host_env = os.environ if host_env is None else host_env
    if host_cwd is None:
        try:
            host_cwd = os.getcwd()
        except OSError:
            host_cwd = None
    config = target.config
    argv = compose_argv(config, command, entrypoint)
    user_binds = [parse_volume(v, host_cwd or "/") for v in volumes] + list(extra_binds)
    binds = merge_binds(policy_binds(policy, host_env), user_binds)
    env = envspec.build_env(config.get("Env") or [], policy.env, host_env, user_env)
    cwd = choose_cwd(workdir, host_cwd, binds, config.get("WorkingDir"))
    scratch = scratch or state_dir()
    ident = identity.caller(root, env.get("HOME"), host_env)
    if target.sif:  # apptainer writes the SIF's passwd entry and makes the workdir itself
        passwd = group = None
    else:
        passwd, group = identity.identity_files(target.rootfs, ident,
                                                os.path.join(scratch, "identity"))
        ensure_workdir(target.rootfs, cwd, binds)
    if config.get("User") and not root:
        _log().verbose("image user %r ignored: the payload runs as you (%s)", config["User"],
                       ident.user)
    return RunSpec(
        rootfs=target.rootfs, argv=argv, env=env, cwd=cwd, binds=binds,
        devices=list(policy.devices) + list(devices), uid=ident.uid, gid=ident.gid,
        readonly=read_only or policy.readonly_rootfs, passwd=passwd, group=group,
        state_dir=scratch,
    )


def ensure_workdir(rootfs: str, cwd: str, binds: Sequence[Bind]) -> None:
    """Create a missing working directory in the rootfs (docker does the same for WorkingDir
    and -w), unless a bind provides it."""
    from uctr_batch.modes import inroot

    if any(cwd == dst or cwd.startswith(dst.rstrip("/") + "/") for _s, dst, _ro in binds):
        return
    try:  # resolved inside the rootfs: the image's links never lead it out
        inroot.ensure_mountpoint(rootfs, cwd, True)
    except UctrError as e:
        raise UctrError(f"working directory {cwd}: {e.message}",
                        "choose an existing directory of the image with -w") from e


# --- choosing and running a mode ----------------------------------------------------------

def choose_mode(ladder: Sequence[str], spec: RunSpec, explicit: bool):
    """The first mode of ladder whose probe passes for spec, and the (name, reason) skipped."""
    skipped = []
    for name in ladder:
        mode = get_mode(name)
        result = mode.probe(spec)
        if result.ok:
            return mode, result, skipped
        if explicit:
            raise ModeError(f"mode {name} is not usable here: {result.reason}", mode.unusable_hint())
        _log().verbose("mode %s skipped: %s", name, result.reason)
        skipped.append((name, result.reason))
    return None, None, skipped


def exec_ladder(ladder: Sequence[str], spec: RunSpec, explicit: bool = False) -> None:
    """Exec the first working mode; raises ModeError (exit 3) when none works."""
    check_command(spec)
    remaining = list(ladder)
    skipped: list[tuple[str, str]] = []
    while remaining:
        mode, result, passed = choose_mode(remaining, spec, explicit)
        skipped += passed
        if mode is None:
            break
        _log().verbose("mode %s: %s", mode.name, result.reason)
        try:
            mode.exec(spec)  # replaces this process on success
        except ModeUnavailable as e:
            if explicit:
                raise
            _log().verbose("mode %s failed before starting: %s", mode.name, e.message)
            skipped.append((mode.name, e.message))
        remaining = remaining[remaining.index(mode.name) + 1:]
    why = "; ".join(f"{n}: {r}" for n, r in skipped) or "the ladder is empty"
    raise ModeError(f"no execution mode works on this node ({why})",
                    "run `uctr doctor` to see what this node supports; the site policy sets the ladder")


# --- the command ------------------------------------------------------------------------

def cmd_run(args) -> int:
    policy = node_policy()
    ladder = policy.mode_ladder(args.mode)
    box = None
    target = sif_target(args.image)
    if target is not None:  # an Apptainer image: read-only, as `apptainer exec` runs it
        from uctr_batch.image import sif

        sif.refuse_options(args.image, (("--name", getattr(args, "name", None)),
                                        ("--save", getattr(args, "save", None))))
        ladder = sif.s1_ladder(args.image, ladder, explicit=args.mode is not None)
        args.read_only = True
    elif getattr(args, "name", None) or getattr(args, "save", None):
        target, box = named_target(args)
    elif looks_like_path(args.image):
        target = target_from_path(args.image)
    else:
        target = target_from_image(args)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    spec = build_spec(target, policy, command=command, entrypoint=args.entrypoint,
                      volumes=args.volume, user_env=args.env, workdir=args.workdir,
                      root=args.root, read_only=args.read_only)
    if args.dry_run:
        return print_plan(ladder, spec, explicit=args.mode is not None)
    if box is not None and args.save:
        from uctr_batch.launch import named

        named.save_after_payload(box, args.save, _RunCtx(), policy.storage.stage_timeout,
                                 keep=bool(args.name), diag=_RunDiag())
    exec_ladder(ladder, spec, explicit=args.mode is not None)
    return 0  # not reached: exec_ladder execs or raises


class _RunCtx:
    """What named containers need of a rank, for `uctr run` (one process, maybe in a job)."""

    def __init__(self):
        self.job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID") or ""
        self.step_key = "run-%d" % os.getpid()
        self.local_rank, self.local_size, self.node_id = 0, 1, None


class _RunDiag:
    def say(self, text: str, level: int = 1) -> None:
        _log().verbose("%s", text)

    def warn(self, text: str) -> None:
        _log().get("run").warning("%s", text)

    def error(self, e) -> None:
        sys.stderr.write(f"error: {e.message}\n" + (f"hint: {e.hint}\n" if e.hint else ""))


def named_target(args):
    """`uctr run --name NAME[:FLAG] IMAGE` / `--save PATH`: the Target of the named (or this
    run's own) writable container, as uctr-exec makes them (launch/named.py). IMAGE creates
    the container; an existing one is used as it is."""
    from types import SimpleNamespace

    from uctr_batch import settings
    from uctr_batch.launch import named, staged

    def stage():
        if looks_like_path(args.image):
            target = target_from_path(args.image)
        else:
            target = target_from_image(args)
        return SimpleNamespace(rootfs=target.rootfs, reference=target.reference or args.image,
                               manifest_digest="", config=target.config)

    opts = SimpleNamespace(name=args.name, image=args.image,
                           name_scope=os.environ.get("UCTR_NAME_SCOPE") or "job")
    policy = node_policy()
    local_dir = staged.usable_local_dir(str(settings.local_dir(policy)))
    image, box = named.prepare(local_dir, opts, _RunCtx(), stage, _RunDiag().say,
                               policy.storage.local_quota_bytes)
    return Target(image.rootfs, image.config, image.reference), box


def print_plan(ladder: Sequence[str], spec: RunSpec, explicit: bool) -> int:
    import json

    mode, _result, skipped = choose_mode(ladder, spec, explicit)
    plan = {"mode": mode.name if mode else None, "ladder": list(ladder),
            "skipped": [{"mode": n, "reason": r} for n, r in skipped], "spec": spec.to_dict()}
    json.dump(plan, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if mode else 3


def add_arguments(p) -> None:
    """`uctr run` options (called from cli.py). -v means --volume here, as in docker run;
    verbosity stays available as --verbose and UCTR_VERBOSE."""
    # "resolve" takes -v away from the common -v/--verbose for --volume.
    g = p.add_argument_group("run options", conflict_handler="resolve")
    g.add_argument("--mode", metavar="M", help="execution mode (N1 R1 P1 P2 F1 S1); default: the "
                   "site ladder")
    g.add_argument("-v", "--volume", action="append", default=[], metavar="SRC[:DST[:ro]]",
                   help="bind-mount a host path (repeatable)")
    g.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                   help="set a variable; -e K copies it from the host (repeatable)")
    g.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside")
    g.add_argument("--root", action="store_true", help="run as uid 0 inside (mapped to you)")
    g.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    g.add_argument("--entrypoint", metavar="CMD",
                   help="replace the image's Entrypoint ('' clears it)")
    g.add_argument("--no-pull", action="store_true", help="fail instead of pulling a missing image")
    g.add_argument("--name", metavar="NAME[:FLAG]",
                   help="run in the named writable container NAME, created from IMAGE if "
                        "missing and kept for later runs (pyxis --container-name)")
    g.add_argument("--save", metavar="PATH",
                   help="when the command ends, save the container as a squashfs image")
    g.add_argument("--dry-run", action="store_true",
                   help="print the chosen mode and the run spec as JSON instead of running")
    g.add_argument("image", metavar="IMAGE|ROOTFS",
                   help="image reference, bundle directory or root filesystem directory")
    g.add_argument("command", nargs="...", metavar="CMD", help="command and arguments")
