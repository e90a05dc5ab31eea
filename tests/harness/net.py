"""Small network helpers shared by the harness servers."""

import socket
import ssl
import time
import urllib.error
import urllib.request
from typing import Optional


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (callers retry on a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, cafile: Optional[str] = None, timeout: float = 2.0) -> int:
    """Status code of GET url (4xx/5xx included); raises OSError when nothing answers."""
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def wait_until_answers(url: str, alive, cafile: Optional[str] = None,
                       timeout: float = 15.0) -> bool:
    """Poll URL until it answers with any HTTP status; False once alive() is false or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            http_status(url, cafile=cafile, timeout=1.0)
            return True
        except (OSError, ssl.SSLError):
            time.sleep(0.02)
    return False
