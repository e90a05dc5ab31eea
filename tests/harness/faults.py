"""FaultProxy: a loopback HTTP proxy in front of a plain-HTTP registry that injects faults.

Each request is matched against the rules in the order they were added; the first live rule
whose method and path regex match decides what happens. A rule fires `times` times (None:
forever). Without a matching rule the request is passed through unchanged, Range included.

    proxy.fail(r"/blobs/", status=500, times=2)      # 500 twice, then pass through
    proxy.rate_limit(r"/blobs/", retry_after=1)      # 429 with Retry-After: 1, once
    proxy.truncate(r"/blobs/", after=1000)           # headers + 1000 bytes, then close
    proxy.corrupt(r"/blobs/")                        # full length, some bytes flipped
    proxy.stall(r"/blobs/", after=100, seconds=30)   # headers + 100 bytes, then silence
    proxy.ignore_range(r"/blobs/")                   # drop Range: the registry sends 200 + all

proxy.requests records (method, path, status, range, bytes_sent, fault) for every request; a
request is recorded as soon as its status is known (bytes_sent is filled in when the body is
done, -1 when the client hung up).
"""

import http.client
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

from .net import free_port

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade"}
CHUNK = 64 * 1024


@dataclass
class Rule:
    path: str
    action: str  # status | truncate | corrupt | stall | ignore_range
    method: Optional[str] = "GET"
    times: Optional[int] = 1
    status: int = 500
    retry_after: Optional[int] = None
    after: int = 0  # bytes of body sent before truncating / stalling; first flipped byte
    seconds: float = 0.0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if self.method is not None and self.method != method:
            return False
        return re.search(self.path, path) is not None


@dataclass
class Request:
    method: str
    path: str
    status: int
    range: Optional[str]
    bytes_sent: int
    fault: Optional[str]


class FaultProxy:
    """Proxy on 127.0.0.1:<free port> forwarding to UPSTREAM ("127.0.0.1:PORT", plain HTTP)."""

    def __init__(self, upstream: str, bind_host: str = "127.0.0.1"):
        self.upstream = upstream
        self.bind_host = bind_host  # the Slurm cluster's nodes reach the bridge address only
        self.rules: List[Rule] = []
        self.requests: List[Request] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: Optional[ThreadingHTTPServer] = None

    # -- addresses and life cycle ----------------------------------------------------------
    @property
    def host(self) -> str:
        return f"{self.bind_host}:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> "FaultProxy":
        handler = type("FaultHandler", (_ProxyHandler,), {"proxy": self})
        self._server = _QuietServer((self.bind_host, free_port()), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         name="uctr-test-faultproxy").start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes stalled responses
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def rewrite(self, ref: str) -> str:
        """The same reference with the upstream registry's host swapped for the proxy's."""
        if not ref.startswith(self.upstream + "/"):
            raise ValueError(f"{ref} is not on {self.upstream}")
        return self.host + ref[len(self.upstream):]

    # -- rules -----------------------------------------------------------------------------
    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def fail(self, path: str, status: int = 500, times: Optional[int] = 1,
             method: Optional[str] = "GET") -> Rule:
        return self.add(Rule(path, "status", method, times, status=status))

    def rate_limit(self, path: str, retry_after: int = 1, times: Optional[int] = 1,
                   method: Optional[str] = "GET") -> Rule:
        return self.add(Rule(path, "status", method, times, status=429, retry_after=retry_after))

    def truncate(self, path: str, after: int, times: Optional[int] = 1) -> Rule:
        return self.add(Rule(path, "truncate", "GET", times, after=after))

    def corrupt(self, path: str, times: Optional[int] = 1, at: int = 0) -> Rule:
        return self.add(Rule(path, "corrupt", "GET", times, after=at))

    def stall(self, path: str, after: int = 0, seconds: float = 60.0,
              times: Optional[int] = 1) -> Rule:
        return self.add(Rule(path, "stall", "GET", times, after=after, seconds=seconds))

    def ignore_range(self, path: str, times: Optional[int] = None) -> Rule:
        return self.add(Rule(path, "ignore_range", "GET", times))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.requests.clear()

    def _take_rule(self, method: str, path: str) -> Optional[Rule]:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.fired += 1
                    return rule
        return None

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    # -- assertions helpers ----------------------------------------------------------------
    def matching(self, path: str, method: Optional[str] = "GET") -> List[Request]:
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and re.search(path, r.path)]

    def count(self, path: str, method: Optional[str] = "GET") -> int:
        return len(self.matching(path, method))

    def blob_gets(self, digest: str) -> int:
        return self.count(r"/blobs/" + re.escape(digest) + r"$")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients hanging up on a faulty response is the point of the exercise


