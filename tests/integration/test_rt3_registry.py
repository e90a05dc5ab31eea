"""A hostile registry, second pass (red team rt3): slow or endless response headers and
malformed redirects. Each is a documented error with a hint within a bounded time, never a
hang or a traceback.

The socket timeout (UCTR_STALL_TIMEOUT) bounds one read only: a server that sends one byte
of its status line or headers per read, or "HTTP/1.1 100 Continue" answers without end,
used to hold a pull forever. Connecting and the headers of each response now have a
deadline of connect timeout + 2 stall timeouts."""

import itertools

import pytest

from tests.harness.fakeregistry import FakeRegistry, raw, respond
from uctr_batch import settings
from uctr_batch.errors import TransferError
from uctr_batch.image import platforms, pull
from uctr_batch.image import reference as references
from uctr_batch.image.store import Store

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def fake():
    with FakeRegistry() as registry:
        yield registry


def do_pull(fake, tmp_path):
    # deadline for connect + headers: 1 + 2 * 0.5 = 2 s
    cfg = settings.RegistryConfig(insecure=(fake.host,), retries=0, stall_timeout=0.5,
                                  connect_timeout=1.0)
    return pull.pull_image(references.parse(f"{fake.host}/img:1"), cfg,
                           Store(tmp_path / "cache"), platforms.parse("linux/amd64"))


def header_trickle():
    yield b"HTTP/1.1 200 OK\r\nX-Slow: ", 0
    for _ in range(100000):
        yield b"a", 0.1  # each byte well within the 0.5 s socket timeout


def status_trickle():
    for _ in range(100000):
        yield b"H", 0.1


def continue_flood():
    for _ in itertools.count():
        yield b"HTTP/1.1 100 Continue\r\n\r\n", 0


def continue_trickle():
    for _ in itertools.count():
        yield b"HTTP/1.1 100 Continue\r\nX: y\r\n\r\n", 0.1


SLOW = [("header-trickle", header_trickle), ("status-trickle", status_trickle),
        ("100-continue-flood", continue_flood), ("100-continue-trickle", continue_trickle)]


@pytest.mark.parametrize("name,pieces", SLOW, ids=[c[0] for c in SLOW])
def test_slow_or_endless_manifest_headers_hit_the_header_deadline(fake, tmp_path, name, pieces):
    fake.route("GET", r"/manifests/1$", raw(pieces))
    with pytest.raises(TransferError, match="response headers did not arrive") as info:
        do_pull(fake, tmp_path)
    assert info.value.hint


def test_slow_blob_headers_hit_the_header_deadline(fake, tmp_path):
    doc = fake.image(layers=(b"q" * 100,))
    fake.route("GET", rf"/blobs/{doc['layers'][0]['digest']}$", raw(header_trickle))
    with pytest.raises(TransferError, match="response headers did not arrive") as info:
        do_pull(fake, tmp_path)
    assert info.value.hint


def test_slow_token_server_headers_hit_the_header_deadline(fake, tmp_path):
    challenge = f'Bearer realm="http://{fake.host}/token",service="fake"'
    fake.route("GET", r"^/v2/img/", respond(401, b"{}", {"WWW-Authenticate": challenge}))
    fake.route("GET", r"^/token", raw(status_trickle))
    with pytest.raises(TransferError, match="response headers did not arrive"):
        do_pull(fake, tmp_path)


def test_a_normal_pull_still_works_through_the_watched_connections(fake, tmp_path):
    fake.image(layers=(b"a" * 5000, b"b" * 70000))
    rec = do_pull(fake, tmp_path)
    assert len(rec.layers) == 2


@pytest.mark.parametrize("location", ["http://[::1/x", "http://127.0.0.1:99999999/x",
                                      "http://\udcff/x", "http://a b/x"])
def test_malformed_redirect_location_is_a_transfer_error(fake, tmp_path, location):
    fake.route("GET", r"/manifests/1$", respond(302, b"", {"Location": location}, None))
    with pytest.raises(TransferError) as info:
        do_pull(fake, tmp_path)
    assert info.value.hint


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x",
                                      "gopher://127.0.0.1:1/x"])
def test_redirect_to_another_scheme_is_refused(fake, tmp_path, location):
    fake.route("GET", r"/manifests/1$", respond(302, b"", {"Location": location}, None))
    with pytest.raises(TransferError, match="No connection adapters") as info:
        do_pull(fake, tmp_path)
    assert info.value.hint
