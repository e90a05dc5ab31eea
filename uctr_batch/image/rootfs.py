"""Node-local bundles: root filesystems unpacked from cached images (`uctr create/ps/rm`).

Layout under the base directory, settings.default_local_dir() (/tmp/uctr-$UID by default).
This module is the only code that computes these paths::

    bundles/<hex>/rootfs/          the unpacked image (<hex>: its manifest digest)
    bundles/<hex>/image.json       reference, digests, runtime config, unpack stats
    bundles/<hex>/.uctr-complete   written last, holds the manifest digest; mtime = last use
    bundles/.tmp-<hex>@<host>.<pid>/  an unpack in progress, renamed to <hex> when complete
    bundles/.rm-<hex>@<host>.<pid>/   a removal in progress
    locks/<hex>.lock               one unpack per bundle at a time (FileLock)

`--dest DIR` bundles use the same protocol beside DIR: .tmp-<name>@<host>.<pid> and
.rm-<name>@<host>.<pid> siblings, and the lock .<name>.uctr-lock. A directory without the
marker is never used or listed: a killed unpack leaves only a temp sibling, removed by the
next create on the same host (the host is in the name because --dest may be on a shared
filesystem, where only this host can tell whether the pid is gone).
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import errno
import json
import os
import re
import stat
import sys
import time
from pathlib import Path

from uctr_batch import __version__, fsutil, log, settings
from uctr_batch.errors import (ImageNotFound, LayerRejected, NoSpace, StorageError, UctrError,
                               UsageError)
from uctr_batch.image.lock import FileLock, pid_alive
from uctr_batch.image.manifest import ImageRecord

_log = log.get("rootfs")

MARKER = ".uctr-complete"
IMAGE_JSON = "image.json"
ROOTFS = "rootfs"
RUNTIME_KEYS = ("Env", "Entrypoint", "Cmd", "WorkingDir", "User", "Labels")
LOCK_TIMEOUT = 3600.0  # waiting for another process's unpack of the same image
STALE_AFTER = 60.0
_HEX = re.compile(r"^[0-9a-f]{64}$")
_WORK = re.compile(r"^\.(tmp|rm)-(.+)@([^@/]+)\.(\d+)$")  # kind, bundle name, host, pid
_BASE_HINT = ("another user may have created it in the shared directory; set UCTR_LOCAL_DIR "
              "to a directory of your own (e.g. on node-local disk)")


class BundleStore:
    """The node-local base directory and the bundles in it."""

    def __init__(self, base: Path | None = None):
        self.base = Path(base) if base is not None else settings.default_local_dir()
        self.bundles = self.base / "bundles"
        self.locks = self.base / "locks"

    def prepare(self) -> "BundleStore":
        fsutil.ensure_private_dir(self.base, "the node-local directory", _BASE_HINT)
        fsutil.make_private_subdir(self.bundles)
        fsutil.make_private_subdir(self.locks)
        return self

    def existing(self) -> "BundleStore":
        """For ps/rm: check an existing base like prepare() does, but create nothing."""
        if os.path.lexists(self.base):
            self.prepare()
        return self

    def path_for(self, manifest_digest: str) -> Path:
        return self.bundles / _hex_of(manifest_digest)

    def lock_for(self, manifest_digest: str) -> FileLock:
        key = _hex_of(manifest_digest)
        return FileLock(self.locks / f"{key}.lock", timeout=LOCK_TIMEOUT, stale_after=STALE_AFTER,
                        what=f"bundle {key[:12]}")

    def complete_bundles(self) -> list[Path]:
        try:
            names = sorted(os.listdir(self.bundles))
        except (FileNotFoundError, NotADirectoryError):  # e.g. UCTR_LOCAL_DIR=/dev/null/x
            return []
        paths = (self.bundles / n for n in names if _HEX.match(n))
        return [p for p in paths if _marker_digest(p) is not None]

    def contains(self, path: Path) -> bool:
        return path.parent == self.bundles.absolute() and _HEX.match(path.name) is not None


def _hex_of(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not _HEX.match(hexpart):
        raise StorageError(f"invalid manifest digest: {digest!r}",
                           "name a bundle by the sha256 digest `uctr ps` shows")
    return hexpart


def _marker_digest(bundle: Path) -> str | None:
    """The digest in the bundle's completion marker, or None if it is not a complete bundle."""
    try:
        fd = os.open(bundle / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        return f.read().strip() or None


# -- create -----------------------------------------------------------------------------------


def create(record: ImageRecord, store, dest: Path | None = None,
           limit: int | None = None, report: dict | None = None) -> Path:
    """Unpack RECORD's layers (blobs from STORE) into a bundle; return its rootfs path.

    A complete bundle is reused. Otherwise one process per bundle unpacks (lock), into a
    temporary sibling renamed into place once complete, so concurrent creates on a node do
    exactly one unpack and a killed one never leaves a bundle that looks complete. LIMIT
    (bytes, the policy's storage.local_quota) bounds what one unpack may write.

    A full disk, quota or inode table anywhere on the way (the lock, the temp tree, the
    records after the unpack) is an errors.NoSpace; nothing half-made stays behind.
    REPORT (a dict), when given, gets "unpacked": True if this call did the unpack (the
    other concurrent callers waited on the lock and reused it)."""
    base = Path(dest).parent if dest is not None else None
    try:
        if dest is None:
            local = BundleStore().prepare()
            base = local.base
            bundle = local.path_for(record.manifest_digest)
            lock = local.lock_for(record.manifest_digest)
        else:
            bundle = Path(os.path.abspath(dest))
            bundle.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(bundle.parent / f".{bundle.name}.uctr-lock", timeout=LOCK_TIMEOUT,
                            stale_after=STALE_AFTER, what=f"bundle {bundle}")
        if not _is_complete(bundle, record):
            with lock:
                if not _is_complete(bundle, record):
                    _clear_target(bundle, dest is not None)
                    _remove_stale_work(bundle.parent, None if dest is None else bundle.name)
                    _unpack(record, store, bundle, limit, base)
                    if report is not None:
                        report["unpacked"] = True
        return bundle / ROOTFS
    except (OSError, StorageError) as e:
        cause = e if isinstance(e, OSError) else e.__cause__  # e.g. the base dir's mkdir
        if isinstance(e, NoSpace) or not isinstance(cause, OSError):
            raise
        where = base or settings.default_local_dir()
        name = cause.filename if isinstance(cause.filename, str) else ""
        if name and not name.startswith(str(where) + "/"):  # e.g. the cache's pull marker
            where = os.path.dirname(name)
        full = fsutil.no_space(cause, where, None, f"create the bundle of {record.reference}")
        if full is not None:
            raise full from e
        if isinstance(e, StorageError):
            raise
        why = "not a directory" if e.errno == errno.EEXIST else (e.strerror or str(e))
        what = f"{why}: {e.filename}" if e.filename else why
        hint = ("choose a directory you can write: --dest DIR, or UCTR_LOCAL_DIR for the "
                "node-local bundles")
        if e.errno in (errno.EEXIST, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
            hint = "a part of that path is not a directory; " + hint
        raise StorageError(f"cannot create the bundle of {record.reference}: {what}", hint) from e


def _is_complete(bundle: Path, record: ImageRecord) -> bool:
    """A complete bundle of this image? Then mark it used (marker mtime)."""
    if _marker_digest(bundle) != record.manifest_digest:
        return False
    try:
        os.utime(bundle / MARKER)
    except OSError:  # a --dest bundle we may not write: still usable
        pass
    return True


def _clear_target(bundle: Path, is_dest: bool) -> None:
    """Under the lock: make sure the rename can land on BUNDLE. A --dest that holds anything
    is refused; an incomplete store bundle (not made by this protocol) is removed."""
    try:
        st = os.lstat(bundle)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"bundle path is not a directory: {bundle}", f"remove {bundle}")
    if not os.listdir(bundle):
        return  # rename() replaces an empty directory
    if is_dest:
        have = _marker_digest(bundle)
        what = f"another image ({have})" if have else "files"
        raise StorageError(f"--dest directory is not empty: {bundle} holds {what}",
                           f"choose a new directory, or remove it first: uctr rm {bundle}")
    _log.warning("removing incomplete bundle %s", bundle)
    _discard(bundle)


def _diff_ids(record: ImageRecord) -> list[str]:
    """The config's rootfs.diff_ids: one per layer, each uncompressed stream's digest (the
    OCI image spec requires them; containerd and docker refuse an image without)."""
    rootfs = (record.config or {}).get("rootfs") if isinstance(record.config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise LayerRejected(
            f"the image config of {record.reference} has no valid rootfs.diff_ids",
            "the image is damaged or not an OCI/docker image; nothing of it is used. "
            "Report it to its maintainer.")
    return diff_ids


def _unpack(record: ImageRecord, store, bundle: Path, limit: int | None = None,
            base: Path | None = None) -> None:
    from uctr_batch.image import flatten  # only when an unpack really happens

    diff_ids = _diff_ids(record)
    work = bundle.parent / work_name("tmp", bundle.name)
    if os.path.lexists(work):  # a previous process with our pid was killed
        _discard(work)
    os.mkdir(work, 0o700)
    try:
        rootfs = work / ROOTFS
        os.mkdir(rootfs, 0o755)
        os.chmod(rootfs, 0o755)  # whatever the umask: the image's './' entry may change it
        log.verbose("unpacking %s (%d layers) into %s", record.reference, len(record.layers),
                    bundle)
        started = time.monotonic()
        with store.pending(record.layer_digests()):  # keeps a concurrent `uctr gc` off them
            missing = [d for d in record.layer_digests() if not store.has_blob(d)]
            if missing:
                raise ImageNotFound(
                    f"{len(missing)} layer(s) of {record.reference} missing from the cache: "
                    f"{missing[0]}", f"pull it again: uctr pull {record.reference}")
            layers = [(store.blob_path(layer.digest), layer) for layer in record.layers]
            stats = flatten.unpack_layers(layers, rootfs, diff_ids=diff_ids, limit=limit,
                                          space_dir=base or bundle.parent)
        _write_file(work / IMAGE_JSON, json.dumps(_image_json(record, stats), indent=1) + "\n")
        _write_file(work / MARKER, record.manifest_digest + "\n")
        os.rename(work, bundle)
        log.verbose("unpacked %d entries (%.1f MB) in %.2f s", stats.members, stats.bytes / 1e6,
                    time.monotonic() - started)
    except BaseException:
        _discard(work)
        raise


def _write_file(path: Path, text: str) -> None:
    """Write and fsync a record: a full disk shows at write or close, here, never later."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(text.encode())
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _image_json(record: ImageRecord, stats) -> dict:
    config = record.config or {}
    runtime = config.get("config") or {}  # the image config document nests it under "config"
    return {
        "reference": record.reference,
        "manifest_digest": record.manifest_digest,
        "config_digest": record.config_digest,
        "index_digest": record.index_digest,
        "platform": record.platform,
        "layers": record.layer_digests(),
        "config": {key: runtime[key] for key in RUNTIME_KEYS if runtime.get(key) is not None},
        "created": time.time(),
        "size": stats.bytes,
        "unpack": stats.as_dict(),
        "uctr_version": __version__,
    }


def _discard(path: Path) -> None:
    """Remove a temp or half-made tree; a failure is a warning, never the caller's error
    (a leftover must not break the create that found it)."""
    try:
        fsutil.remove_tree(path)
    except FileNotFoundError:
        pass
    except (OSError, UctrError) as e:
        _log.warning("could not remove %s: %s", path, e)


def work_name(kind: str, name: str, pid: int | None = None) -> str:
    """Name of a temp ("tmp") or removal ("rm") sibling of bundle NAME."""
    return f".{kind}-{name}@{os.uname().nodename}.{os.getpid() if pid is None else pid}"


def _remove_stale_work(parent: Path, name: str | None) -> None:
    """Remove temp and removal siblings of killed processes (for bundle NAME, or all)."""
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return
    for entry in entries:
        match = _WORK.match(entry)
        if not match or (name is not None and match.group(2) != name):
            continue
        host, pid = match.group(3), int(match.group(4))
        if host == os.uname().nodename and pid != os.getpid() and not pid_alive(pid, ""):
            _log.debug("removing %s left by killed process %d", entry, pid)
            _discard(parent / entry)


def read_image_json(bundle: Path) -> dict:
    """The bundle's image.json (reference, digests, runtime config) for the run modes."""
    with open(Path(bundle) / IMAGE_JSON, encoding="utf-8") as f:
        return json.load(f)


# -- ps / rm ----------------------------------------------------------------------------------
def bundle_info(bundle: Path) -> dict:
    try:
        meta = read_image_json(bundle)
    except (OSError, ValueError):
        meta = {}
    try:
        last_used = os.stat(bundle / MARKER).st_mtime
    except OSError:
        last_used = None
    return {
        "id": bundle.name if _HEX.match(bundle.name) else None,
        "path": str(bundle),
        "rootfs": str(bundle / ROOTFS),
        "reference": meta.get("reference"),
        "manifest_digest": _marker_digest(bundle),
        "platform": meta.get("platform"),
        "size": meta.get("size"),
        "created": meta.get("created"),
        "last_used": last_used,
    }


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp else "?"


def cmd_ps(args) -> int:
    from uctr_batch.image.store import human_size, print_table

    infos = [bundle_info(b) for b in BundleStore().existing().complete_bundles()]
    if getattr(args, "json", False):
        json.dump(infos, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rows = [{"ID": i["id"][:12], "REFERENCE": i["reference"] or "?",
             "SIZE": human_size(i["size"] or 0), "CREATED": _when(i["created"]),
             "LAST USED": _when(i["last_used"])} for i in infos]
    print_table(rows, ("ID", "REFERENCE", "SIZE", "CREATED", "LAST USED"))
    return 0


def find_bundle(spec: str, local: BundleStore) -> Path:
    """A bundle named by path (the bundle or its rootfs), id prefix, manifest digest or
    image reference."""
    if spec.startswith(("/", "./", "../")) or os.path.lexists(spec):
        path = Path(os.path.abspath(spec))
        if path.name == ROOTFS and _marker_digest(path.parent) is not None:
            path = path.parent
        if _marker_digest(path) is None and not local.contains(path):
            raise UsageError(f"not a uctr bundle: {path}", "uctr rm removes only directories "
                             "made by `uctr create` (see `uctr ps`)")
        return path
    key = spec.split(":", 1)[1] if spec.startswith("sha256:") else spec
    bundles = local.complete_bundles()
    is_id = re.fullmatch(r"[0-9a-f]{4,64}", key) is not None
    matches = [b for b in bundles if is_id and b.name.startswith(key)]
    if not matches:
        matches = [b for b in bundles if bundle_info(b)["reference"] in (spec, _canonical(spec))]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(f"no such bundle: {spec}", "see `uctr ps` for ids")
    ids = ", ".join(b.name[:12] for b in matches)
    raise UsageError(f"ambiguous bundle {spec}: matches {ids}", "give more digits of the id")


def _canonical(spec: str) -> str | None:
    try:
        from uctr_batch.image.store import canonical
        return canonical(spec)
    except Exception:  # not a reference at all: only ids and paths then
        return None


def remove(bundle: Path, local: BundleStore) -> None:
    """Rename the bundle aside (it stops being listed or used at once), then delete it."""
    if local.contains(bundle):
        lock = local.lock_for("sha256:" + bundle.name)
    else:
        lock = FileLock(bundle.parent / f".{bundle.name}.uctr-lock", timeout=LOCK_TIMEOUT,
                        stale_after=STALE_AFTER, what=f"bundle {bundle}")
    aside = bundle.parent / work_name("rm", bundle.name)
    try:
        with lock:
            _remove_stale_work(bundle.parent, None if local.contains(bundle) else bundle.name)
            try:
                os.rename(bundle, aside)
            except FileNotFoundError:
                raise UsageError(f"no such bundle: {bundle}",
                                 "`uctr ps` lists the bundles of this node") from None
        fsutil.remove_tree(aside)
    except OSError as e:
        full = fsutil.no_space(e, bundle.parent, None, f"remove {bundle}")
        raise full or StorageError(
            f"cannot remove {bundle}: {e.strerror or e}",
            f"what is left is {aside}; `uctr rm` or `uctr create` removes it later" if
            os.path.lexists(aside) else None) from e


def cmd_rm(args) -> int:
    local = BundleStore().existing()
    for spec in args.bundle:
        bundle = find_bundle(spec, local)
        remove(bundle, local)
        sys.stdout.write(f"{bundle}\n")
    return 0


# -- create command ---------------------------------------------------------------------------
def cmd_create(args) -> int:
    from uctr_batch.image import pull

    from uctr_batch.policy import current_node_policy

    store, config = pull.command_context(args)
    record = pull.ensure_image(args.image, config, store, args.platform, pull=not args.no_pull)
    storage = getattr(current_node_policy(), "storage", None)
    rootfs = create(record, store, Path(args.dest) if args.dest else None,
                    limit=getattr(storage, "local_quota_bytes", None))
    sys.stdout.write(f"{rootfs}\n")
    return 0
