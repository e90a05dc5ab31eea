"""Debian's docker-registry (distribution 2.8) on 127.0.0.1, one process per variant.

Variants: plain HTTP, TLS with a self-signed CA, token auth (tokenserver.TokenServer) and
Basic auth (bcrypt htpasswd). Storage and logs live in the variant's own work directory.
"""

import ctypes
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import List, Optional

from . import pki
from .net import free_port, wait_until_answers
from .tokenserver import TokenServer

USERNAME, PASSWORD = "uctr", "uctrpass"
_START_ATTEMPTS = 3  # a free port can be taken between probe and bind
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork


def _die_with_parent() -> None:
    """Runs in the child: a registry must not outlive a killed test session."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RegistryError(RuntimeError):
    pass


class Registry:
    """One docker-registry process. auth is None, "token" or "basic"."""

    def __init__(self, workdir: Path, tls: bool = False, auth: Optional[str] = None):
        if auth not in (None, "token", "basic"):
            raise ValueError(f"unknown auth kind {auth!r}")
        self.workdir = Path(workdir)
        self.tls, self.auth = tls, auth
        self.port: Optional[int] = None
        self.ca_file: Optional[str] = None
        self.cert_dir: Optional[str] = None  # holds ca.crt, the layout skopeo --cert-dir wants
        self.username = USERNAME if auth else None
        self.password = PASSWORD if auth else None
        self.token_server: Optional[TokenServer] = None
        self.log_file = self.workdir / "registry.log"
        self._proc: Optional[subprocess.Popen] = None

    # -- addresses -------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def storage_dir(self) -> Path:
        """The registry's filesystem storage (docker/registry/v2/...)."""
        return self.workdir / "storage"

    @property
    def insecure(self) -> bool:
        """True when clients must be told to use plain HTTP."""
        return not self.tls

    def __repr__(self) -> str:
        return f"Registry({self.url}, auth={self.auth})"

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> "Registry":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "storage").mkdir(exist_ok=True)
        if self.tls:
            self._make_tls_material()
        if self.auth == "token":
            self.token_server = TokenServer(self.workdir / "token").start()
        if self.auth == "basic":
            self._write_htpasswd()
        for _ in range(_START_ATTEMPTS):
            self.port = free_port()
            config = self.workdir / "config.yml"
            config.write_text(self._config())
            log = open(self.log_file, "ab")
            try:
                self._proc = subprocess.Popen(
                    ["docker-registry", "serve", str(config)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=_die_with_parent,
                )
            finally:
                log.close()
            if wait_until_answers(f"{self.url}/v2/", lambda: self._proc.poll() is None,
                                  cafile=self.ca_file):
                return self
            self._terminate()
        raise RegistryError(f"docker-registry did not start; log:\n{self.log_tail()}")

    def stop(self) -> None:
        self._terminate()
        if self.token_server is not None:
            self.token_server.stop()

    def _terminate(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> "Registry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- configuration ---------------------------------------------------------------------
    def _make_tls_material(self) -> None:
        # skopeo reads every *.crt/*.key in --cert-dir as client material: keep the server's
        # key elsewhere and give clients a directory holding only ca.crt.
        cert, key = pki.self_signed(self.workdir / "server-tls", "registry", "uctr-test-registry")
        cert_dir = self.workdir / "certs"
        cert_dir.mkdir(exist_ok=True)
        (cert_dir / "ca.crt").write_bytes(cert.read_bytes())  # self-signed: it is its own CA
        self._tls_cert, self._tls_key = cert, key
        self.ca_file, self.cert_dir = str(cert_dir / "ca.crt"), str(cert_dir)

    def _write_htpasswd(self) -> None:
        # distribution only accepts bcrypt entries.
        entry = subprocess.run(["htpasswd", "-Bbn", USERNAME, PASSWORD],
                               check=True, capture_output=True, text=True).stdout
        (self.workdir / "htpasswd").write_text(entry)

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.workdir / 'storage'}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}",
            f"  secret: {secrets.token_hex(16)}",
        ]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self._tls_cert}", f"    key: {self._tls_key}"]
        if self.auth == "token":
            ts = self.token_server
            lines += ["auth:", "  token:", f"    realm: {ts.realm}", f"    service: {ts.service}",
                      f"    issuer: {ts.issuer}", f"    rootcertbundle: {ts.cert}"]
        if self.auth == "basic":
            lines += ["auth:", "  htpasswd:", "    realm: uctr-test",
                      f"    path: {self.workdir / 'htpasswd'}"]
        return "\n".join(lines) + "\n"

    # -- observations ----------------------------------------------------------------------
    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _settle(self, quiet: float = 0.1, limit: float = 2.0) -> None:
        """Wait until the log has been still for QUIET seconds: the registry writes an access
        line just after the response, so a client may finish before its line exists."""
        deadline = time.monotonic() + limit
        time.sleep(quiet / 2)
        while time.monotonic() < deadline:
            try:
                idle = time.time() - self.log_file.stat().st_mtime
            except OSError:
                return
            if idle >= quiet:
                return
            time.sleep(quiet - idle)

    def access_log(self) -> List[str]:
        """Request lines ("GET /v2/... HTTP/1.1" status) from the registry's access log."""
        self._settle()
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return []
        return re.findall(r'"((?:GET|HEAD|PUT|POST|PATCH|DELETE) /v2/\S* HTTP/[\d.]+" \d{3})', text)

    def blob_gets(self, digest: str, status: Optional[int] = None) -> int:
        """How many GETs of blob DIGEST reached the registry (any repository; status filter)."""
        pattern = re.compile(r"GET /v2/\S+/blobs/" + re.escape(digest) + r' HTTP/[\d.]+" (\d{3})')
        count = 0
        for line in self.access_log():
            match = pattern.match(line)
            if match and (status is None or int(match.group(1)) == status):
                count += 1
        return count

    # -- client arguments ------------------------------------------------------------------
    def skopeo_args(self, side: str, creds: bool = True) -> List[str]:
        """skopeo flags to reach this registry as the "src" or "dest" side of a copy."""
        if self.insecure:
            args = [f"--{side}-tls-verify=false"]
        else:
            args = [f"--{side}-cert-dir", self.cert_dir]
        if creds and self.username:
            args += [f"--{side}-creds", f"{self.username}:{self.password}"]
        return args

    def curl_args(self) -> List[str]:
        return ["--cacert", self.ca_file] if self.ca_file else []
