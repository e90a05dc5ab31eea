"""Registry client: the only code in uctr that speaks HTTP (Distribution API v2, on requests).

    client = RegistryClient(ref.registry, settings.registry_config(args))
    data, media_type, digest = client.get_manifest(ref.repository, ref.manifest_reference)
    size = client.download_blob(ref.repository, layer.digest, partial_path, layer.size, progress)

What it handles, so callers do not have to:

- Endpoints: the mirrors configured for the registry, in order, then the origin. A mirror that
  fails in any way is skipped for that request (one attempt, no retries; logged at -v) and,
  after a connection failure, for the rest of this client's life.
- Scheme: https, verified against the system CAs plus ``config.ca_file``. Plain http only for
  hosts listed in ``config.insecure`` (loopback included: nothing is implicitly insecure).
- Auth: anonymous first; a 401 is answered once from its ``WWW-Authenticate`` challenge, Bearer
  (token from the realm, with Basic credentials when known, cached per repository scope until
  it expires) or Basic. Later requests send what worked without waiting for another 401.
- Failures: connection errors, 5xx, 429 and bodies cut short are retried ``config.retries``
  times with exponential backoff and jitter, or after ``Retry-After`` (capped). A transfer with
  no byte for ``config.stall_timeout`` seconds counts as cut short. Blob downloads resume with
  ``Range`` from what is already on disk.
- Integrity: manifests fetched by digest and every blob are checked against their sha256.

Thread safety: one client may be shared by download threads; each thread gets its own pooled
``requests.Session``. ``requests`` is imported when a client is built, not with this module.
"""

import hashlib
import os
import queue
import random
import re
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import urlencode

from uctr_batch import __version__, fsutil, log
from uctr_batch.errors import (
    AuthError,
    ConfigError,
    DigestMismatch,
    RegistryError,
    StorageError,
    TransferError,
)
from uctr_batch.image import auth, manifest
from uctr_batch.image.reference import api_host
from uctr_batch.settings import RegistryConfig

_log = log.get("registry")

CHUNK = 1 << 20  # bytes per read: large enough that Python overhead per chunk vanishes
BACKGROUND_HASH_MIN = 8 << 20  # blobs from this size on are hashed on a helper thread
MAX_MANIFEST = manifest.MAX_DOCUMENT  # containerd's cap: a bigger "manifest" is an attack
MAX_TOKEN_RESPONSE = 1 << 20
MAX_ERROR_BODY = 65536  # an error body only words a message
MAX_TOKEN = 1 << 16  # characters of a bearer token (JWTs are a few KiB)
MAX_TOKEN_LIFETIME = 86400.0  # seconds a token is cached at most, whatever the server says
MAX_CHALLENGE = 8192  # characters of a WWW-Authenticate header that are parsed
DOCUMENT_DEADLINE = 10  # a JSON document must arrive within this many stall timeouts
HEADER_DEADLINE = 2  # connecting plus the status line and headers: connect timeout + this many
# stall timeouts (the socket timeout alone lets a server that sends one header byte, or one
# "100 Continue", per stall timeout hold a request forever)
TRICKLE_BYTES = 16384  # a blob download receiving less than this per stall timeout stalled
RETRY_AFTER_CAP = 60.0  # seconds; a server asking for longer gets this much
BACKOFF_BASE = 0.25  # seconds before the first retry; doubles each time, with jitter
BACKOFF_CAP = 8.0
TOKEN_LIFETIME = 60  # seconds, when the token server does not say (the spec's default)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))')
_TOKEN = re.compile(r"[\x21-\x7e]+\Z")  # a token goes into a header: visible ASCII only
_HTTPS_ONLY = "Client sent an HTTP request to an HTTPS server"

ProgressFn = Callable[[int], None]


class _Retryable(Exception):
    """A failure worth another attempt (network, 5xx, 429, short body)."""

    def __init__(self, cause: str, url: str, retry_after: Optional[float] = None,
                 unreachable: bool = False):
        super().__init__(cause)
        self.cause, self.url = cause, url
        self.retry_after = retry_after
        self.unreachable = unreachable  # nothing answered: such a mirror is skipped from now on


class _Endpoint:
    """One base URL to try: a mirror or the origin, with the auth state learnt from it."""

    def __init__(self, base: str, login_name: str, mirror: bool):
        self.base = base.rstrip("/")
        self.login_name = login_name  # what `uctr login` should be given for this endpoint
        self.mirror = mirror
        self.dead = False
        self.challenge: Optional[Tuple[str, Dict[str, str]]] = None  # (scheme, params)
        self.credentials: Optional[auth.Credentials] = None
        self.credentials_known = False

    def __repr__(self) -> str:
        return self.base


