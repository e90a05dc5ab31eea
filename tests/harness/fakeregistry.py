"""FakeRegistry: a tiny loopback HTTP server that answers Distribution API paths with whatever
a test scripts, malformed documents included (the real registry refuses to store those).

    with FakeRegistry() as fake:
        fake.image(manifest_doc, config_doc, layers=[b"..."])  # a pullable image "img:1"
        fake.route("GET", r"/manifests/1$", json_body({"manifests": "oops"}, INDEX))
        pull_image(parse(f"{fake.host}/img:1"), ...)

A route's responder gets the BaseHTTPRequestHandler and writes the whole answer; helpers
make the usual ones. Routes added later win over earlier ones (so a test can override the
image() defaults). Every request is recorded in fake.requests as (method, path).
"""

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterable, List, Optional, Tuple

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"

Responder = Callable[[BaseHTTPRequestHandler], None]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def encode(doc) -> bytes:
    return doc if isinstance(doc, bytes) else json.dumps(doc).encode()


def respond(status: int = 200, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
            content_type: Optional[str] = "application/json") -> Responder:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        if content_type:
            h.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
    return answer


def json_body(doc, media_type: str = MANIFEST, status: int = 200,
              headers: Optional[Dict[str, str]] = None) -> Responder:
    data = encode(doc)
    extra = {"Docker-Content-Digest": digest(data), **(headers or {})}
    return respond(status, data, extra, media_type)


def gzip_bomb(media_type: str = MANIFEST, size: int = 32 << 20) -> Responder:
    """A small gzip body that inflates to SIZE bytes of spaces (valid JSON whitespace)."""
    return respond(200, _big_bomb(size), {"Content-Encoding": "gzip"}, media_type)


def _big_bomb(size: int) -> bytes:
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b" " * (1 << 20)
    parts = [comp.compress(block) for _ in range(size >> 20)]
    parts.append(comp.flush())
    return b"".join(parts)


def endless_chunked(media_type: str = MANIFEST, chunk: bytes = b" " * 65536,
                    limit: int = 64 << 20) -> Responder:
    """Transfer-Encoding: chunked with no end (stops after LIMIT bytes or a hang-up)."""
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", media_type)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        sent = 0
        try:
            while sent < limit:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:
            pass
        h.close_connection = True
    return answer


def trickle(body: bytes, media_type: str = MANIFEST, interval: float = 0.2,
            limit: float = 30.0) -> Responder:
    """One byte every INTERVAL seconds (each read is quick: no stall timeout fires)."""
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", media_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        end = time.monotonic() + limit
        try:
            for i in range(len(body)):
                if time.monotonic() > end:
                    break
                h.wfile.write(body[i:i + 1])
                h.wfile.flush()
                time.sleep(interval)
        except OSError:
            pass
        h.close_connection = True
    return answer


def raw(pieces: Callable[[], Iterable[Tuple[bytes, float]]], limit: float = 60.0) -> Responder:
    """Write the bytes of pieces() as they come, each followed by its pause in seconds: no
    status line or header is added, so a test can send broken or endless ones. Stops after
    LIMIT seconds or when the client hangs up."""
    def answer(h: BaseHTTPRequestHandler) -> None:
        end = time.monotonic() + limit
        try:
            for piece, pause in pieces():
                if time.monotonic() > end:
                    break
                h.wfile.write(piece)
                h.wfile.flush()
                if pause:
                    time.sleep(pause)
        except OSError:
            pass
        h.close_connection = True
    return answer


class FakeRegistry:
    def __init__(self):
        self.routes: List[Tuple[str, "re.Pattern", Responder]] = []
        self.requests: List[Tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self.route("GET", r"^/v2/$", respond(200, b"{}"))

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def route(self, method: str, path: str, responder: Responder) -> None:
        with self._lock:
            self.routes.insert(0, (method, re.compile(path), responder))

    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for _, p in self.requests if re.search(path, p))

    def image(self, repo: str = "img", tag: str = "1", layers=(b"layer-bytes",),
              config: Optional[dict] = None, manifest: Optional[dict] = None) -> dict:
        """Serve a pullable single-platform image; returns its manifest (for tweaking)."""
        config_bytes = encode(config if config is not None else {
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digest(b) for b in layers]}})
        self.blob(repo, config_bytes)
        for layer in layers:
            self.blob(repo, layer)
        doc = manifest or {
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": digest(config_bytes),
                       "size": len(config_bytes)},
            "layers": [{"mediaType": LAYER, "digest": digest(b), "size": len(b)}
                       for b in layers]}
        self.manifest(repo, tag, doc)
        return doc

    def manifest(self, repo: str, reference: str, doc, media_type: str = MANIFEST) -> str:
        data = encode(doc)
        responder = json_body(data, media_type)
        self.route("GET", rf"^/v2/{repo}/manifests/{re.escape(reference)}$", responder)
        self.route("GET", rf"^/v2/{repo}/manifests/{digest(data)}$", responder)
        return digest(data)

    def blob(self, repo: str, data: bytes) -> str:
        self.route("GET", rf"^/v2/{repo}/blobs/{digest(data)}$",
                   respond(200, data, content_type="application/octet-stream"))
        return digest(data)

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> "FakeRegistry":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with fake._lock:
                    fake.requests.append((self.command, self.path))
                    routes = list(fake.routes)
                for method, pattern, responder in routes:
                    if method == self.command and pattern.search(path):
                        responder(self)
                        return
                respond(404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"no"}]}')(self)

            do_HEAD = do_GET

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client hanging up mid-body is what some tests do

        self._server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True,
                         name="fake-registry").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeRegistry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
