"""Which root filesystem does this rank run? The image staged on this node, or stage it once.

Hot path (stdlib only, no json): a node-local index entry written when the image was staged

    <local dir>/launch/img-<key>.idx     marshal: image text -> bundle, rootfs, runtime config

is used while its bundle is complete (the marker holds the same manifest digest) and, for a
tag, while the shared cache's reference file is unchanged (a `uctr pull` moved the tag).

Otherwise one rank per node does the work under a node-local lock keyed by the image
(img-<key>.lock, flock: a killed rank releases it), and the others wait for it, at most
UCTR_STAGE_TIMEOUT / the policy's storage.stage_timeout seconds:
  1. the readiness record of the job's prolog (it staged this image for this job), else
  2. batch.stage.stage(): pull into the shared cache (one downloader per blob across all
     nodes) and unpack (one unpack per node and manifest digest: image.rootfs's lock).
Either way it writes the index entry, so the waiting ranks find it when they get the lock.
If staging fails, the failure is recorded (img-<key>.failed): the ranks that were waiting
report it instead of each trying again.

Every rank marks the bundle in use by its pid (batch.stage's ``inuse/<hex>/pid-<pid>``), so
quota eviction never removes a root filesystem that a running rank uses.
"""

import os
import sys
import time
import zlib

from uctr_batch.errors import StorageError, UctrError
from uctr_batch.launch.nodelock import (LockTimeout, NodeLock, open_private_dir, read_marshal,
                                        write_marshal)

INDEX_FORMAT = 1
MARKER = ".uctr-complete"  # image.rootfs.MARKER: the digest of a complete bundle
INUSE_DIR = "inuse"  # batch.stage.INUSE_DIR
LAUNCH_DIR = "launch"


class Staged:
    """A staged image: where its rootfs is and its runtime config (Env, Cmd, WorkingDir...)."""

    __slots__ = ("image", "reference", "manifest_digest", "bundle", "rootfs", "config", "source")

    def __init__(self, image, reference, manifest_digest, bundle, rootfs, config, source):
        self.image, self.reference, self.manifest_digest = image, reference, manifest_digest
        self.bundle, self.rootfs, self.config, self.source = bundle, rootfs, config, source

    def entry(self, ref_stat) -> dict:
        return {"format": INDEX_FORMAT, "python": tuple(sys.version_info[:2]), "image": self.image,
                "reference": self.reference, "manifest_digest": self.manifest_digest,
                "bundle": self.bundle, "rootfs": self.rootfs, "config": self.config,
                "ref": ref_stat}


def image_key(image: str) -> str:
    data = image.encode()
    return "%08x%08x" % (zlib.crc32(data), zlib.adler32(data))


def usable_local_dir(local_dir: str, env=None) -> str:
    """LOCAL_DIR, or the fallback root prepared for this user on this node when another
    user (or our own chmod) made LOCAL_DIR untrustworthy: batch.location decides, for the
    prolog, the epilog and every rank alike. StorageError when neither can be used: a rank
    must not create its launch/ directory in, nor run an indexed root filesystem from, a
    directory where someone else can rename what the index points at."""
    from uctr_batch.batch import location

    problem = location.check(local_dir)
    if problem is None:
        return local_dir
    fallback = location.fallback_for(local_dir, env)
    if fallback:
        return fallback
    raise StorageError("refusing to use the node-local directory %s: %s" % (local_dir, problem[1]),
                       "if it is yours, remove it or chmod 700 it; if not, set UCTR_LOCAL_DIR "
                       "to a directory of your own (or run the job with --container-image / "
                       "-l container_image: the node then prepares a private one)")


def launch_dir(local_dir: str) -> str:
    return os.path.join(local_dir, LAUNCH_DIR)


# -- the entry point ------------------------------------------------------------------------