class RegistryClient:
    """Client for one registry (``host[:port]`` as in a reference; ``docker.io`` for Docker Hub)."""

    def __init__(self, ref_registry: str, config: RegistryConfig,
                 credentials: Optional[auth.Credentials] = None):
        self.registry = ref_registry
        self.config = config
        self._endpoints = [_Endpoint(self._mirror_base(url), auth.normalize_host(url), True)
                           for url in config.mirrors.get(ref_registry, ())]
        origin = api_host(ref_registry)
        scheme = "http" if self._is_insecure(ref_registry) or self._is_insecure(origin) else "https"
        self._origin = _Endpoint(f"{scheme}://{origin}", ref_registry, False)
        if credentials is not None:
            self._origin.credentials, self._origin.credentials_known = credentials, True
        self._endpoints.append(self._origin)
        self._lock = threading.Lock()
        # (endpoint base, scope) -> (Authorization header, monotonic expiry)
        self._tokens: Dict[Tuple[str, str], Tuple[str, float]] = {}
        self._local = threading.local()
        self._sessions: List = []
        self._adapter_factory = _adapter_factory(config)  # imports requests; checks the CA file

    # -- public API ------------------------------------------------------------------------------

    def get_manifest(self, repository: str, reference: str) -> Tuple[bytes, str, str]:
        """Fetch a manifest or index by tag or digest: ``(bytes, media_type, digest)``.

        Asks for every type in ``manifest.ACCEPT_ALL``. ``digest`` is the sha256 of the bytes
        returned; when ``reference`` is a digest the bytes are checked against it
        (DigestMismatch). ``media_type`` comes from Content-Type, else from the document's
        ``mediaType``; other types (Docker schema 1) raise RegistryError.
        """
        what = f"{self.registry}/{repository}{'@' if _DIGEST.match(reference) else ':'}{reference}"
        path = f"/v2/{repository}/manifests/{reference}"

        def fetch(endpoint: _Endpoint) -> Tuple[bytes, str, str]:
            resp = self._request(endpoint, "GET", path, repository, {"Accept": manifest.ACCEPT_ALL})
            with resp:
                if resp.status_code != 200:
                    error = self._status_error(resp, repository, what)
                    if resp.status_code == 404 and not endpoint.mirror:
                        error = self._explain_missing(endpoint, repository, error)
                    raise error
                data = _read_limited(resp, MAX_MANIFEST, what, self._deadline())
                content_type = resp.headers.get("Content-Type", "")
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            if _DIGEST.match(reference) and digest != reference:
                raise DigestMismatch(f"manifest does not match its digest (got {digest}): {what}",
                                     "the registry served different content; nothing was kept")
            return data, _media_type(content_type, data, what), digest

        return self._on_endpoints(fetch)

    def download_blob(self, repository: str, digest: str, partial_path: str,
                      expected_size: Optional[int] = None,
                      progress: Optional[ProgressFn] = None) -> int:
        """Download blob ``digest`` into ``partial_path``, verified; return its size in bytes.

        The file is appended to: bytes already there (an earlier interrupted run) are hashed
        and the rest is requested with ``Range: bytes=N-``; a server that answers 200 instead
        of 206 restarts it from zero, and a resumed file that fails verification is fetched
        once more from zero. sha256 is computed while streaming. On return the file holds
        exactly the blob and the caller may rename it into place. After TransferError or
        AuthError the file holds what arrived so far, for the next run to resume; after
        DigestMismatch it is deleted, so bad data can never be committed.

        ``expected_size`` (from the descriptor) bounds the download: more bytes is a mismatch.
        ``progress(delta)`` is called with the byte count of each chunk written (once with
        the resumed size at the start, negative when a partial file is discarded).
        The caller must ensure a single writer per ``partial_path`` (the store's lock).
        """
        if not _DIGEST.match(digest):
            raise RegistryError(f"unsupported blob digest: {digest}",
                                "uctr verifies sha256 digests only")
        what = f"blob {digest} of {self.registry}/{repository}"
        with _PartialBlob(partial_path, digest, expected_size, progress) as part:
            try:
                self._on_endpoints(lambda ep: self._fetch_verified(ep, repository, part, what))
            except DigestMismatch:
                part.discard()
                raise
            return part.size

    def verify_credentials(self) -> bool:
        """Check this client's credentials against the origin (GET /v2/), for ``uctr login``.

        Returns True when the registry asked for and accepted them, False when it asked for
        nothing (an open registry), and raises AuthError when it rejected them.
        """
        def ping(endpoint: _Endpoint) -> bool:
            resp = self._request(endpoint, "GET", "/v2/", None, {})
            with resp:
                if resp.status_code != 200:
                    raise self._status_error(resp, None, endpoint.base + "/v2/")
            return endpoint.challenge is not None

        return self._with_retries(self._origin, ping)

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- endpoints and retries -------------------------------------------------------------------

    def _is_insecure(self, host: str) -> bool:
        hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        wanted = {auth.normalize_host(h) for h in self.config.insecure}
        return host.lower() in wanted or hostname.lower() in wanted

    def _mirror_base(self, url: str) -> str:
        if "://" in url:
            return url
        return ("http://" if self._is_insecure(auth.normalize_host(url)) else "https://") + url

    def _on_endpoints(self, operation):
        """Run operation(endpoint) on the mirrors, then the origin; the origin's error stands."""
        for endpoint in self._endpoints:
            if endpoint.dead:
                continue
            try:
                return self._with_retries(endpoint, operation)
            except RegistryError as e:
                if not endpoint.mirror:
                    raise
                _log.log(log.VERBOSE, "mirror %s failed (%s); trying the next source", endpoint, e)
        raise AssertionError("the origin endpoint is never skipped")

    def _with_retries(self, endpoint: _Endpoint, operation):
        attempts = 1 if endpoint.mirror else 1 + max(0, self.config.retries)
        for attempt in range(attempts):
            try:
                return operation(endpoint)
            except _Retryable as e:
                last = e
                if endpoint.mirror and e.unreachable:
                    endpoint.dead = True
                if attempt + 1 == attempts:
                    break
                delay = self._delay(attempt, e.retry_after)
                _log.log(log.VERBOSE, "%s: %s; retry %d/%d in %.1f s",
                         e.url, e.cause, attempt + 1, attempts - 1, delay)
                time.sleep(delay)
        raise TransferError(
            f"{last.cause} (after {attempts} attempt{'s' if attempts > 1 else ''}): {last.url}",
            "check that the registry is up and reachable, then run the command again: finished "
            "blobs are kept and a partial one resumes (UCTR_RETRIES, UCTR_STALL_TIMEOUT tune this)",
        )

    def _deadline(self) -> float:
        """When a JSON document that started arriving now must be complete (a server that
        trickles one byte per stall timeout must not hold uctr forever)."""
        return time.monotonic() + DOCUMENT_DEADLINE * self.config.stall_timeout

    @staticmethod
    def _delay(attempt: int, retry_after: Optional[float]) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), RETRY_AFTER_CAP)
        return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt) * random.uniform(0.5, 1.5)

    # -- HTTP with auth ----------------------------------------------------------------------------

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            session.headers["User-Agent"] = f"uctr-batch/{__version__}"
            adapter = self._adapter_factory()
            session.mount("https://", adapter)
            session.mount("http://", adapter)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _send(self, method: str, url: str, headers: Dict[str, str], stream: bool = True):
        """session.request, with network failures sorted into retryable and final ones."""
        import requests

        timeout = (self.config.connect_timeout, self.config.stall_timeout)
        try:
            resp = self._session().request(method, url, headers=headers, stream=stream,
                                           timeout=timeout, allow_redirects=True)
        except requests.exceptions.SSLError as e:
            raise _tls_error(url, e) from e
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            connect = not isinstance(e, requests.exceptions.ReadTimeout)
            raise _Retryable(self._describe(e), url, unreachable=connect) from e
        except requests.exceptions.TooManyRedirects as e:
            raise TransferError(f"too many redirects (a redirect loop?): {url}",
                                "the registry or a proxy in front of it is misconfigured; "
                                "tell its operator") from e
        except requests.exceptions.RequestException as e:
            raise TransferError(f"request failed: {url}: {_printable(str(e)[:300])}",
                                "check the registry address and the network; run with -v "
                                "for details") from e
        except (ValueError, UnicodeError) as e:  # e.g. a redirect to "http://[::1/x"
            raise TransferError(f"unusable URL or redirect from {url}: "
                                f"{_printable(str(e)[:200])}",
                                "the registry or a proxy in front of it sent a malformed "
                                "Location; tell its operator") from e
        _log.debug("%s %s -> %d", method, url, resp.status_code)
        status = resp.status_code
        if status == 429 or (status >= 500 and status not in (501, 505)):  # worth another try
            retry_after = _retry_after(resp.headers.get("Retry-After"))
            _discard(resp)
            raise _Retryable(f"HTTP {resp.status_code} {resp.reason}", url, retry_after)
        return resp

    def _request(self, endpoint: _Endpoint, method: str, path: str, repository: Optional[str],
                 headers: Dict[str, str]):
        """One request on endpoint, authorised; a 401 is answered from its challenge once."""
        url = endpoint.base + path
        scope = f"repository:{repository}:pull" if repository else ""
        sent = self._authorization(endpoint, scope)
        resp = self._send(method, url, _with_auth(headers, sent))
        if resp.status_code != 401:
            return resp
        challenge = _parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        _discard(resp)
        answer = self._answer(endpoint, challenge, scope, repository, url, sent)
        resp = self._send(method, url, _with_auth(headers, answer))
        if resp.status_code == 401:
            _discard(resp)
            raise self._denied(endpoint, repository, challenge[0])
        return resp

    def _credentials(self, endpoint: _Endpoint) -> Optional[auth.Credentials]:
        if not endpoint.credentials_known:
            endpoint.credentials = auth.lookup(endpoint.login_name)
            endpoint.credentials_known = True
        return endpoint.credentials

    def _authorization(self, endpoint: _Endpoint, scope: str) -> Optional[str]:
        """What to send before any 401: what the endpoint asked for last time, if anything."""
        with self._lock:
            challenge = endpoint.challenge
            cached = self._tokens.get((endpoint.base, scope))
        if challenge is None:
            return None
        if challenge[0] == "basic":
            creds = self._credentials(endpoint)
            return creds.basic_authorization() if creds else None
        if cached and cached[1] > time.monotonic():
            return cached[0]
        return self._fetch_token(endpoint, challenge[1], scope)

    def _answer(self, endpoint: _Endpoint, challenge, scope: str, repository: Optional[str],
                url: str, sent: Optional[str]) -> str:
        if challenge is None:
            raise AuthError(f"{endpoint.login_name} refused the request without a usable "
                            f"WWW-Authenticate challenge: {url}",
                            "the registry's authentication scheme is not supported")
        with self._lock:
            endpoint.challenge = challenge
            self._tokens.pop((endpoint.base, scope), None)
        kind, params = challenge
        if kind == "bearer":
            return self._fetch_token(endpoint, params, scope or params.get("scope", ""))
        creds = self._credentials(endpoint)
        if creds is None or sent == creds.basic_authorization():
            raise self._denied(endpoint, repository, kind)
        return creds.basic_authorization()

    def _fetch_token(self, endpoint: _Endpoint, params: Dict[str, str], scope: str) -> str:
        """GET the Bearer realm (Docker token spec); cache the token for (endpoint, scope)."""
        realm = params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise AuthError(f"{endpoint.login_name} gave an unusable token realm {realm[:200]!r}",
                            "the registry's authentication is misconfigured; tell its operator")
        query = [("service", params["service"])] if params.get("service") else []
        if scope:
            query.append(("scope", scope))
        creds = self._credentials(endpoint)
        headers = {"Authorization": creds.basic_authorization()} if creds else {}
        url = (realm + ("&" if "?" in realm else "?") + urlencode(query)) if query else realm
        resp = self._send("GET", url, headers)
        with resp:
            if resp.status_code in (401, 403):
                raise self._denied(endpoint, None, "token")
            if resp.status_code != 200:
                raise RegistryError(f"token server answered HTTP {resp.status_code}: {realm}",
                                    "the registry's token service is failing; try again later")
            body = _read_limited(resp, MAX_TOKEN_RESPONSE, realm, self._deadline())
        token, lifetime = _token_response(body, realm)
        header = "Bearer " + token
        with self._lock:  # refresh a little early: a token must not expire in flight
            self._tokens[(endpoint.base, scope)] = (header, time.monotonic() + 0.9 * lifetime)
        return header

    def _denied(self, endpoint: _Endpoint, repository: Optional[str], kind: str) -> AuthError:
        """The AuthError for a refusal: missing credentials, wrong ones, or too few rights.

        kind is the challenge answered ("basic", "bearer") or "token" when the token server
        itself refused. Docker Hub also refuses anonymous pulls of repositories that do not
        exist, so the message leaves that open.
        """
        name = endpoint.login_name
        creds = self._credentials(endpoint)
        target = f"{self.registry}/{repository}" if repository else name
        if creds is None:
            return AuthError(
                f"authentication required (or the repository does not exist): {target}",
                f"check the name; for a private image run: uctr login {name}")
        source = f", from {creds.source}" if creds.source else ""
        if kind != "bearer" or repository is None:  # only the credentials can be wrong here
            return AuthError(
                f"wrong username or password for {name} (user {creds.username}{source})",
                f"run: uctr login {name}")
        return AuthError(f"access denied for user {creds.username} (or the repository does not "
                         f"exist): {target}",
                         f"check the name and your rights; to change user run: uctr login {name}")

    # -- statuses and errors -----------------------------------------------------------------------

    def _status_error(self, resp, repository: Optional[str], what: str) -> RegistryError:
        """A RegistryError for an unexpected final status, worded from its error codes."""
        codes, message = _error_codes(resp)
        if resp.status_code == 403:
            return AuthError(f"access denied: {what}",
                             f"check your rights; run: uctr login {self.registry}")
        if "NAME_UNKNOWN" in codes:
            return self._repository_not_found(repository)
        if "MANIFEST_UNKNOWN" in codes:
            return RegistryError(f"tag or digest not found: {what}", "check the tag or digest")
        if "BLOB_UNKNOWN" in codes or resp.status_code == 404:
            return RegistryError(f"not found on the registry: {what}",
                                 "the registry lacks data its manifest refers to; push it again")
        if resp.status_code == 400 and _HTTPS_ONLY in message:
            return TransferError(f"{self.registry} speaks HTTPS, not plain HTTP: {resp.url}",
                                 "remove it from the insecure registries (--insecure-registry, "
                                 "UCTR_INSECURE_REGISTRIES); give a private CA with --tls-ca")
        detail = f" ({message})" if message else ""
        return RegistryError(f"HTTP {resp.status_code} {_printable(str(resp.reason)[:100])}"
                             f"{detail}: {resp.url}",
                             "check the image name and the registry address; run with -v "
                             "for the requests made")

    def _repository_not_found(self, repository: Optional[str]) -> RegistryError:
        return RegistryError(f"repository not found: {self.registry}/{repository}",
                             "check the image name (e.g. docker.io/library/debian:12); "
                             f"a private repository needs: uctr login {self.registry}")

    def _explain_missing(self, endpoint: _Endpoint, repository: str,
                         error: RegistryError) -> RegistryError:
        """Tell a missing repository from a missing tag (distribution says MANIFEST_UNKNOWN
        for both), listing some tags that do exist. Best effort: on failure keep ERROR."""
        path = f"/v2/{repository}/tags/list?n=100"
        try:
            resp = self._request(endpoint, "GET", path, repository, {})
        except (_Retryable, RegistryError):
            return error
        with resp:
            if resp.status_code == 404:
                return self._repository_not_found(repository)
            try:
                tags = _tag_list(_read_limited(resp, MAX_MANIFEST, "tag list", self._deadline()))
            except (_Retryable, RegistryError):
                return error
        if resp.status_code == 200 and tags:
            shown = ", ".join(sorted(tags)[:10]) + (", ..." if len(tags) > 10 else "")
            error.hint = f"tags in {self.registry}/{repository}: {shown}"
        return error

    def _describe(self, exc: Exception) -> str:
        text = str(exc)
        for needle, meaning in (
            (_SLOW_HEADERS, f"response headers did not arrive within "
                            f"{_header_deadline(self.config):g} s"),
            ("Read timed out", f"stalled: no data for {self.config.stall_timeout:g} s"),
            ("Connection refused", "connection refused"),
            ("Name or service not known", "cannot resolve the host name"),
            ("Temporary failure in name resolution", "cannot resolve the host name"),
            ("Connection reset", "connection reset"),
            ("IncompleteRead", "connection closed early (truncated body)"),
            ("timed out", "connection timed out"),
        ):
            if needle in text:
                return meaning
        return text.splitlines()[0][:200] if text else type(exc).__name__

    # -- blobs -------------------------------------------------------------------------------------

    def _fetch_verified(self, endpoint: _Endpoint, repository: str, part: "_PartialBlob",
                        what: str) -> None:
        """One attempt: fetch what is missing, then verify; bad data is never kept."""
        if not part.complete:
            self._fetch_blob(endpoint, repository, part, what)
        if part.verified():
            return
        from_disk = part.resumed
        part.restart()  # the next source or attempt starts from zero
        if from_disk:  # bytes left by an earlier run may be what is wrong: try again afresh
            raise _Retryable("resumed data did not verify; starting again from zero",
                             endpoint.base, retry_after=0.0)
        raise DigestMismatch(f"downloaded data does not match its digest: {what}",
                             "the registry, a mirror or a proxy served corrupt data; nothing was "
                             "kept, so running the command again downloads it afresh")

    def _fetch_blob(self, endpoint: _Endpoint, repository: str, part: "_PartialBlob", what: str):
        """One attempt at the rest of a blob; raises _Retryable when worth another."""
        headers = {"Accept-Encoding": "identity"}
        if part.size:
            headers["Range"] = f"bytes={part.size}-"
        path = f"/v2/{repository}/blobs/{part.digest}"
        resp = self._request(endpoint, "GET", path, repository, headers)
        with resp:
            if resp.status_code == 416 and part.size:
                if _range_total(resp) == part.size:
                    return  # already whole; verified by the caller
                part.restart()
                raise _Retryable("partial file longer than the blob; restarting", resp.url, 0.0)
            if resp.status_code == 206:
                start = _range_start(resp)
                if start != part.size:
                    part.restart()
                    raise _Retryable(f"server resumed at byte {start}, not {part.size}",
                                     resp.url, 0.0)
            elif resp.status_code == 200:
                if part.size:
                    _log.log(log.VERBOSE, "%s: server ignored Range; starting from zero", what)
                    part.restart()
            else:
                raise self._status_error(resp, repository, what)
            self._stream_into(resp, part)
        if part.expected_size is not None and part.size < part.expected_size:
            raise _Retryable(f"connection closed early (truncated body: {part.size} of "
                             f"{part.expected_size} bytes)", resp.url)

    def _stream_into(self, resp, part: "_PartialBlob") -> None:
        import urllib3

        # The bytes are hashed exactly as they arrive (we asked for identity, as Docker does):
        # decoding a Content-Encoding a server adds anyway could turn one chunk into gigabytes
        # in memory, and the digest names the blob as pushed, not a re-encoding of it.
        # read1 returns what has arrived (up to CHUNK) instead of waiting for a full chunk, so
        # the bytes received before a stall are kept and the retry resumes right after them.
        read = getattr(resp.raw, "read1", None) or resp.raw.read
        # The socket timeout catches silence; a server that trickles a byte now and then
        # defeats it, so fewer than TRICKLE_BYTES in a stall timeout counts as a stall too.
        window_start, window_bytes = time.monotonic(), 0
        while True:
            try:
                chunk = read(CHUNK, decode_content=False)
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise _Retryable(f"{self._describe(e)} after {part.size} bytes", resp.url) from e
            if not chunk:
                return
            part.write(chunk)
            window_bytes += len(chunk)
            now = time.monotonic()
            if window_bytes >= TRICKLE_BYTES:
                window_start, window_bytes = now, 0
            elif now - window_start > self.config.stall_timeout:
                raise _Retryable(f"stalled: fewer than {TRICKLE_BYTES} bytes in "
                                 f"{self.config.stall_timeout:g} s after {part.size} bytes",
                                 resp.url)


