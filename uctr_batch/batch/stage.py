"""Node-local staging, shared by the Slurm prolog, the PBS hooks and uctr-exec.

    stage(image) -> StageResult(rootfs, bundle, manifest_digest, reference)

pulls the image into the shared cache (each blob has one downloader across all nodes: the
store's locks), unpacks it into the node-local bundle for its manifest digest (one unpack per
node: rootfs.create's lock) and keeps the node-local directory under the policy's quota by
evicting the least recently used bundles nobody uses.

"In use" = a reference file ``<local dir>/inuse/<digest hex>/<key>``. Keys:
  job-<job id>            added when staging for a job; removed by the epilog
  pid-<pid>[-<anything>]  added by a running process (uctr-exec); dead once the pid is gone
A bundle with at least one live reference is never evicted. Its last use (for LRU) is the
later of its inuse directory's mtime and rootfs' completion marker's (touched on every reuse).
A process should add its reference before it starts using a bundle.

Run as the user whose cache and local dir these are: the prolog calls it in a child that
dropped to the job user (privdrop.run_as); uctr-exec already is that user.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from uctr_batch import errors, fsutil, log, settings
from uctr_batch.records import Frozen

_log = log.get("stage")

INUSE_DIR = "inuse"
JOB_REF_MAX_AGE = 30 * 86400.0  # an epilog-less job reference older than this is stale

# What the user can fix (recorded for the job, node stays up) vs what the node must fix.
USER, NODE = "user", "node"


class StageResult(Frozen):
    __slots__ = ("rootfs", "bundle", "manifest_digest", "reference", "unpacked")
    # unpacked: this call created the rootfs (False: it was already there)
    _DEFAULTS = {"unpacked": False}

    def to_dict(self) -> dict:
        return {"status": "ok", "rootfs": str(self.rootfs), "bundle": str(self.bundle),
                "manifest_digest": self.manifest_digest, "reference": self.reference,
                "unpacked": self.unpacked}


# -- where --------------------------------------------------------------------------------
def storage_dirs(node_policy) -> tuple[Path, Path]:
    """(shared cache dir, node-local dir) of the calling user under NODE_POLICY, by the rule
    every command uses: UCTR_CACHE / UCTR_LOCAL_DIR > the policy's templates > defaults;
    a node-local dir that cannot be trusted is replaced by the fallback root prepared for
    this user on this node, if any (location.py)."""
    from uctr_batch.batch import location

    local = settings.local_dir(node_policy)
    return settings.cache_dir(node_policy), Path(location.usable_local_dir(local))


def job_environment(job_id: str, env: Mapping[str, str]) -> dict[str, str]:
    """What a staging child needs from a hook's environment: ${JOB_ID} in policy paths,
    the run dir, verbosity."""
    out = {"SLURM_JOB_ID": str(job_id)}
    for name in ("UCTR_RUN_DIR", "UCTR_VERBOSE", "SLURMD_NODENAME"):
        if env.get(name):
            out[name] = env[name]
    return out


# -- staging ------------------------------------------------------------------------------
def stage(image_text: str, *, job_id: str | None = None, node_policy=None,
          timeout: float | None = None, platform: str | None = None) -> StageResult:
    """Pull IMAGE_TEXT, create its node-local rootfs (once per node), keep the quota, and
    mark it in use by JOB_ID when given. Raises UctrError subclasses.

    TIMEOUT (seconds) bounds the whole call, waiting for other processes' downloads and
    unpack included (main thread only; default: the policy's storage.stage_timeout)."""
    from uctr_batch.policy import current_node_policy

    node_policy = node_policy or current_node_policy()
    if timeout is None:
        timeout = node_policy.storage.stage_timeout
    with _deadline(timeout, image_text):
        return _stage(image_text, job_id, node_policy, platform)


def _stage(image_text: str, job_id: str | None, node_policy,
           platform: str | None) -> StageResult:
    from uctr_batch.image import pull, rootfs, store
    from uctr_batch.policy import registry_settings

    cache_dir, local_dir = storage_dirs(node_policy)
    _point_defaults_at(cache_dir, local_dir)
    registry_config = settings.registry_config(base=registry_settings(node_policy))
    cache = store.Store(cache_dir)
    record = pull.ensure_image(image_text, registry_config, cache, platform=platform, pull=True)
    quota = node_policy.storage.local_quota_bytes
    if quota:
        enforce_quota(local_dir, quota, keep=(record.manifest_digest,),
                      need=sum(layer.size for layer in record.layers))
    # one unpack per node (its lock); the quota stops an unpack before it fills the disk;
    # concurrent stagers (array tasks) all find no bundle, one unpacks: ask create who did
    done: dict = {}
    rootfs_path = Path(rootfs.create(record, cache, limit=quota or None, report=done))
    bundle = rootfs_path.parent
    touch_use(local_dir, record.manifest_digest)
    if job_id is not None:
        add_reference(local_dir, record.manifest_digest, f"job-{job_id}", job=str(job_id))
    if quota:
        _check_fits(local_dir, record.manifest_digest, bundle, quota, image_text)
        enforce_quota(local_dir, quota, keep=(record.manifest_digest,))
    return StageResult(rootfs_path, bundle, record.manifest_digest, record.reference,
                       unpacked=bool(done.get("unpacked")))


@contextlib.contextmanager
def _deadline(seconds: float | None, image_text: str):
    """Raise UctrError in the main thread after SECONDS (SIGALRM); no-op elsewhere."""
    usable = seconds and seconds > 0 and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expired(signum, frame):
        raise errors.UctrError(
            f"staging {image_text} did not finish within {seconds:.0f} s",
            "the registry may be slow, the image large or another process stuck unpacking it; "
            "the site can raise storage.stage_timeout in the policy")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _point_defaults_at(cache_dir: Path, local_dir: Path) -> None:
    """The image pipeline finds its dirs through settings: make them the policy's."""
    os.environ["UCTR_CACHE"] = str(cache_dir)
    os.environ["UCTR_LOCAL_DIR"] = str(local_dir)


def _check_fits(local_dir: Path, digest: str, bundle: Path, quota: int, image_text: str) -> None:
    size = bundle_size(bundle)
    if size > quota:
        remove_references(local_dir, digest, lambda key: True)
        _remove_bundle(local_dir, bundle)
        raise errors.StorageError(
            f"image {image_text} needs {human(size)} unpacked, more than this node's quota "
            f"of {human(quota)} for node-local root filesystems",
            "use a smaller image or ask the site to raise storage.local_quota")


# -- outcome for hooks (never raises) -----------------------------------------------------
def stage_outcome(image_text: str, *, job_id: str | None = None, node_policy=None,
                  timeout: float | None = None) -> dict:
    """stage() as a JSON-able dict: {"status": "ok", ...} or {"status": "error", "fault":
    "user"|"node", "message", "hint"}. Runs in the prolog's unprivileged child."""
    try:
        refused = _local_dir_outcome(node_policy)
        if refused is not None:
            return refused
        from uctr_batch.image import sif

        sif_file = sif.sif_path(image_text)
        if sif_file is not None:  # nothing to stage: the steps run the file in mode S1
            from uctr_batch.policy import current_node_policy

            return sif.stage_outcome(image_text, sif_file,
                                     (node_policy or current_node_policy()).modes)
        return stage(image_text, job_id=job_id, node_policy=node_policy, timeout=timeout).to_dict()
    except Exception as e:  # noqa: BLE001 - classified, reported, and the hook decides
        local_dir = None
        try:
            local_dir = storage_dirs(node_policy)[1]
        except Exception:  # noqa: BLE001
            pass
        fault = classify(e, local_dir)
        if fault == NODE:
            _log.debug("staging failed", exc_info=True)
        return error_outcome(e, fault)


def error_outcome(exc: BaseException, fault: str) -> dict:
    if isinstance(exc, errors.UctrError):
        message, hint = exc.message, exc.hint
    else:
        message, hint = f"internal error while staging: {type(exc).__name__}: {exc}", \
            "this is a bug in uctr-batch; the node's prolog log has details"
    return {"status": "error", "fault": fault, "message": message, "hint": hint}


def _local_dir_outcome(node_policy) -> dict | None:
    """The error outcome for a node-local directory this user cannot trust and has no
    fallback for, else None. A USER one names the trusted base ("relocate") where root can
    prepare a fallback (common.stage_as_user does, then stages again)."""
    from uctr_batch.batch import location
    from uctr_batch.policy import current_node_policy

    local_dir = storage_dirs(node_policy or current_node_policy())[1]
    problem = location.check(local_dir)
    if problem is None:
        return None
    fault, why = problem
    if fault == NODE:
        hint = "the node-local file system or a root-owned directory above it needs an admin"
    else:
        hint = ("if it is yours, remove it (or chmod 700 it); if not, tell the site admin "
                "who created it: uctr could not set up a private directory for you instead")
    outcome = error_outcome(errors.StorageError(
        f"refusing to use the node-local directory {local_dir}: {why}", hint), fault)
    if fault == USER:
        outcome["relocate"] = location.trusted_base(local_dir)
    return outcome


def classify(exc: BaseException, local_dir: Path | None) -> str:
    """USER unless the node-local directory's root-owned part is broken (NODE).

    Staging runs as the job's user on the user's input (image, cache, local dir), so what
    goes wrong there is the job's, even a bug or a child killed: a full /tmp (another user
    may have filled it, or the image is too big), a planted or broken directory, an I/O
    error from a file system the user mounted. Only what no user can cause and an admin
    must fix is the node's: a read-only node-local file system, a root-owned parent where
    the user cannot create the directory (location.check's NODE)."""
    from uctr_batch.batch import location

    if local_dir is None:
        return USER
    try:
        problem = location.check(local_dir)
    except Exception:  # noqa: BLE001 - in doubt: the job fails, the node stays
        return USER
    return NODE if problem is not None and problem[0] == NODE else USER


# -- in-use references --------------------------------------------------------------------
def _inuse(local_dir: Path, digest: str | None = None) -> Path:
    base = Path(local_dir) / INUSE_DIR
    if digest is None:
        return base
    from uctr_batch.image.store import split_digest

    algo, hexpart = split_digest(digest)
    return base / (hexpart if algo == "sha256" else f"{algo}-{hexpart}")


def add_reference(local_dir: Path, digest: str, key: str, *, pid: int | None = None,
                  job: str | None = None) -> Path:
    """Mark DIGEST's bundle in use under KEY (a file name: job-J, pid-P...)."""
    if "/" in key or key.startswith("."):
        raise errors.InternalError(f"bad reference key {key!r}")
    directory = _inuse(local_dir, digest)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / key
    info = {"pid": pid, "job": job, "host": os.uname().nodename, "created": time.time()}
    fsutil.write_atomic(path, json.dumps(info).encode())
    return path


def touch_use(local_dir: Path, digest: str) -> None:
    """Record a use of DIGEST's bundle now (the LRU clock)."""
    directory = _inuse(local_dir, digest)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.utime(directory)


def remove_references(local_dir: Path, digest: str | None, match) -> int:
    """Remove references whose key satisfies MATCH (of DIGEST, or of every bundle)."""
    removed = 0
    dirs = [_inuse(local_dir, digest)] if digest else _iterdir(_inuse(local_dir))
    for directory in dirs:
        for ref in _iterdir(directory):
            if not ref.name.startswith(".") and match(ref.name):
                try:
                    ref.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
        if removed:
            _touch(directory)
    return removed


def live_references(local_dir: Path, digest: str) -> list[str]:
    return [ref.name for ref in _iterdir(_inuse(local_dir, digest)) if _is_live(ref)]


def _is_live(ref: Path) -> bool:
    name = ref.name
    if name.startswith("."):
        return False
    if name.startswith("pid-"):
        pid = name[4:].split("-")[0]
        return pid.isdigit() and os.path.exists(f"/proc/{pid}")
    try:
        age = time.time() - ref.stat().st_mtime
    except OSError:
        return False
    return age < JOB_REF_MAX_AGE


def release_job(job_id: str, *, node_policy=None) -> dict:
    """Epilog side, as the job user: drop JOB_ID's references, then enforce the quota."""
    _, local_dir = storage_dirs(node_policy)
    key = f"job-{job_id}"
    removed = remove_references(local_dir, None, lambda name: name == key) \
        if _inuse(local_dir).is_dir() else 0
    containers = remove_job_containers(local_dir, job_id)
    evicted: list[str] = []
    quota = getattr(getattr(node_policy, "storage", None), "local_quota_bytes", None)
    if quota and Path(local_dir).is_dir():
        evicted = enforce_quota(local_dir, quota)
    return {"references": removed, "evicted": evicted, "containers": containers}


def remove_job_containers(local_dir, job_id: str) -> int:
    """The named containers of JOB_ID (pyxis --container-name, scope "job") and the copies
    of --container-save steps; those of scope "global" stay. Returns how many went."""
    from uctr_batch.launch import named

    path = Path(named.job_dir(str(local_dir), str(job_id)))
    if not path.is_dir():
        return 0
    count = sum(1 for n in os.listdir(path) if not n.endswith(".lock"))
    fsutil.remove_tree(path)
    return count


# -- quota --------------------------------------------------------------------------------
def _bundles(local_dir: Path) -> dict[str, list[Path]]:
    """manifest digest -> complete bundles in the node-local dir (rootfs owns the layout)."""
    from uctr_batch.image import rootfs

    found: dict[str, list[Path]] = {}
    for bundle in rootfs.BundleStore(local_dir).complete_bundles():
        digest = rootfs.bundle_info(bundle)["manifest_digest"]
        if digest:
            found.setdefault(digest, []).append(bundle)
    return found


def bundle_size(bundle: Path) -> int:
    """Unpacked bytes of a bundle, as recorded at unpack time (else counted once)."""
    from uctr_batch.image import rootfs

    size = rootfs.bundle_info(bundle).get("size")
    return int(size) if isinstance(size, int) else fsutil.disk_usage(bundle)


def _last_use(local_dir: Path, digest: str, bundle: Path) -> float:
    """Latest of: a reference added/removed, a create() reusing it (rootfs' marker mtime)."""
    from uctr_batch.image import rootfs

    times = []
    for p in (_inuse(local_dir, digest), bundle / rootfs.MARKER):
        try:
            times.append(os.stat(p).st_mtime)
        except OSError:
            pass
    return max(times) if times else 0.0


def named_containers_size(local_dir: Path) -> int:
    """Bytes taken by the named containers (and --container-save copies) in the node-local
    dir: they count against the quota like bundles, but are never evicted (they hold the
    user's changes; the epilog removes a job's, the user a kept one)."""
    from uctr_batch.launch import named

    return sum(fsutil.disk_usage(path) for path in named.container_dirs(str(local_dir)))


def local_usage(local_dir: Path) -> int:
    """Bytes under the quota: complete bundles plus named containers."""
    return sum(bundle_size(b) for bundles in _bundles(local_dir).values() for b in bundles) \
        + named_containers_size(local_dir)


def enforce_quota(local_dir: Path, quota: int, keep: Iterable[str] = (), need: int = 0) -> list[str]:
    """Evict least recently used bundles without live references until bundles and named
    containers use at most QUOTA - NEED bytes. Returns the evicted digests. Bundles in KEEP
    stay."""
    keep = set(keep)
    entries = []
    for digest, bundles in _bundles(local_dir).items():
        for bundle in bundles:
            entries.append((_last_use(local_dir, digest, bundle), digest, bundle,
                            bundle_size(bundle)))
    used = sum(e[3] for e in entries) + named_containers_size(local_dir)
    evicted = []
    for _, digest, bundle, size in sorted(entries, key=lambda e: e[0]):
        if used + need <= quota:
            break
        if digest in keep or live_references(local_dir, digest):
            continue
        if _remove_bundle(local_dir, bundle):
            used -= size
            evicted.append(digest)
            import shutil  # here only: a warm prolog evicts nothing

            shutil.rmtree(_inuse(local_dir, digest), ignore_errors=True)
            log.verbose("evicted %s (%s) from %s", digest, human(size), local_dir)
    return evicted


def _remove_bundle(local_dir: Path, bundle: Path) -> bool:
    from uctr_batch.image import rootfs

    try:
        rootfs.remove(bundle, rootfs.BundleStore(local_dir))
        return True
    except errors.UctrError as e:
        _log.warning("cannot evict %s: %s", bundle, e.message)
        return False


def _iterdir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
