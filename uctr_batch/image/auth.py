"""Registry credentials: where they are read from, and `uctr login` / `uctr logout`.

Sources, first match wins:
1. uctr's own file, ``settings.default_config_dir()/auth.json``, written by ``uctr login``.
   Same shape as Docker's (``{"auths": {"HOST": {"auth": base64("user:password")}}}``),
   mode 0600 in a 0700 directory, replaced atomically.
2. Docker's ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``), ``auths``
   entries with a base64 ``auth`` field or ``username``/``password``; keys may be
   ``https://index.docker.io/v1/``, ``HOST`` or ``https://HOST[/path]``. Credential helpers
   (``credsStore``/``credHelpers``) are not run. uctr never writes this file.

Hosts are compared after normalisation: scheme and path dropped, Docker Hub's names
(index.docker.io, registry-1.docker.io, docker.io) all mean docker.io.
"""

import base64
import binascii
import contextlib
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

from uctr_batch import log, settings
from uctr_batch.errors import ConfigError, UsageError

_log = log.get("auth")

AUTH_FILE = "auth.json"
_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")
_MAX_FILE = 1 << 20  # a credentials file bigger than this is not one


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str = field(default="", compare=False)  # file it came from, for messages

    def encoded(self) -> str:
        """base64 of "user:password": Docker's ``auth`` field and the Basic token."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")

    def basic_authorization(self) -> str:
        return "Basic " + self.encoded()


def normalize_host(text: str) -> str:
    """'https://index.docker.io/v1/' -> 'docker.io'; 'http://h:5000/x' -> 'h:5000'."""
    host = text.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0].lower()
    return "docker.io" if host in _HUB_NAMES else host


def uctr_auth_file() -> Path:
    return settings.default_config_dir() / AUTH_FILE


def docker_config_file() -> Path:
    # DOCKER_CONFIG is Docker's own variable, read here as Docker reads it.
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def lookup(registry: str) -> Optional[Credentials]:
    """Credentials for REGISTRY (host[:port] or URL), or None for anonymous access."""
    host = normalize_host(registry)
    own = uctr_auth_file()
    _warn_if_exposed(own)
    for path in (own, docker_config_file()):
        for key, entry in _read_auths(path).items():
            if normalize_host(key) == host:
                creds = _decode_entry(entry, path, key)
                if creds is not None:
                    _log.debug("using credentials for %s from %s", host, path)
                    return creds
    return None


def _warn_if_exposed(path: Path) -> None:
    """Still use a readable credentials file (refusing would break pulls), but say so."""
    try:
        _check_private(path, is_dir=False)
    except ConfigError as e:
        _log.warning("%s (%s)", e.message, e.hint)


def _read_auths(path: Path) -> Dict[str, dict]:
    """The ``auths`` map of a config file; {} if absent. Unreadable or bad files warn."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE)
    except FileNotFoundError:
        return {}
    except OSError as e:
        _log.warning("cannot read credentials file %s: %s", path, e.strerror)
        return {}
    from uctr_batch.image.manifest import InvalidDocument, parse_document

    try:
        auths = parse_document(data or b"{}", _MAX_FILE).get("auths", {})
    except (InvalidDocument, AttributeError):  # bad JSON, too deep, or not an object
        _log.warning("ignoring credentials file %s: not a JSON object", path)
        return {}
    return auths if isinstance(auths, dict) else {}


def _decode_entry(entry, path: Path, key: str) -> Optional[Credentials]:
    if not isinstance(entry, dict):
        return None
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"], validate=True).decode()
            user, sep, password = decoded.partition(":")
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
            user, sep, password = "", "", ""
        if sep and user:
            return Credentials(user, password, str(path))
        _log.warning("ignoring entry %r in %s: 'auth' is not base64 of user:password", key, path)
        return None
    if entry.get("username") and "password" in entry:
        return Credentials(str(entry["username"]), str(entry["password"]), str(path))
    return None


# -- uctr's own credentials file ------------------------------------------------------------

def save(registry: str, creds: Credentials) -> Path:
    """Record CREDS for REGISTRY in uctr's auth.json (0600, atomic); return the file's path."""
    host = normalize_host(registry)
    with _locked_store() as (path, auths):
        auths[host] = {"auth": creds.encoded()}
        _write_auths(path, auths)
    return path