class _PartialBlob:
    """The partial file of one blob download: appends, hashes, and knows when it is whole."""

    def __init__(self, path: str, digest: str, expected_size: Optional[int],
                 progress: Optional[ProgressFn]):
        self.path, self.digest, self.expected_size = os.fspath(path), digest, expected_size
        self.progress = progress or (lambda delta: None)
        self.size = 0
        self.resumed = False
        background = expected_size is None or expected_size >= BACKGROUND_HASH_MIN
        self._hash = _Hasher(background)
        self._file = None

    def __enter__(self) -> "_PartialBlob":
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            full = fsutil.no_space(e, os.path.dirname(self.path), self.expected_size,
                                   f"download {self.digest}")
            if full is not None:
                raise full from e
            raise StorageError(f"cannot open the download file {self.path}: {e.strerror}",
                               "check the cache directory (UCTR_CACHE) and its permissions") from e
        self._file = os.fdopen(fd, "r+b", buffering=0)
        self._hash_existing()
        return self

    def __exit__(self, *exc) -> None:
        self._hash.finish()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _hash_existing(self) -> None:
        """Account for bytes an earlier run left, so the download resumes after them."""
        on_disk = os.fstat(self._file.fileno()).st_size
        if self.expected_size is not None and on_disk > self.expected_size:
            self._file.truncate(0)
            return
        self._file.seek(0)
        while True:
            chunk = self._file.read(CHUNK)
            if not chunk:
                break
            self._hash.update(chunk)
            self.size += len(chunk)
        if self.size:
            self.resumed = True
            _log.log(log.VERBOSE, "resuming %s after %d bytes", self.digest, self.size)
            self.progress(self.size)

    @property
    def complete(self) -> bool:
        return self.expected_size is not None and self.size == self.expected_size

    def write(self, chunk: bytes) -> None:
        if self.expected_size is not None and self.size + len(chunk) > self.expected_size:
            self.restart()
            raise DigestMismatch(
                f"registry sent more than the {self.expected_size} bytes of blob {self.digest}",
                "the registry, a mirror or a proxy served wrong data; nothing was kept")
        view = memoryview(chunk)
        while view:  # a write can be short (a disk filling up): only what landed is counted
            try:
                written = os.write(self._file.fileno(), view)
            except OSError as e:
                needed = None
                if self.expected_size is not None:
                    needed = self.expected_size - self.size
                full = fsutil.no_space(e, os.path.dirname(self.path), needed,
                                       f"download {self.digest}")
                if full is not None:
                    raise full from e  # not retried: the disk stays full until someone acts
                raise StorageError(f"cannot write {self.path}: {e.strerror}",
                                   "check the cache directory (UCTR_CACHE)") from e
            self._hash.update(view[:written].tobytes())
            self.size += written
            self.progress(written)
            view = view[written:]

    def verified(self) -> bool:
        return self._hash.digest() == self.digest

    def restart(self) -> None:
        self._file.truncate(0)
        self.progress(-self.size)
        self.size, self.resumed = 0, False
        self._hash.reset()

    def discard(self) -> None:
        """Close and remove the file: what it holds must never be committed."""
        self.__exit__()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self.size:
            self.progress(-self.size)
        self.size = 0


