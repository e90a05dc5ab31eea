"""Pull images from registries into the shared cache; `uctr pull`.

    record = ensure_image(ref, registry_config, store, platform=None, pull=True)

returns the cached record, or pulls the image first: resolve the manifest (an index or
manifest list is narrowed to one platform), store manifest and config, download missing
layers in parallel through Store.ingest_blob (one downloader per blob across processes and
nodes; a partial left by a killed pull is resumed), then record the reference.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import fnmatch
import sys
import threading
import time

from uctr_batch import fsutil, log, settings
from uctr_batch.errors import (ConfigError, DigestMismatch, ImageNotFound, NoSpace, RegistryError,
                               StorageError)
from uctr_batch.image import manifest as mt
from uctr_batch.image import platforms
from uctr_batch.image import reference as references
from uctr_batch.image.manifest import ImageRecord, Layer, Platform
from uctr_batch.image.store import CACHED, Store, build_record, digest_of_bytes

_log = log.get("pull")

_COMPLETE_ATTEMPTS = 3  # re-ingest rounds if a concurrent gc removed a blob mid-pull


def ensure_image(ref, registry_config: settings.RegistryConfig, store: Store,
                 platform: None | str | Platform = None, pull: bool = True) -> ImageRecord:
    """The cached record of `ref` for `platform` (default: this host), pulling it if it is
    missing or incomplete. With pull=False a missing image raises ImageNotFound.
    oci:, oci-archive: and docker-archive: references are imported from their files."""
    ref = references.parse(ref) if isinstance(ref, str) else ref
    wanted = _wanted(platform)
    if ref.transport in references.PATH_TRANSPORTS:
        from uctr_batch.image import archive

        return archive.ensure_local(ref, store, wanted)
    rec = store.lookup(ref, wanted)
    if rec is not None and not store.missing_blobs(rec):
        return rec
    if not pull:
        state = "incomplete in" if rec is not None else "not in"
        hint = f"pull it first: uctr pull {ref}" + (f" --platform {platform}" if platform else "")
        raise ImageNotFound(f"image {state} the cache: {ref} ({wanted})", hint)
    return pull_image(ref, registry_config, store, wanted, explicit_platform=platform is not None)


def _wanted(platform) -> Platform:
    if isinstance(platform, Platform):
        return platforms.normalize(platform)
    return platforms.wanted_or_host(platform)


def check_allowed(ref, config: settings.RegistryConfig) -> None:
    """Site rules on canonical references: deny wins, then a non-empty allow list must match."""
    text = str(ref)
    denied = [p for p in config.deny if fnmatch.fnmatchcase(text, p)]
    if denied:
        raise ConfigError(f"image refused by the site policy: {text} (denied by {denied[0]!r})",
                          "use an image the site allows; see `uctr policy explain`")
    if config.allow and not any(fnmatch.fnmatchcase(text, p) for p in config.allow):
        raise ConfigError(
            f"image refused by the site policy: {text} (not in the allowed registries)",
            f"allowed: {', '.join(config.allow)}")


def check_user(ref) -> None:
    """enroot's USER@REGISTRY#IMAGE: the stored credentials for the registry must be USER's
    (uctr keeps one login per registry, so a different or missing one is an error, never a
    silent anonymous pull)."""
    if not getattr(ref, "user", None):
        return
    from uctr_batch.image import auth

    creds = auth.lookup(ref.registry)
    if creds is None or creds.username != ref.user:
        found = f"the stored login is {creds.username!r}" if creds else "no login is stored"
        raise ConfigError(f"{ref} asks for the credentials of {ref.user!r} on {ref.registry}, "
                          f"but {found}", f"run: uctr login {ref.registry} (as {ref.user})")


def pull_image(ref, config: settings.RegistryConfig, store: Store, wanted: Platform,
               explicit_platform: bool = False) -> ImageRecord:
    """Fetch `ref` from its registry into `store` (cached blobs are not fetched again)."""
    from uctr_batch.image.registry import RegistryClient

    check_allowed(ref, config)
    check_user(ref)
    with RegistryClient(ref.registry, config) as client:
        puller = _Puller(client, ref, store, config)
        rec = puller.resolve(wanted, explicit_platform)
        with store.pending(rec_digests(rec)):
            for _ in range(_COMPLETE_ATTEMPTS):
                puller.fetch_layers(rec.layers)
                store.record(rec)
                if not store.missing_blobs(rec):  # a concurrent gc may have raced us
                    return rec
        raise RegistryError(f"blobs of {ref} vanished from the cache while pulling: {store.root}",
                            "is `uctr gc` or `uctr verify --remove` running in a loop? Try again")


def rec_digests(rec: ImageRecord) -> list[str]:
    heads = (rec.index_digest, rec.manifest_digest, rec.config_digest)
    return [d for d in heads if d] + rec.layer_digests()


class _Puller:
    """One pull: a registry client, the reference, and the progress shown."""

    def __init__(self, client, ref, store: Store, config: settings.RegistryConfig):
        self.client, self.ref, self.store, self.config = client, ref, store, config
        self.progress: Progress | None = None

    # -- manifests --------------------------------------------------------------------
    def resolve(self, wanted: Platform, explicit: bool) -> ImageRecord:
        repo = self.ref.repository
        data, media_type, digest = self._manifest(repo, self.ref.manifest_reference)
        if self.ref.digest and digest != self.ref.digest:
            raise DigestMismatch(f"registry returned manifest {digest} for {self.ref}",
                                 "the registry, a mirror or a proxy served other content; "
                                 "nothing was kept")
        index_digest, chosen = None, None
        if media_type in mt.INDEX_TYPES:
            index = _document(data, f"image index {digest} of {self.ref}", mt.check_index)
            self.store.put_bytes(digest, data)
            index_digest = digest
            chosen = platforms.select(index["manifests"], wanted, str(self.ref))
            log.verbose("%s: %s manifest %s", self.ref,
                        platforms.from_json(chosen.get("platform")), chosen["digest"])
            if not chosen["digest"].startswith("sha256:"):
                raise RegistryError(f"unsupported digest {chosen['digest'][:16]}... in the image "
                                    f"index of {self.ref}", "uctr verifies sha256 digests only")
            data, media_type, digest = self._manifest(repo, chosen["digest"])
            if media_type not in mt.MANIFEST_TYPES:
                raise RegistryError(f"index entry {digest} of {self.ref} is not an image "
                                    f"manifest ({media_type})",
                                    "uctr follows one level of index; choose a platform image "
                                    "by digest (IMAGE@sha256:...)")
        manifest = _document(data, f"image manifest {digest} of {self.ref}",
                             mt.check_image_manifest)
        self.store.put_bytes(digest, data)
        config = self._config(manifest, digest)
        platform = platforms.from_json(chosen.get("platform")) if chosen else None
        if chosen is None:
            self._check_single_platform(config, wanted, explicit)
        return build_record(str(self.ref), digest, manifest, config,
                            str(platform) if platform else None, index_digest)

    def _manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """A manifest or index: by digest from the shared cache when it holds it (the
        submit-time pin put it there, so the nodes of a pinned job ask the registry for no
        manifest at all), else from the registry."""
        if reference.startswith("sha256:") and self.store.has_blob(reference):
            data = self._cached_document(reference)
            if data is not None:
                media_type = _media_type_of(data)
                if media_type:
                    log.verbose("%s: manifest %s from the cache", self.ref, reference)
                    return data, media_type, reference
        return self.client.get_manifest(repository, reference)

    def _cached_document(self, digest: str) -> bytes | None:
        try:
            data = self.store.read_blob(digest, mt.MAX_DOCUMENT)
        except StorageError:
            return None
        return data if digest_of_bytes(data, "sha256") == digest else None

    def _config(self, manifest: dict, manifest_digest: str) -> dict:
        desc = manifest["config"]  # check_image_manifest: a digest and a bounded size
        digest, size = desc["digest"], desc["size"]
        self._ingest(Layer(digest, desc.get("mediaType", ""), size), size)
        data = self._cached_small_blob(digest)
        if data is None:  # the cached copy was damaged and is gone: fetch it again
            self._ingest(Layer(digest, desc.get("mediaType", ""), size), size)
            data = self.store.read_blob(digest, mt.MAX_CONFIG)
        return _document(data, f"image config {digest} of {self.ref}", mt.check_image_config,
                         mt.MAX_CONFIG)

    def _cached_small_blob(self, digest: str) -> bytes | None:
        """A cached config, checked against its digest (it is small): a copy damaged in the
        cache is removed (None), so a pull repairs it instead of blaming the registry."""
        try:
            data = self.store.read_blob(digest, mt.MAX_CONFIG)
        except StorageError:  # not a regular file, too big, unreadable
            data = None
        if data is not None and digest_of_bytes(data, "sha256") == digest:
            return data
        _log.warning("cached blob %s is damaged; fetching it again", digest)
        self.store.remove_blob(digest)
        return None

    def _check_single_platform(self, config: dict, wanted: Platform, explicit: bool) -> None:
        have = platforms.from_json(config)
        if have is None or platforms.rank(wanted, have) is not None:
            return
        if explicit:
            raise RegistryError(
                f"{self.ref} is a {have} image, not {wanted}",
                f"it has a single platform; drop --platform or use --platform {have}")
        _log.warning("%s is a %s image; this host is %s", self.ref, have, wanted)

    # -- blobs ------------------------------------------------------------------------
    def fetch_layers(self, layers) -> None:
        unique = list({layer.digest: layer for layer in layers}.values())
        todo = [layer for layer in unique if not self.store.has_blob(layer.digest)]
        for layer in unique:
            if layer not in todo:
                self.store.touch_blob(layer.digest)
                log.verbose("%s: %s", layer.digest, CACHED)
        if not todo:
            return
        self.progress = Progress(str(self.ref), sum(la.size for la in unique),
                                 sum(la.size for la in unique if la not in todo))
        try:
            self._parallel(todo)
        finally:
            self.progress.finish()
            self.progress = None

    def _parallel(self, todo) -> None:
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        workers = max(1, min(self.config.parallel, len(todo)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="uctr-pull") as pool:
            futures = [pool.submit(self._ingest, layer, layer.size) for layer in todo]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()  # not started yet; running downloads finish or fail on their own
        errors = [f.exception() for f in futures
                  if f.done() and not f.cancelled() and f.exception()]
        if errors:
            full = next((e for e in errors if isinstance(e, NoSpace)), None)
            if full is not None and isinstance(full.__cause__, OSError):
                # one blob found the disk full: say how much the whole pull still needs
                left = sum(la.size for la in todo if not self.store.has_blob(la.digest))
                raise fsutil.no_space(full.__cause__, self.store.root, left,
                                      f"pull {self.ref}") from full.__cause__
            raise errors[0]

    def _ingest(self, layer: Layer, size: int | None) -> None:
        progress = self.progress.add if self.progress else None

        def fetch(partial) -> None:
            self.client.download_blob(self.ref.repository, layer.digest, partial, size, progress)

        outcome = self.store.ingest_blob(layer.digest, fetch, size)
        if outcome != "downloaded" and self.progress:
            self.progress.add(layer.size)  # done by someone else: count it as done
        log.verbose("%s: %s", layer.digest, outcome)


def _media_type_of(data: bytes) -> str | None:
    """The media type a cached manifest declares, or that its shape implies (an OCI
    manifest may leave mediaType out); None when it is neither an index nor a manifest."""
    import json

    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    declared = doc.get("mediaType")
    if declared in mt.INDEX_TYPES + mt.MANIFEST_TYPES:
        return declared
    if declared is None and isinstance(doc.get("manifests"), list):
        return mt.OCI_INDEX
    if declared is None and isinstance(doc.get("layers"), list):
        return mt.OCI_MANIFEST
    return None


def pin(ref, config: settings.RegistryConfig, store: Store,
        platform: None | str | Platform = None) -> str:
    """IMAGE:tag -> registry/repository@sha256:... (the index digest of a multi-platform
    image, so that every node still picks its own platform), asking the registry once.
    The manifest(s) and config go into the shared cache, so the nodes need no manifest
    request of their own. A digest reference or an image file is returned as it is,
    without a request."""
    text = ref if isinstance(ref, str) else str(ref)
    ref = references.parse(ref) if isinstance(ref, str) else ref
    if not ref.is_registry:
        return text  # a file (squashfs, archive, layout) is read as it is: nothing to pin
    if ref.digest:
        return f"{ref.name}@{ref.digest}"
    check_allowed(ref, config)
    from uctr_batch.image.registry import RegistryClient

    with RegistryClient(ref.registry, config) as client:
        rec = _Puller(client, ref, store, config).resolve(_wanted(platform),
                                                          explicit=platform is not None)
    return f"{ref.name}@{rec.index_digest or rec.manifest_digest}"


def _document(data: bytes, what: str, check, limit: int = mt.MAX_DOCUMENT) -> dict:
    """Parse and check a document from the registry (bounded: see manifest.parse_document);
    RegistryError naming WHAT and the broken rule."""
    try:
        return check(mt.parse_document(data, limit))
    except mt.InvalidDocument as e:
        raise RegistryError(f"malformed {what}: {e}",
                            "the registry (or a mirror or proxy in between) served a broken "
                            "image document; push the image again or ask the registry's "
                            "operator") from None


class Progress:
    """Bytes done / total for one image on stderr, redrawn in place; only on a TTY and only
    at the default verbosity or above (silent under -q and in batch logs)."""

    _INTERVAL = 0.2

    def __init__(self, label: str, total: int, done: int = 0, stream=None):
        self.stream = stream or sys.stderr
        self.label, self.total, self.done = label, max(total, 1), done
        self.enabled = _isatty(self.stream) and log.get().isEnabledFor(20)
        self._lock = threading.Lock()
        self._last = 0.0
        self._start = time.monotonic()
        self._start_done = done

    def add(self, delta: int) -> None:
        with self._lock:
            self.done += delta
            now = time.monotonic()
            if self.enabled and now - self._last >= self._INTERVAL:
                self._last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        done = min(max(self.done, 0), self.total)
        rate = (done - self._start_done) / max(now - self._start, 1e-3)
        width = 24
        filled = int(width * done / self.total)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {_mb(done)}/{_mb(self.total)} MB "
                          f"{_mb(rate)} MB/s\x1b[K")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            with self._lock:
                self._draw(time.monotonic())
                self.stream.write("\n")
                self.stream.flush()


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# -- command ----------------------------------------------------------------------------

def command_context(args) -> tuple[Store, settings.RegistryConfig]:
    """The cache and registry settings of an image command: flags > environment > policy.
    The policy through the per-node cache `uctr run` and uctr-exec use: `uctr resolve` runs
    at every sbatch/srun with an image, and YAML + schema cost ~55 ms of it."""
    from uctr_batch.policy import registry_settings
    from uctr_batch.run import node_policy as cached_node_policy

    node_policy = cached_node_policy()
    config = settings.registry_config(args, base=registry_settings(node_policy))
    return Store(settings.cache_dir(node_policy)), config


def cmd_pull(args) -> int:
    """uctr pull IMAGE: always asks the registry for the current manifest; prints
    'REFERENCE DIGEST' (the manifest digest) on stdout."""
    ref = references.parse(args.image)
    if ref.transport in references.PATH_TRANSPORTS:
        raise ConfigError(f"not a registry image: {ref}",
                          f"import files with: uctr load {args.image}")
    store, config = command_context(args)
    started = time.monotonic()
    rec = pull_image(ref, config, store, _wanted(args.platform),
                     explicit_platform=bool(args.platform))
    log.verbose("pulled %s in %.2f s", rec.reference, time.monotonic() - started)
    sys.stdout.write(f"{rec.reference} {rec.manifest_digest}\n")
    return 0


def cmd_resolve(args) -> int:
    """uctr resolve IMAGE: print the digest reference IMAGE names now (what sbatch/srun
    pin a job to); the manifest and config are cached on the way. Bounded by --timeout:
    a submission must not hang on a registry that does not answer."""
    import signal

    store, config = command_context(args)

    def expired(signum, frame):
        raise RegistryError(f"could not resolve {args.image} within {args.timeout:g} s",
                            "is the registry reachable from this host? (sites without "
                            "registry access here can defer the pin to the prolog)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, max(args.timeout, 0.001))
    try:
        pinned = pin(args.image, config, store, args.platform)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    sys.stdout.write(pinned + "\n")
    return 0
