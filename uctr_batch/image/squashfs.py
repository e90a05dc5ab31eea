"""Squashfs image files (enroot's format, pyxis's `--container-image=/path/img.sqsh`).

    record = ensure_local(ref, store, platform=None)     ref: squashfs:PATH, /PATH or ./PATH
    save(rootfs, path)                                   `--container-save`: rootfs -> squashfs

A squashfs file (what `enroot import`, `enroot export`, pyxis's --container-save and
`save()` here write: the root filesystem, with enroot's /etc/environment, /etc/rc and
/etc/fstab when enroot made it) becomes a one-layer image in the shared cache: sqfs2tar
streams it as an uncompressed tar into the store, which hashes it on the way in. So

- the node-local bundle is keyed by content (the layer digest decides the manifest digest):
  the same file under another name, or copied elsewhere, is unpacked once per node;
- the node-local unpack is the ordinary layer unpack, with all its checks (nothing outside
  the target, device nodes skipped, setuid/setgid bits dropped, quota), done as the user;
- the conversion runs once per file version for all nodes: a small index maps
  (path, device, inode, size, mtime) to the manifest, so an unchanged file is not read again.

No registry is contacted. The image config gets the variables of the file's
/etc/environment (as enroot applies them) and no Entrypoint: enroot keeps the entrypoint in
/etc/rc, which pyxis runs only with --container-entrypoint (see docs/migration.md).
"""

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
from typing import Dict, List, Optional

from uctr_batch import log
from uctr_batch.errors import ConfigError, UctrError
from uctr_batch.image import manifest as mt
from uctr_batch.image import platforms
from uctr_batch.image import reference as references
from uctr_batch.image import sif
from uctr_batch.image.store import Store, build_record, digest_of_bytes

_log = log.get("squashfs")

MAGIC = b"hsqs"  # squashfs superblock, little endian
_INDEX_DIR = "squashfs"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MAX_ENVIRONMENT = 1 << 20  # /etc/environment read into memory
_TOOLS_HINT = "install squashfs-tools and squashfs-tools-ng on the nodes (scripts/install.sh)"


class SquashfsError(UctrError):
    """A file that is not a usable squashfs image (exit 1: fix the input)."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"{name} is not installed: squashfs images cannot be used here",
                          _TOOLS_HINT)
    return path


def _check_file(path: str) -> os.stat_result:
    """The file's stat after checking it is a regular squashfs file (not a SIF, not a tar)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block us
    except OSError as e:
        raise SquashfsError(f"cannot open the squashfs image {path}: {e.strerror}",
                            "give the path of a .sqsh file readable by you on this node") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SquashfsError(f"{path} is not a regular file",
                                "a path image is a squashfs file, e.g. made by `enroot import`")
        head = os.pread(fd, 64, 0)
    finally:
        os.close(fd)
    if head[:4] == MAGIC:
        return st
    if sif.has_magic(head) or path.endswith(".sif"):  # `uctr run`/uctr-exec run a SIF in S1
        raise SquashfsError(f"{path} is an Apptainer/Singularity image (SIF), not a squashfs: "
                            "uctr runs it (uctr run, uctr-exec, --container-image) in mode S1 "
                            "but never unpacks it", sif.CONVERT_HINT)
    raise SquashfsError(f"{path} is not a squashfs image",
                        "references starting with '/' or '.' name squashfs files (as in pyxis); "
                        "use oci:DIR, oci-archive:FILE or docker-archive:FILE for other formats")


def _index_path(store: Store, path: str, st: os.stat_result):
    key = f"{path}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    return store.root / _INDEX_DIR / (hashlib.sha256(key.encode("utf-8", "surrogateescape"))
                                      .hexdigest()[:40] + ".json")