class _Hasher:
    """sha256 of a stream of chunks, optionally computed on a helper thread.

    hashlib releases the GIL, so on a large blob hashing on another core overlaps receiving
    and writing: the download then costs about max(hash, receive+write) instead of the sum
    (hashing is the largest of the three here, ~1 GB/s). The bounded queue keeps memory flat
    when the network is faster than the hash.
    """

    def __init__(self, background: bool):
        self._background = background
        self._hash = hashlib.sha256()
        self._queue = None
        self._thread = None

    def update(self, chunk: bytes) -> None:
        if not self._background:
            self._hash.update(chunk)
            return
        if self._thread is None:
            self._queue = queue.Queue(maxsize=16)
            self._thread = threading.Thread(target=self._run, args=(self._hash, self._queue),
                                            name="uctr-sha256", daemon=True)
            self._thread.start()
        self._queue.put(chunk)

    @staticmethod
    def _run(hasher, chunks) -> None:
        for chunk in iter(chunks.get, None):
            hasher.update(chunk)

    def finish(self) -> None:
        """Wait until every chunk given so far is hashed."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = self._queue = None

    def digest(self) -> str:
        self.finish()
        return "sha256:" + self._hash.hexdigest()

    def reset(self) -> None:
        self.finish()
        self._hash = hashlib.sha256()


# -- helpers ---------------------------------------------------------------------------------------

_SLOW_HEADERS = "response headers arrived too slowly"


def _header_deadline(config: RegistryConfig) -> float:
    return config.connect_timeout + HEADER_DEADLINE * config.stall_timeout


def _deadline_pools(deadline: float) -> dict:
    """urllib3 pool classes whose connections must connect and receive the status line and
    headers of each response within DEADLINE seconds. A watchdog timer shuts the socket down
    when it passes: urllib3 and http.client only bound each single read, and http.client
    skips any number of "100 Continue" answers."""
    import socket
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ProtocolError

    class Watched:
        _uctr_sock = None
        _uctr_expired = False

        def _new_conn(self):
            self._uctr_sock = super()._new_conn()
            return self._uctr_sock

        def _uctr_abort(self) -> None:
            self._uctr_expired = True
            try:
                if self._uctr_sock is not None:
                    self._uctr_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _uctr_watch(self, step):
            self._uctr_expired = False
            timer = threading.Timer(deadline, self._uctr_abort)
            timer.daemon = True
            timer.start()
            try:
                result = step()
            except Exception:
                if self._uctr_expired:
                    raise ProtocolError(f"{_SLOW_HEADERS} (over {deadline:g} s)") from None
                raise
            finally:
                timer.cancel()
            if self._uctr_expired:  # headers cut short by the shutdown look complete
                raise ProtocolError(f"{_SLOW_HEADERS} (over {deadline:g} s)")
            return result

        def connect(self):
            return self._uctr_watch(super().connect)

        def getresponse(self, *args, **kwargs):
            return self._uctr_watch(lambda: super(Watched, self).getresponse(*args, **kwargs))

    class Conn(Watched, HTTPConnection):
        pass

    class TLSConn(Watched, HTTPSConnection):
        pass

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = TLSConn

    return {"http": Pool, "https": TLSPool}


def _adapter_factory(config: RegistryConfig):
    """A function making requests adapters that trust the system CAs plus config.ca_file,
    with a deadline on connecting and on each response's headers (_deadline_pools)."""
    from requests.adapters import HTTPAdapter

    pools = _deadline_pools(_header_deadline(config))

    class _WatchedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, *args, **kwargs):
            manager = super().proxy_manager_for(*args, **kwargs)
            manager.pool_classes_by_scheme = pools
            return manager

    pool = max(4, config.parallel + 2)
    if not config.ca_file:
        return lambda: _WatchedAdapter(pool_connections=4, pool_maxsize=pool, max_retries=0)
    import ssl

    try:
        context = ssl.create_default_context()
        context.load_verify_locations(cafile=config.ca_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the registry CA file: {config.ca_file}: {e}",
                          "give a PEM file of CA certificates with --tls-ca or UCTR_TLS_CA") from e

    class _CAAdapter(_WatchedAdapter):
        def init_poolmanager(self, *args, **kwargs):
            kwargs["ssl_context"] = context
            super().init_poolmanager(*args, **kwargs)

        def proxy_manager_for(self, *args, **kwargs):
            kwargs["ssl_context"] = context
            return super().proxy_manager_for(*args, **kwargs)

    return lambda: _CAAdapter(pool_connections=4, pool_maxsize=pool, max_retries=0)


