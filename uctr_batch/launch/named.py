"""Named containers (pyxis's --container-name) and the step's own rootfs (--container-save).

    image = named.prepare(local_dir, opts, ctx, stage_fn, say)

A named container is a private, writable copy of an image's rootfs on this node:

    <local dir>/containers/job-<JOB ID>/<NAME>/   scope "job" (default): removed by the
                                                  epilog at the end of the job
    <local dir>/containers/user/<NAME>/           scope "global" (plugstack.conf
                                                  container_scope=global): kept across jobs
        rootfs/        the container's files; every step that names it sees earlier changes
        meta.json      reference, manifest digest and runtime config of the image it came from
        active/<pid>   a live rank using it (pids of finished ranks are ignored)
        started/<n>    local rank n of the current step has begun (--container-save waits)
        running/<step> the N1 rendezvous (launch.sharedns) of a step whose ranks share a
                       namespace over it: what an `:exec` step joins

Flags, as pyxis takes them after NAME: (pyxis_slurmstepd.c)
    auto (default)  use the container if it exists, else create it from --container-image
    create          create it; an error if it already exists
    exec            join a step running in it: its namespaces (mode N1), so what that step
                    mounted is seen; an error if none runs, or if it runs in another mode
                    (only N1 shares a namespace) or N1 is not usable here
    no_create       use it only if it exists (never import)
    no_exec         as auto, never joining a running step
auto joins a step running in the container as exec does (pyxis attaches), and otherwise
starts the step in the container's files with namespaces of its own; so do create,
no_create and no_exec always. A joining step's mounts are the running step's (its own
--container-mounts are ignored, with a warning, as pyxis does).
When the container exists, --container-image is not staged again (as in pyxis: "the import is
skipped"); with verbosity the reuse is reported.

--container-save without a name gives the step a private copy the same way (named
".save-<step>"), removed once saved. Copies are made by `cp -a` as the user (the bundle's
files are the user's): the staged bundle itself is never written.

Imports stay light (os, fcntl, subprocess only on creation): this runs per rank.
"""

import fcntl
import json
import os
import re
import time

from uctr_batch.errors import UsageError

FLAGS = ("auto", "create", "exec", "no_create", "no_exec")
RUNNING = "running"
SCOPES = ("job", "global")
CONTAINERS = "containers"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_NAME_HINT = ("a container name is 1-64 letters, digits, '_', '.' or '-', optionally followed "
              "by :auto, :create, :exec, :no_create or :no_exec")


def parse_name(text: str):
    """'NAME[:FLAG]' -> (NAME, FLAG); raises UsageError naming the option."""
    name, _sep, flag = text.partition(":")
    flag = flag or "auto"
    if not _NAME.match(name):
        raise UsageError("--container-name=%s: invalid name" % text, _NAME_HINT)
    if flag not in FLAGS:
        raise UsageError("--container-name=%s: unknown flag %r" % (text, flag), _NAME_HINT)
    return name, flag


def join_request(text):
    """What --container-name=TEXT says about a step running in the container: "must" join
    it (:exec), "may" (auto: join one if it runs, as pyxis attaches), or None (never)."""
    flag = parse_name(text)[1] if text else None
    return {"exec": "must", "auto": "may"}.get(flag)


def scope_dir(local_dir: str, job_id: str, scope: str) -> str:
    if scope not in SCOPES:
        raise UsageError("unknown container scope %r" % scope,
                         "plugstack.conf container_scope= takes job or global")
    if scope == "job" and job_id:
        return os.path.join(local_dir, CONTAINERS, "job-%s" % job_id)
    return os.path.join(local_dir, CONTAINERS, "user")


def container_dirs(local_dir: str):
    """Every container directory on this node (all scopes, creations in progress too): what
    the node-local quota counts besides the bundles."""
    top = os.path.join(local_dir, CONTAINERS)
    found = []
    for scope in _listdir(top):
        base = os.path.join(top, scope)
        for name in _listdir(base):
            path = os.path.join(base, name)
            if os.path.isdir(path) and not os.path.islink(path):
                found.append(path)
    return found


def job_dir(local_dir: str, job_id: str) -> str:
    """What the epilog removes at the end of JOB_ID."""
    return os.path.join(local_dir, CONTAINERS, "job-%s" % job_id)


