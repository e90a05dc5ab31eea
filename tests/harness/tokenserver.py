"""A small token server following the Docker registry token spec, for the token-auth registry.

GET /token?service=S&scope=repository:NAME:pull,push[&scope=...] with optional Basic auth
answers {"token", "access_token", "expires_in", "issued_at"}: an RS256 JWT whose header
carries the signing certificate in x5c, which distribution verifies against the registry's
`rootcertbundle`. Anonymous callers get pull only; known users get what they ask for
(pull/push/delete); a wrong password gets 401. POST /token (OAuth2 password grant) is
answered the same way.
"""

import base64
import json
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import pki
from .net import free_port

SERVICE = "uctr-registry"
ISSUER = "uctr-test-token-issuer"
GRANTABLE = ("pull", "push", "delete", "*")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def parse_scope(scope: str) -> Optional[Tuple[str, str, List[str]]]:
    """'repository:a/b:pull,push' -> ('repository', 'a/b', ['pull', 'push']).

    The name may itself hold a ':' (registry:port), so split the type off the front and the
    actions off the back.
    """
    try:
        kind, rest = scope.split(":", 1)
        name, actions = rest.rsplit(":", 1)
    except ValueError:
        return None
    return kind, name, [a for a in actions.split(",") if a]


class TokenServer:
    """Token issuer on 127.0.0.1:<free port>; records every grant in .issued."""

    def __init__(self, workdir: Path, users: Optional[Dict[str, str]] = None,
                 service: str = SERVICE, issuer: str = ISSUER, lifetime: int = 300):
        self.workdir = Path(workdir)
        self.users = dict(users if users is not None else {"uctr": "uctrpass"})
        self.service, self.issuer, self.lifetime = service, issuer, lifetime
        self.cert, self.key = pki.self_signed(self.workdir, "token-signer",
                                              "uctr-test-token-signer")
        self._x5c = base64.b64encode(pki.der_certificate(self.cert)).decode("ascii")
        self.issued: List[dict] = []  # {"account", "scopes", "access"} per token handed out
        self.refused = 0
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def realm(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/token"

    def start(self) -> "TokenServer":
        handler = type("TokenHandler", (_TokenHandler,), {"issuer_state": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="uctr-test-tokenserver")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def authenticate(self, header: Optional[str]) -> Tuple[bool, Optional[str]]:
        """(ok, account): no header is an anonymous success; a bad Basic credential fails."""
        if not header:
            return True, None
        if not header.lower().startswith("basic "):
            return False, None
        try:
            user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        if self.users.get(user) == password and user:
            return True, user
        return False, None

    def grant(self, account: Optional[str], scopes: List[str]) -> List[dict]:
        access = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None or parsed[0] != "repository":
                continue
            kind, name, wanted = parsed
            allowed = [a for a in wanted if a in GRANTABLE]
            if account is None:
                allowed = [a for a in allowed if a == "pull"]
            access.append({"type": kind, "name": name, "actions": allowed})
        return access

    def token(self, account: Optional[str], scopes: List[str]) -> dict:
        now = int(time.time())
        access = self.grant(account, scopes)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer, "sub": account or "", "aud": self.service,
            "exp": now + self.lifetime, "nbf": now - 10, "iat": now,
            "jti": uuid.uuid4().hex, "access": access,
        }
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode())).encode("ascii")
        signature = pki.rs256_sign(self.key, signing_input)
        jwt = signing_input.decode("ascii") + "." + _b64url(signature)
        self.issued.append({"account": account, "scopes": list(scopes), "access": access})
        issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return {"token": jwt, "access_token": jwt, "expires_in": self.lifetime,
                "issued_at": issued_at}


class _TokenHandler(BaseHTTPRequestHandler):
    issuer_state: TokenServer  # set on the subclass made in TokenServer.start
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict, extra: Optional[Dict[str, str]] = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _issue(self, params: Dict[str, List[str]], auth_header: Optional[str]) -> None:
        state = self.issuer_state
        if urllib.parse.urlsplit(self.path).path != "/token":
            self._reply(404, {"errors": [{"code": "NOT_FOUND"}]})
            return
        ok, account = state.authenticate(auth_header)
        if not ok:
            state.refused += 1
            self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                        {"WWW-Authenticate": 'Basic realm="uctr-test-token"'})
            return
        scopes = [s for value in params.get("scope", []) for s in value.split(" ") if s]
        self._reply(200, state.token(account, scopes))

    def do_GET(self):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        self._issue(query, self.headers.get("Authorization"))

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        auth = self.headers.get("Authorization")
        if form.get("grant_type") == ["password"]:
            creds = f"{form.get('username', [''])[0]}:{form.get('password', [''])[0]}"
            auth = "Basic " + base64.b64encode(creds.encode()).decode()
        self._issue(form, auth)