def _tls_error(url: str, exc: Exception) -> TransferError:
    text = str(exc)
    host = url.split("/")[2]
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        reason = text.split("certificate verify failed:", 1)[-1].split("(_ssl")[0].strip(" )'\"")
        return TransferError(
            f"TLS certificate of {host} not trusted ({reason}): {url}",
            "give the registry's CA certificate with --tls-ca FILE (or UCTR_TLS_CA)")
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return TransferError(
            f"TLS handshake with {host} failed (it seems to speak plain HTTP): {url}",
            f"if that is intended, allow plain HTTP with --insecure-registry {host} "
            "(or UCTR_INSECURE_REGISTRIES)")
    return TransferError(f"TLS error with {host} ({text.splitlines()[0][:200]}): {url}",
                         "check the registry address and its certificate; a private CA is "
                         "given with --tls-ca FILE (or UCTR_TLS_CA)")


def _discard(resp) -> None:
    """Close a response not wanted; a small body is read first so the connection is reused
    (a new TLS handshake per 401 would cost more than reading a few bytes)."""
    try:
        if int(resp.headers.get("Content-Length", "-1")) in range(65536):
            resp.raw.read(65536, decode_content=False)
    except Exception:  # reusing the connection is only an optimisation
        pass
    resp.close()


def _with_auth(headers: Dict[str, str], authorization: Optional[str]) -> Dict[str, str]:
    if not authorization:
        return headers
    return dict(headers, Authorization=authorization)