def ensure(image: str, local_dir: str, *, policy: dict, timeout: float, job_id: str = "",
           env=None, verbosity: int = 0, say=None) -> Staged:
    """The staged image IMAGE on this node, staging it first if no rank has."""
    env = os.environ if env is None else env
    key = image_key(image)
    for _attempt in range(3):
        dir_fd = open_private_dir(launch_dir(local_dir))
        try:
            staged = lookup(dir_fd, key, image)
            if staged is None:
                staged = _stage_once(dir_fd, key, image, local_dir, policy, timeout, job_id, env,
                                     verbosity, say)
        finally:
            os.close(dir_fd)
        # In use first, then check: quota eviction between the two shows up here.
        mark_in_use(local_dir, staged.manifest_digest)
        if marker_digest(staged.bundle) == staged.manifest_digest:
            return staged
    raise StorageError("the root filesystem of %s keeps disappearing from %s" % (image, local_dir),
                       "another job of yours evicts it (storage.local_quota too small?); "
                       "see `uctr ps`")


def lookup(dir_fd: int, key: str, image: str):
    """The index entry of IMAGE if it still describes a complete bundle, else None."""
    entry = read_marshal(dir_fd, "img-%s.idx" % key)
    if not isinstance(entry, dict) or entry.get("format") != INDEX_FORMAT \
            or entry.get("image") != image or entry.get("python") != tuple(sys.version_info[:2]):
        return None
    if marker_digest(entry["bundle"]) != entry["manifest_digest"]:
        return None
    ref = entry.get("ref")
    if ref and _stat_key(ref[0]) != tuple(ref[1:]):
        return None
    return Staged(image, entry["reference"], entry["manifest_digest"], entry["bundle"],
                  entry["rootfs"], entry["config"], "index")