class Container:
    """A named container's directory on this node."""

    def __init__(self, path: str):
        self.path = path
        self.rootfs = os.path.join(path, "rootfs")

    def exists(self) -> bool:
        return os.path.isfile(os.path.join(self.path, "meta.json"))

    def meta(self) -> dict:
        with open(os.path.join(self.path, "meta.json")) as f:
            return json.load(f)

    def live_pids(self, ignore=()):
        active = os.path.join(self.path, "active")
        live = []
        for name in _listdir(active):
            if not name.isdigit() or int(name) in ignore:
                continue
            if os.path.exists("/proc/%s" % name):
                live.append(int(name))
            else:
                _unlink(os.path.join(active, name))
        return live

    def mark_active(self, pid: int) -> None:
        _touch(os.path.join(self.path, "active", str(pid)))

    def note_running(self, step_key: str, ns_key: str) -> None:
        """Record that the ranks of STEP_KEY share the N1 namespace NS_KEY (sharedns
        rendezvous) over this container, for the `:exec` steps that join it."""
        running = os.path.join(self.path, RUNNING)
        os.makedirs(running, 0o700, exist_ok=True)
        path = os.path.join(running, _file_name(step_key))
        tmp = "%s.tmp-%d" % (path, os.getpid())
        with open(tmp, "w") as f:
            json.dump({"step": step_key, "key": ns_key}, f)
        os.replace(tmp, path)

    def forget_running(self, step_key: str) -> None:
        _unlink(os.path.join(self.path, RUNNING, _file_name(step_key)))

    def running_steps(self, own_step: str):
        """(step key, namespace key) of the steps recorded as running here, newest first,
        other than OWN_STEP (whether they still run, the rendezvous tells)."""
        running = os.path.join(self.path, RUNNING)
        found = []
        for name in _listdir(running):
            path = os.path.join(running, name)
            try:
                with open(path) as f:
                    entry = json.load(f)
                found.append((os.stat(path).st_mtime, entry["step"], entry["key"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return [(step, key) for _t, step, key in sorted(found, reverse=True) if step != own_step]

    def mark_started(self, step_key: str, local_rank: int) -> None:
        started = os.path.join(self.path, "started")
        os.makedirs(started, 0o700, exist_ok=True)
        stale = [n for n in _listdir(started) if not n.startswith(step_key + ".")]
        for n in stale:
            _unlink(os.path.join(started, n))
        _touch(os.path.join(started, "%s.%d" % (step_key, local_rank)))

    def started_count(self, step_key: str) -> int:
        return sum(1 for n in _listdir(os.path.join(self.path, "started"))
                   if n.startswith(step_key + "."))


def prepare(local_dir: str, opts, ctx, stage_fn, say, quota=None):
    """(Staged image whose rootfs is the named (or step's) container, its Container),
    created from stage_fn() (the staged --container-image) when it must be. QUOTA: the
    policy's storage.local_quota in bytes, which the new copy must fit in (else an error)."""
    from uctr_batch.launch.staged import Staged

    if opts.name:
        name, flag = parse_name(opts.name)
    else:  # --container-save alone: the step's own copy
        name, flag = ".save-%s" % _file_name(ctx.step_key), "auto"
    base = scope_dir(local_dir, ctx.job_id, opts.name_scope if opts.name else "job")
    os.makedirs(base, 0o700, exist_ok=True)
    box = Container(os.path.join(base, name))
    with _locked(os.path.join(base, ".%s.lock" % name)):
        exists = box.exists()
        _check_flag(opts.name or name, flag, exists, box)
        if exists:
            if opts.image:
                say("--container-name=%s: the container exists; %s is not staged again"
                    % (name, opts.image), 1)
        else:
            if not opts.image:
                raise UsageError("--container-name=%s: no such container on this node" % name,
                                 "give --container-image too, to create it")
            image = stage_fn()
            if quota:
                _make_room(local_dir, quota, image, opts.name or "--container-save")
            _create(box, image, say)
        os.makedirs(os.path.join(box.path, "active"), 0o700, exist_ok=True)
        box.mark_active(os.getpid())
        box.mark_started(ctx.step_key, ctx.local_rank)
    meta = box.meta()
    return Staged(opts.image or meta["reference"], meta["reference"], meta["manifest_digest"],
                  box.path, box.rootfs, meta["config"], "named"), box


def _check_flag(text: str, flag: str, exists: bool, box: Container) -> None:
    option = "--container-name=%s" % text
    if flag == "create" and exists:
        raise UsageError("%s: the container already exists on this node" % option,
                         "drop ':create' to reuse it, or choose another name")
    if flag in ("exec", "no_create") and not exists:
        raise UsageError("%s: no such container on this node" % option,
                         "create it first (without ':%s')" % flag)
    if flag == "exec" and not box.live_pids(ignore=(os.getpid(),)):
        raise UsageError("%s: the container is not running (no step uses it now)" % option,
                         "drop ':exec' to start a step in it")


def _make_room(local_dir: str, quota: int, image, what: str) -> None:
    """Evict unused bundles (least recently used first) so that a copy of IMAGE's rootfs
    fits under QUOTA beside the bundles and containers already there; StorageError if even
    then it does not."""
    from pathlib import Path

    from uctr_batch import fsutil
    from uctr_batch.batch import stage
    from uctr_batch.errors import StorageError

    need = fsutil.disk_usage(image.rootfs)
    keep = (image.manifest_digest,) if image.manifest_digest else ()
    stage.enforce_quota(Path(local_dir), quota, keep=keep, need=need)
    used = stage.local_usage(Path(local_dir))
    if used + need > quota:
        raise StorageError(
            "cannot create the container %s: its copy of %s needs %s, and this node's quota "
            "of %s for node-local root filesystems has %s left (bundles in use and named "
            "containers take %s)" % (what, image.reference, stage.human(need),
                                     stage.human(quota), stage.human(max(quota - used, 0)),
                                     stage.human(used)),
            "remove named containers you no longer need (kept ones are under %s), or ask "
            "the site to raise storage.local_quota" % os.path.join(local_dir, CONTAINERS))


def _create(box: Container, image, say) -> None:
    import subprocess

    tmp = box.path + ".tmp-%d" % os.getpid()
    if os.path.isdir(box.path):  # left by a creation that died: never half-made
        _remove(box.path)
    os.makedirs(tmp, 0o700)
    say("creating container %s from %s" % (os.path.basename(box.path), image.reference), 1)
    done = subprocess.run(["cp", "-a", "--reflink=auto", image.rootfs,
                           os.path.join(tmp, "rootfs")], capture_output=True,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        _remove(tmp)
        raise UsageError("cannot create the container %s: %s"
                         % (os.path.basename(box.path),
                            done.stderr.decode(errors="replace").strip()[-300:]),
                         "check the free space of the node-local directory")
    meta = {"reference": image.reference, "manifest_digest": image.manifest_digest,
            "config": image.config, "created": time.time()}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
    os.rename(tmp, box.path)


def wait_for_step(box: Container, ctx, child_pid: int, timeout: float) -> bool:
    """After local rank 0's payload: wait until every local rank of the step has started
    and ended. False if TIMEOUT passed first."""
    deadline = time.monotonic() + timeout
    want = ctx.local_size or 1
    while time.monotonic() < deadline:
        if box.started_count(ctx.step_key) >= want and \
                not box.live_pids(ignore=(os.getpid(), child_pid)):
            return True
        time.sleep(0.1)
    return False


def save_after_payload(box: Container, target: str, ctx, timeout: float, keep: bool,
                       diag) -> None:
    """Fork: the child returns (and goes on to exec the payload); this process waits for the
    step's ranks on this node, saves BOX as a squashfs image at TARGET, removes BOX unless
    KEEP (a named container), and exits with the payload's status. Signals are passed on."""
    import signal

    pid = os.fork()
    if pid == 0:
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGCONT):
        signal.signal(sig, lambda signum, _frame: os.kill(pid, signum))
    status = _wait_child(pid)
    from uctr_batch.errors import UctrError
    from uctr_batch.image import squashfs

    if not wait_for_step(box, ctx, pid, timeout):
        diag.warn("--container-save: other ranks still run after %ds; saving now" % timeout)
    try:
        squashfs.save(box.rootfs, target)
        diag.say("saved the container as %s" % target, 1)
    except UctrError as e:
        diag.error(e)
        status = status or e.exit_code
    finally:
        if not keep:
            _remove(box.path)
    os._exit(status)


def _wait_child(pid: int) -> int:
    """The exit status of child PID as a shell reports it (128+N for signal N)."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            from uctr_batch.errors import EXIT_INTERNAL

            return EXIT_INTERNAL
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)


def remove(path: str) -> None:
    _remove(path)


def _remove(path: str) -> None:
    from uctr_batch import fsutil

    if os.path.lexists(path):
        fsutil.remove_tree(path)


class _locked:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _file_name(step_key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", step_key)[:120]


def _listdir(path: str):
    try:
        return os.listdir(path)
    except OSError:
        return []


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