class _ProxyHandler(BaseHTTPRequestHandler):
    proxy: FaultProxy  # set on the subclass made in FaultProxy.start
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def _dispatch(self):
        rule = self.proxy._take_rule(self.command, self.path.split("?", 1)[0])
        record = Request(self.command, self.path, 0, self.headers.get("Range"), 0,
                         None if rule is None else rule.action)
        if rule is not None and rule.action == "status":
            record.status, record.fault = rule.status, f"status:{rule.status}"
            self.proxy._record(record)  # before replying: a test may look as soon as it reads
            record.bytes_sent = self._send_status(rule)
            return
        self._forward(rule, record)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _dispatch

    def _send_status(self, rule: Rule) -> int:
        body = b'{"errors":[{"code":"UNKNOWN","message":"injected by the test fault proxy"}]}'
        self.send_response(rule.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if rule.retry_after is not None:
            self.send_header("Retry-After", str(rule.retry_after))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return len(body)

    def _read_request_body(self) -> Optional[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length else None

    def _forward(self, rule: Optional[Rule], record: Request) -> None:
        body = self._read_request_body()
        drop = HOP_BY_HOP | {"content-length"}
        if rule is not None and rule.action == "ignore_range":
            drop = drop | {"range"}
        upstream = http.client.HTTPConnection(self.proxy.upstream, timeout=60)
        try:
            # Headers go one by one: clients repeat Accept, and the Host the client used is
            # kept so the registry's Location headers point back at the proxy.
            upstream.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
            for key, value in self.headers.items():
                if key.lower() not in drop:
                    upstream.putheader(key, value)
            if body is not None:
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            record.status = response.status
            self.proxy._record(record)
            record.bytes_sent = self._relay(response, rule)
        finally:
            upstream.close()

    def _relay(self, response: http.client.HTTPResponse, rule: Optional[Rule]) -> int:
        """Send the upstream response back, applying a body fault; return body bytes sent."""
        length = response.getheader("Content-Length")
        data = None
        if length is None:  # chunked upstream: buffer it so the client gets a Content-Length
            data = response.read()
            length = str(len(data))
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command == "HEAD":
            return 0
        try:
            return self._send_body(response, data, rule)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (stall timeout)
            self.close_connection = True
            return -1

    def _send_body(self, response, data: Optional[bytes], rule: Optional[Rule]) -> int:
        action = rule.action if rule else None
        limit = rule.after if action in ("truncate", "stall") else None
        sent = 0
        chunks = iter([data]) if data is not None else iter(lambda: response.read(CHUNK), b"")
        for chunk in chunks:
            if action == "corrupt" and sent <= rule.after < sent + len(chunk):
                i = rule.after - sent
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
            if limit is not None and sent + len(chunk) >= limit:
                chunk = chunk[:limit - sent]
                self.wfile.write(chunk)
                sent += len(chunk)
                break
            self.wfile.write(chunk)
            sent += len(chunk)
        if limit is not None:
            self.wfile.flush()
            if action == "stall":
                self.proxy._stopping.wait(rule.seconds)
            self.close_connection = True  # the client sees a short body
        return sent