def marker_digest(bundle: str):
    try:
        fd = os.open(os.path.join(bundle, MARKER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 256).decode(errors="replace").strip() or None
    finally:
        os.close(fd)


def _stat_key(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


# -- the cold path ------------------------------------------------------------------------

def _stage_once(dir_fd, key, image, local_dir, policy, timeout, job_id, env, verbosity, say):
    lock = NodeLock(dir_fd, "img-%s.lock" % key)
    waiting_since = time.time()
    if not lock.try_acquire():
        if say:
            say("waiting for another rank to stage %s on this node" % image)
        try:
            lock.acquire(timeout)
        except LockTimeout as e:
            holder = " (pid %d is still at it)" % e.holder if e.holder else ""
            raise StorageError(
                "timed out after %.0f s waiting for %s to be staged on this node%s"
                % (timeout, image, holder),
                "one rank per node pulls and unpacks the image while the others wait; raise "
                "UCTR_STAGE_TIMEOUT or the policy's storage.stage_timeout, or stage it before "
                "the job: uctr create %s" % image) from None
    try:
        staged = lookup(dir_fd, key, image)
        if staged is not None:
            return staged
        _raise_recorded_failure(dir_fd, key, waiting_since)
        try:
            staged, ref_stat = _from_readiness(image, job_id, env)
            if staged is None:
                staged, ref_stat = _stage_now(image, local_dir, policy, timeout, env, verbosity)
        except UctrError as e:
            _record_failure(dir_fd, key, e)
            raise
        write_marshal(dir_fd, "img-%s.idx" % key, staged.entry(ref_stat))
        _clear_failure(dir_fd, key)
        return staged
    finally:
        lock.release()


def _from_readiness(image, job_id, env):
    """What the job's prolog staged, if it staged IMAGE; its recorded error if that failed."""
    if not job_id:
        return None, None
    from uctr_batch.batch.readiness import STATUS_OK, read_readiness

    record = read_readiness(job_id, os.getuid(), env)
    if not record or record.get("image") != image:
        return None, None
    if record.get("status") != STATUS_OK:
        raise UctrError(record.get("message") or "the prolog could not stage %s" % image,
                        record.get("hint") or None)
    bundle = record.get("bundle", "")
    if marker_digest(bundle) != record.get("manifest_digest"):
        return None, None  # removed since the prolog ran: stage it again
    return _staged_from_bundle(image, bundle, record["rootfs"], "readiness"), None


def _stage_now(image, local_dir, policy, timeout, env, verbosity):
    from uctr_batch.launch.policy_cache import full_python

    full_python()
    from uctr_batch import log
    from uctr_batch.batch import stage as staging
    from uctr_batch.policy.model import NodePolicy

    log.setup(verbosity)
    started = time.monotonic()
    result = staging.stage(image, node_policy=NodePolicy.from_dict(policy), timeout=timeout)
    log.verbose("staged %s (%s) in %.2f s%s", image, result.manifest_digest,
                time.monotonic() - started, "" if result.unpacked else ", already unpacked")
    staged = _staged_from_bundle(image, str(result.bundle), str(result.rootfs), "staged")
    return staged, _ref_stat(image, staged, policy, env)


def _staged_from_bundle(image, bundle, rootfs, source) -> Staged:
    from uctr_batch.image.rootfs import read_image_json

    try:
        meta = read_image_json(bundle)
    except (OSError, ValueError) as e:
        raise StorageError("cannot read the image config of %s: %s" % (bundle, e),
                           "remove the bundle (uctr rm %s) and run again" % bundle) from e
    from uctr_batch.modes.spec import check_config

    return Staged(image, meta.get("reference") or image, meta["manifest_digest"], bundle, rootfs,
                  check_config(meta.get("config"), bundle), source)


def _ref_stat(image, staged, policy, env):
    """(path, mtime, size, inode) of the shared cache's reference file that names the
    staged manifest; None for digest references (immutable) or when there is none."""
    if "@sha256:" in image:
        return None
    if image.startswith(("/", ".", "squashfs:")):  # a squashfs file: its own stat decides
        from uctr_batch.image import reference

        try:
            path = os.path.abspath(reference.parse(image).path)
        except UctrError:
            return None
        stat_key = _stat_key(path)
        return (path,) + stat_key if stat_key else None
    from uctr_batch.image.store import Store
    from uctr_batch.launch.policy_cache import storage_dirs

    try:
        store = Store(storage_dirs(policy, env)[0])
        for entry in store.entries(staged.reference):
            if entry.get("manifest_digest") == staged.manifest_digest:
                path = str(entry["_file"])
                stat_key = _stat_key(path)
                return (path,) + stat_key if stat_key else None
    except (UctrError, OSError):
        pass
    return None


# -- failures seen by the waiting ranks -----------------------------------------------------

def _record_failure(dir_fd, key, error: UctrError) -> None:
    try:
        write_marshal(dir_fd, "img-%s.failed" % key, {
            "time": time.time(), "pid": os.getpid(), "message": error.message,
            "hint": error.hint, "exit_code": error.exit_code})
    except OSError:
        pass


def _raise_recorded_failure(dir_fd, key, waiting_since: float) -> None:
    failure = read_marshal(dir_fd, "img-%s.failed" % key)
    if isinstance(failure, dict) and failure.get("time", 0) >= waiting_since:
        error = UctrError("%s (staging by pid %s on this node failed while this rank waited)"
                          % (failure.get("message"), failure.get("pid")), failure.get("hint"))
        error.exit_code = int(failure.get("exit_code") or 1)
        raise error


def _clear_failure(dir_fd, key) -> None:
    try:
        os.unlink("img-%s.failed" % key, dir_fd=dir_fd)
    except OSError:
        pass


# -- in use -----------------------------------------------------------------------------

def inuse_dir(local_dir: str, digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return os.path.join(local_dir, INUSE_DIR, hexpart if algo == "sha256" else algo + "-" + hexpart)


def mark_in_use(local_dir: str, digest: str) -> None:
    """batch.stage.add_reference(local_dir, digest, 'pid-<pid>') without its imports: the
    reference lives as long as this process, which becomes the payload."""
    directory = inuse_dir(local_dir, digest)
    pid = os.getpid()
    path = os.path.join(directory, "pid-%d" % pid)
    text = '{"pid": %d, "job": null, "host": "%s", "created": %.3f}' % (
        pid, os.uname().nodename.replace('"', ""), time.time())
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(directory, 0o700, exist_ok=True)
        fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def prune_dead_pids(local_dir: str, digest: str) -> int:
    """Remove pid references of processes that are gone (called once per step per node)."""
    directory = inuse_dir(local_dir, digest)
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        pid = name[4:].split("-")[0] if name.startswith("pid-") else ""
        if pid.isdigit() and not os.path.exists("/proc/" + pid):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except OSError:
                pass
    return removed


# -- small files --------------------------------------------------------------------------