def remove(registry: str) -> bool:
    """Forget REGISTRY in uctr's auth.json; False when it had no entry."""
    host = normalize_host(registry)
    path = uctr_auth_file()
    if not any(normalize_host(k) == host for k in _read_auths(path)):
        return False
    with _locked_store() as (path, auths):
        for key in [k for k in auths if normalize_host(k) == host]:
            del auths[key]
        _write_auths(path, auths)
    return True


@contextlib.contextmanager
def _locked_store() -> Iterator[Tuple[Path, Dict[str, dict]]]:
    """(path, auths) of uctr's auth file, checked safe, held under a lock for an update."""
    from uctr_batch.image.lock import FileLock

    path = uctr_auth_file()
    _ensure_private_dir(path.parent)
    _check_private(path, is_dir=False)
    with FileLock(str(path) + ".lock", timeout=30.0, what="credentials file"):
        yield path, _read_auths(path)


def _ensure_private_dir(directory: Path) -> None:
    if not os.path.lexists(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
    _check_private(directory, is_dir=True)


def _check_private(path: Path, is_dir: bool) -> None:
    """Refuse a file or directory others could read or replace: wrong owner, mode or a symlink."""
    try:
        st = os.stat(path) if is_dir else os.lstat(path)
    except FileNotFoundError:
        return
    kind = "directory" if is_dir else "file"
    fix = "chmod 700" if is_dir else "chmod 600"
    if not is_dir and not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"credentials file is not a regular file: {path}",
                          "remove it; `uctr login` writes a new one")
    if is_dir and not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"credentials directory is not a directory: {path}",
                          "remove it or set UCTR_CONFIG_DIR to a private directory")
    if st.st_uid != os.getuid():
        raise ConfigError(f"credentials {kind} is owned by uid {st.st_uid}, not by you: {path}",
                          "use a directory of your own (UCTR_CONFIG_DIR) or remove this one")
    if st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        raise ConfigError(
            f"credentials {kind} is accessible to other users (mode {mode:04o}): {path}",
            f"run: {fix} {path}")


def _write_auths(path: Path, auths: Dict[str, dict]) -> None:
    """Replace PATH atomically with a 0600 file: a reader sees the old or the new content."""
    from uctr_batch import fsutil

    data = json.dumps({"auths": auths}, indent=1, sort_keys=True) + "\n"
    fsutil.write_atomic(path, data.encode(), 0o600, fsync=True)


# -- commands ----------------------------------------------------------------------------------

def cmd_login(args) -> int:
    """uctr login REGISTRY [-u USER] [-p PASS | --password-stdin]: verify, then save."""
    from uctr_batch.image.registry import RegistryClient

    registry = normalize_host(args.registry)
    username, password = _ask_credentials(args, registry)
    creds = Credentials(username, password)
    client = RegistryClient(registry, settings.registry_config(args), credentials=creds)
    if not client.verify_credentials():
        _log.warning("%s did not ask for credentials; saving them unverified", registry)
    path = save(registry, creds)
    _log.info("logged in to %s as %s (credentials in %s)", registry, username, path)
    return 0


def cmd_logout(args) -> int:
    registry = normalize_host(args.registry)
    if remove(registry):
        _log.info("removed credentials for %s from %s", registry, uctr_auth_file())
        return 0
    if any(normalize_host(k) == registry for k in _read_auths(docker_config_file())):
        _log.warning("credentials for %s come from %s, which uctr does not modify",
                     registry, docker_config_file())
    else:
        _log.info("not logged in to %s", registry)
    return 0


def _ask_credentials(args, registry: str) -> Tuple[str, str]:
    username = args.username
    interactive = sys.stdin.isatty()
    if not username:
        if not interactive:
            raise UsageError(f"no username given for {registry}",
                             f"run: uctr login -u USER {registry}")
        sys.stderr.write(f"Username for {registry}: ")
        sys.stderr.flush()
        username = sys.stdin.readline().strip()
    if args.password_stdin:
        if args.password:
            raise UsageError("--password and --password-stdin are mutually exclusive",
                             "pipe the password into --password-stdin")
        password = sys.stdin.read().rstrip("\r\n")
    elif args.password:
        password = args.password
        _log.warning("a password on the command line is visible to other users; "
                     "use --password-stdin")
    elif interactive:
        import getpass

        password = getpass.getpass(f"Password for {username}@{registry}: ")
    else:
        raise UsageError(
            f"no password given for {registry}",
            f"run: echo PASSWORD | uctr login -u {username} --password-stdin {registry}")
    if not username or not password:
        raise UsageError(f"empty username or password for {registry}",
                         f"run: uctr login -u USER --password-stdin {registry}")
    return username, password