def _parse_challenge(header: str) -> Optional[Tuple[str, Dict[str, str]]]:
    """'Bearer realm="...",service="...",scope="..."' -> ('bearer', {...}); None if unusable
    (also when it is longer than MAX_CHALLENGE: no real challenge is)."""
    if not isinstance(header, str) or len(header) > MAX_CHALLENGE:
        return None
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme, params


_DELTA_SECONDS = re.compile(r"[0-9]{1,12}\Z")


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After as seconds >= 0 (delta-seconds or an HTTP date); None when absent or
    unreadable (negative, huge, garbage). The caller caps it at RETRY_AFTER_CAP."""
    if not value or len(value) > 64:
        return None
    value = value.strip()
    if _DELTA_SECONDS.match(value):
        return float(value)
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError, AttributeError):
        return None


def _read_limited(resp, limit: int, what: str, deadline: Optional[float] = None) -> bytes:
    """The body of a JSON response, at most LIMIT bytes after decoding, complete by DEADLINE
    (time.monotonic()); RegistryError beyond the limit, _Retryable when cut short or late.
    Read in chunks from the raw stream: a Content-Length that lies, an endless chunked body or
    a gzip bomb cannot make it hold more than LIMIT (+ one chunk) in memory."""
    import urllib3

    import zlib

    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 32 if encoding != "deflate" else 0)
    elif encoding in ("identity", ""):
        decoder = None
    else:
        raise RegistryError(f"unsupported Content-Encoding {encoding[:40]!r}: {what}",
                            _BAD_DOCUMENT_HINT)
    parts, size = [], 0
    read = getattr(resp.raw, "read1", None) or resp.raw.read  # read1: what has arrived
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise _Retryable("response arrived too slowly", resp.url)
        try:
            chunk = read(65536, decode_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise _Retryable("connection failed while reading the response", resp.url) from e
        if decoder is not None:
            try:
                chunk = decoder.decompress(chunk, limit + 1 - size) if chunk else decoder.flush()
            except zlib.error as e:
                raise RegistryError(f"response is not valid {encoding}: {what}",
                                    _BAD_DOCUMENT_HINT) from e
        if chunk:
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                raise RegistryError(f"response larger than {limit} bytes: {what}",
                                    "the registry sent far more than any image document needs")
            continue
        # (a decoder never keeps input back here: it stops early only past the limit)
        return b"".join(parts)


def _error_codes(resp) -> Tuple[List[str], str]:
    """The registry's error codes and first message (Distribution API error body); anything
    malformed only loses the detail (the status still decides the error)."""
    try:
        body = resp.raw.read(MAX_ERROR_BODY, decode_content=False) if resp.raw else b""
    except Exception:  # the body only improves a message; a broken one must not hide the status
        body = b""
    try:
        doc = manifest.parse_document(body, MAX_ERROR_BODY)
        errors = manifest.check_list(manifest.check_object(doc, "error body").get("errors"),
                                     "errors", 100)
    except manifest.InvalidDocument:
        return [], _printable(body[:200].decode("utf-8", "replace"))
    codes = [e["code"] for e in errors if isinstance(e, dict) and isinstance(e.get("code"), str)]
    messages = [e["message"] for e in errors
                if isinstance(e, dict) and isinstance(e.get("message"), str)]
    return [c[:100] for c in codes], _printable(messages[0][:200] if messages else "")


def _printable(text: str) -> str:
    """Text from a server, fit for one line of a message: no control characters."""
    return "".join(c if c.isprintable() else "?" for c in text).strip()


def _token_response(body: bytes, realm: str) -> Tuple[str, float]:
    """(token, lifetime in seconds) from a token server's JSON answer (Docker token spec);
    RegistryError when it is malformed or carries no usable token."""
    try:
        doc = manifest.check_object(manifest.parse_document(body, MAX_TOKEN_RESPONSE),
                                    "token response")
        token = doc.get("token") or doc.get("access_token")
        if not token:
            raise manifest.InvalidDocument("token response has no token")
        manifest.check_string(token, "token", MAX_TOKEN)
        if not _TOKEN.match(token):
            raise manifest.InvalidDocument("token has characters not allowed in a header")
    except manifest.InvalidDocument as e:
        raise RegistryError(f"token server sent an unusable answer ({e}): {realm[:200]}",
                            "the registry's token service is misbehaving; try again later "
                            "or tell its operator") from None
    lifetime = doc.get("expires_in")
    if type(lifetime) not in (int, float) or not 0 < lifetime < float("inf"):
        lifetime = TOKEN_LIFETIME
    return token, min(float(lifetime), MAX_TOKEN_LIFETIME)


def _tag_list(body: bytes) -> List[str]:
    """The tags of a tag list answer; [] when it is malformed (it only improves a hint)."""
    try:
        doc = manifest.check_object(manifest.parse_document(body), "tag list")
        tags = manifest.check_strings(doc.get("tags"), "tags", 100000)
    except manifest.InvalidDocument:
        return []
    return [_printable(t[:128]) for t in tags]


def _media_type(content_type: str, data: bytes, what: str) -> str:
    media_type = content_type.split(";", 1)[0].strip().lower()
    known = manifest.INDEX_TYPES + manifest.MANIFEST_TYPES
    if media_type in known:
        return media_type
    try:
        doc = manifest.parse_document(data)
    except manifest.InvalidDocument as e:
        raise RegistryError(f"manifest is {e}: {what}", _BAD_DOCUMENT_HINT) from None
    declared = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(declared, str) and declared in known:
        return declared
    if isinstance(doc, dict) and doc.get("schemaVersion") == 1:
        raise RegistryError(f"image uses the obsolete Docker schema 1 manifest: {what}",
                            "push the image again with a current tool (schema 2 or OCI)")
    shown = declared if isinstance(declared, str) else media_type
    raise RegistryError(f"unsupported manifest type {_printable(shown[:100]) or 'unknown'}: {what}",
                        "uctr pulls OCI and Docker schema 2 images")


_BAD_DOCUMENT_HINT = ("the registry (or a mirror or proxy in between) served a malformed "
                      "document; push the image again or ask the registry's operator")


def _range_start(resp) -> Optional[int]:
    match = re.match(r"bytes ([0-9]{1,19})-[0-9]{1,19}/(?:[0-9]{1,19}|\*)",
                     resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _range_total(resp) -> Optional[int]:
    match = re.match(r"bytes \*/([0-9]{1,19})", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None