def ensure_local(ref, store: Store, platform=None) -> mt.ImageRecord:
    """The cached one-layer image of a squashfs reference, converted on first use."""
    if isinstance(ref, str):
        ref = references.parse(ref)
    path = os.path.abspath(ref.path)
    st = _check_file(path)
    name = f"{references.SQUASHFS}:{path}"
    index = _index_path(store, path, st)
    rec = _from_index(store, index, name)
    if rec is not None:
        _log.debug("%s: unchanged since its conversion (%s)", path, rec.manifest_digest)
        return rec
    rec = _convert(path, store, name, platform)
    index.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = index.with_name(f".{index.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"manifest_digest": rec.manifest_digest, "path": path}))
    os.replace(tmp, index)
    return rec


def _from_index(store: Store, index, name: str) -> Optional[mt.ImageRecord]:
    try:
        digest = json.loads(index.read_text())["manifest_digest"]
        manifest = store.read_json(digest)
        config = store.read_json(manifest["config"]["digest"])
    except (OSError, ValueError, KeyError, TypeError, UctrError):
        return None  # never converted, or collected by gc since: convert again
    rec = build_record(name, digest, manifest, config)
    if store.missing_blobs(rec):
        return None
    store.record(rec)  # refresh: gc keeps what the ref index names
    return rec


def _convert(path: str, store: Store, name: str, platform) -> mt.ImageRecord:
    sqfs2tar = _tool("sqfs2tar")
    _log.info("converting squashfs image %s", path)
    # -X: xattrs are not kept by the layer unpack either; stderr is read after the stream
    proc = subprocess.Popen([sqfs2tar, "--no-xattr", path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        digest, _ = store.ingest_stream(proc.stdout)
    finally:
        proc.stdout.close()
        err = proc.stderr.read(4096).decode(errors="replace").strip()
        rc = proc.wait()
    if rc != 0:
        raise SquashfsError(f"cannot read the squashfs image {path}: {err or f'sqfs2tar exit {rc}'}",
                            "the file is damaged or uses a compressor this node lacks; "
                            "make it again (enroot import, mksquashfs)")
    size = store.blob_path(digest).stat().st_size
    wanted = platforms.wanted_or_host(str(platform) if platform else None)
    config = {"architecture": wanted.architecture, "os": wanted.os,
              "rootfs": {"type": "layers", "diff_ids": [digest]},
              "config": {"Env": _environment(path)}}
    if wanted.variant:
        config["variant"] = wanted.variant
    config_bytes = _canonical_json(config)
    config_digest = digest_of_bytes(config_bytes)
    store.put_bytes(config_digest, config_bytes)
    manifest = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                "config": {"mediaType": mt.OCI_CONFIG, "digest": config_digest,
                           "size": len(config_bytes)},
                "layers": [{"mediaType": mt.OCI_LAYER_TAR, "digest": digest, "size": size}]}
    # no name or date in either document: content alone decides the manifest digest
    manifest_bytes = _canonical_json(manifest)
    manifest_digest = digest_of_bytes(manifest_bytes)
    store.put_bytes(manifest_digest, manifest_bytes)
    rec = build_record(name, manifest_digest, manifest, config)
    store.record(rec)
    return rec


def _canonical_json(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _environment(path: str) -> List[str]:
    """KEY=VALUE lines of the image's /etc/environment (enroot writes the image's Env there)."""
    try:
        out = subprocess.run([_tool("unsquashfs"), "-cat", path, "etc/environment"],
                             capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    except (subprocess.TimeoutExpired, OSError):
        return []
    if out.returncode != 0:
        return []  # no /etc/environment: not made by enroot
    return parse_environment(out.stdout[:_MAX_ENVIRONMENT].decode("utf-8", "replace"))


def parse_environment(text: str) -> List[str]:
    """enroot's /etc/environment: KEY=VALUE lines, values possibly in double quotes."""
    env: Dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not _NAME.match(key):
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key] = value
    return [f"{k}={v}" for k, v in env.items()]


# -- --container-save ------------------------------------------------------------------------

def save(rootfs: str, target: str) -> None:
    """Write ROOTFS as a squashfs image at TARGET (atomically: a temporary file beside it,
    named for this host and process, renamed), in the format ensure_local() and enroot read. Files are stored as root-owned
    (-all-root), as `enroot export` does: the image must not carry the saving user's uid."""
    mksquashfs = _tool("mksquashfs")
    target = os.path.abspath(target)
    if target.endswith("/") or os.path.isdir(target):
        raise ConfigError(f"--container-save: {target} is a directory",
                          "give the path of the squashfs file to write, e.g. ~/saved.sqsh")
    directory = os.path.dirname(target)
    if not os.access(directory, os.W_OK):
        raise ConfigError(f"--container-save: cannot write in {directory}",
                          "choose a directory you can write to")
    # the nodes of a multi-node step may all save to one shared path: a temporary file of
    # each node's own, renamed, so the file there is always one node's complete image
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{socket.gethostname()}."
                                  f"{os.getpid()}.tmp")
    argv = [mksquashfs, rootfs, tmp, "-all-root", "-noappend", "-no-xattrs", "-quiet",
            "-no-progress", "-comp", "gzip"]
    try:
        done = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise ConfigError(f"--container-save: mksquashfs failed: "
                              f"{done.stderr.decode(errors='replace').strip()[-500:]}",
                              "check the free space where the image is saved")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
