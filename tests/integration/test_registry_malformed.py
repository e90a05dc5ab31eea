"""Malformed and hostile answers from a registry: every one is a RegistryError (exit 4) or
another documented UctrError with a hint, never a traceback, a hang or unbounded memory.

The real registry refuses to store broken documents, so a scripted loopback server
(tests/harness/fakeregistry.py) serves them."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.fakeregistry import (
    CONFIG, INDEX, MANIFEST, FakeRegistry, digest, encode, endless_chunked, gzip_bomb,
    json_body, respond, trickle,
)
from uctr_batch import settings
from uctr_batch.errors import (AuthError, DigestMismatch, RegistryError, TransferError,
                               UctrError)
from uctr_batch.image import platforms, pull
from uctr_batch.image import reference as references
from uctr_batch.image.store import Store

REPO = Path(__file__).resolve().parents[2]
GOOD = "sha256:" + "a" * 64
PLATFORM = {"os": "linux", "architecture": "amd64"}


@pytest.fixture
def fake():
    with FakeRegistry() as registry:
        yield registry


def do_pull(fake, tmp_path, ref="img:1", **config):
    config.setdefault("retries", 0)
    cfg = settings.RegistryConfig(insecure=(fake.host,), **config)
    store = Store(tmp_path / "cache")
    return pull.pull_image(references.parse(f"{fake.host}/{ref}"), cfg, store,
                           platforms.parse("linux/amd64"))


def index(*entries, **extra):
    return {"schemaVersion": 2, "mediaType": INDEX, "manifests": list(entries), **extra}


def entry(**fields):
    return {"mediaType": MANIFEST, "digest": GOOD, "size": 10, "platform": PLATFORM, **fields}


def nested(depth: int) -> dict:
    doc: dict = {}
    for _ in range(depth):
        doc = {"a": doc}
    return doc


def deep_bytes(prefix: bytes, depth: int, suffix: bytes = b"") -> bytes:
    """PREFIX + DEPTH nested objects + SUFFIX (json.dumps itself cannot write them)."""
    return prefix + b'{"a":' * depth + b"{}" + b"}" * depth + suffix


# (name, document served as an index at img:1, expected words in the error)
BAD_INDEXES = [
    ("manifests-not-list", index() | {"manifests": "oops"}, "manifests is not a list"),
    ("entries-not-objects", index(1, 2), "manifests[0] is not a JSON object"),
    ("bad-digest", index(entry(digest="sha256:../../etc/passwd")), "not a valid digest"),
    ("digest-int", index(entry(digest=5)), "not a valid digest"),
    ("negative-size", index(entry(size=-1)), "is negative"),
    ("float-size", index(entry(size=1e30)), "not an integer"),
    ("bool-size", index(entry(size=True)), "not an integer"),
    ("huge-size", index(entry(size=10 ** 40)), "allowed"),
    ("missing-size", index({"mediaType": MANIFEST, "digest": GOOD, "platform": PLATFORM}),
     "size is not an integer"),
    ("platform-list", index(entry(platform=["linux"])), "platform is not a JSON object"),
    ("platform-os-int", index(entry(platform={"os": 1, "architecture": "amd64"})),
     "platform.os is not a string"),
    ("media-type-int", index(entry(mediaType=7)), "not a media type"),
    ("annotations-values", index(entry(annotations={"a": [1]})), "is not a string"),
    ("deep", deep_bytes(b'{"manifests": [], "x": ', 5000, b"}"), "nested deeper"),
    ("deep-but-parseable", index(entry(x=nested(200))), "nested deeper"),
    ("top-level-list", [entry()], "is not a JSON object"),
    ("not-json", b"{\"manifests\": [", "not valid JSON"),
    ("nan", b'{"manifests": [], "x": NaN}', "not valid JSON"),
    ("huge-int", b'{"manifests": [], "x": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ("schema-version", index(entry()) | {"schemaVersion": "2"}, "schemaVersion"),
    ("too-many-entries", index(*[entry()] * 1001), "entries"),
    ("too-large", index(entry(annotations={"a": "x" * (5 << 20)})), "larger than"),
]


@pytest.mark.parametrize("name,doc,words", BAD_INDEXES, ids=[c[0] for c in BAD_INDEXES])
def test_malformed_index(fake, tmp_path, name, doc, words):
    fake.route("GET", r"/manifests/1$", json_body(doc, INDEX))
    with pytest.raises(RegistryError) as info:
        do_pull(fake, tmp_path)
    assert words in str(info.value) and info.value.hint
    assert not os.listdir(tmp_path / "cache" / "refs")
    assert not os.listdir(tmp_path / "cache" / "blobs" / "sha256")  # the index was not kept


def manifest(**fields):
    config = encode({"os": "linux", "architecture": "amd64"})
    doc = {"schemaVersion": 2, "mediaType": MANIFEST,
           "config": {"mediaType": CONFIG, "digest": digest(config), "size": len(config)},
           "layers": []}
    doc.update(fields)
    return doc


BAD_MANIFESTS = [
    ("no-config", {k: v for k, v in manifest().items() if k != "config"},
     "config is not a JSON object"),
    ("config-no-size", manifest(config={"mediaType": CONFIG, "digest": GOOD}),
     "config.size is not an integer"),
    ("config-too-big", manifest(config={"mediaType": CONFIG, "digest": GOOD, "size": 1 << 40}),
     "allowed"),
    ("layers-object", manifest(layers={"a": 1}), "layers is not a list"),
    ("layer-digest", manifest(layers=[{"mediaType": "a/b", "digest": "sha256:x", "size": 1}]),
     "layers[0].digest"),
    ("layer-size-string", manifest(layers=[{"mediaType": "a/b", "digest": GOOD, "size": "1"}]),
     "not an integer"),
    ("layer-size-2^63", manifest(layers=[{"mediaType": "a/b", "digest": GOOD, "size": 2 ** 63}]),
     "allowed"),
    ("too-many-layers", manifest(layers=[{"digest": GOOD, "size": 1}] * 1001), "entries"),
    ("schema-1-as-v2", manifest(schemaVersion=1), "schemaVersion"),
]


@pytest.mark.parametrize("name,doc,words", BAD_MANIFESTS, ids=[c[0] for c in BAD_MANIFESTS])
def test_malformed_manifest(fake, tmp_path, name, doc, words):
    fake.route("GET", r"/manifests/1$", json_body(doc, MANIFEST))
    with pytest.raises(RegistryError) as info:
        do_pull(fake, tmp_path)
    assert words in str(info.value) and info.value.hint


def test_malformed_manifest_behind_a_good_index(fake, tmp_path):
    bad = encode(manifest(layers="none"))
    fake.route("GET", rf"/manifests/{digest(bad)}$", json_body(bad, MANIFEST))
    fake.route("GET", r"/manifests/1$",
               json_body(index(entry(digest=digest(bad), size=len(bad))), INDEX))
    with pytest.raises(RegistryError, match="layers is not a list"):
        do_pull(fake, tmp_path)


BAD_CONFIGS = [
    ("list", [1, 2], "config is not a JSON object"),
    ("env-string", {"config": {"Env": "PATH=/bin"}}, "config.config.Env is not a list"),
    ("cmd-ints", {"config": {"Cmd": [1]}}, "config.config.Cmd[0] is not a string"),
    ("workdir-list", {"config": {"WorkingDir": ["/"]}}, "WorkingDir is not a string"),
    ("labels", {"config": {"Labels": {"a": 1}}}, "is not a string"),
    ("diff-ids", {"rootfs": {"diff_ids": ["x"]}}, "diff_ids[0] is not a valid digest"),
    ("os-int", {"os": 1}, "config.os is not a string"),
    ("deep", {"history": [nested(100)]}, "nested deeper"),
]


@pytest.mark.parametrize("name,doc,words", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_malformed_config(fake, tmp_path, name, doc, words):
    fake.image(config=doc)
    with pytest.raises(RegistryError) as info:
        do_pull(fake, tmp_path)
    assert words in str(info.value) and info.value.hint
    assert not os.listdir(tmp_path / "cache" / "refs")


def test_a_good_image_from_the_fake_registry_pulls(fake, tmp_path):
    """The fake is faithful enough that the cases above fail for their one defect."""
    fake.image(layers=(b"one", b"two"))
    rec = do_pull(fake, tmp_path)
    assert [la.size for la in rec.layers] == [3, 3]


# -- transport: bodies without end, bombs, slow servers, redirects, headers ---------------------

def test_endless_chunked_manifest_stops_at_the_cap(fake, tmp_path):
    fake.route("GET", r"/manifests/1$", endless_chunked())
    with pytest.raises(RegistryError, match="larger than 4194304 bytes") as info:
        do_pull(fake, tmp_path)
    assert info.value.hint


def test_gzip_bomb_manifest_stops_at_the_cap(fake, tmp_path):
    fake.route("GET", r"/manifests/1$", gzip_bomb(MANIFEST))
    with pytest.raises(RegistryError, match="larger than 4194304 bytes"):
        do_pull(fake, tmp_path)


def test_unknown_content_encoding_is_refused(fake, tmp_path):
    fake.route("GET", r"/manifests/1$",
               respond(200, b"xx", {"Content-Encoding": "br"}, MANIFEST))
    with pytest.raises(RegistryError, match="Content-Encoding") as info:
        do_pull(fake, tmp_path)
    assert info.value.hint


def test_trickling_manifest_hits_the_document_deadline(fake, tmp_path):
    """One byte every 0.05 s never trips the 0.2 s stall timeout; the deadline does."""
    fake.route("GET", r"/manifests/1$", trickle(encode(manifest()) + b" " * 400, interval=0.05))
    with pytest.raises(TransferError, match="too slowly") as info:
        do_pull(fake, tmp_path, stall_timeout=0.2)
    assert info.value.hint


def test_trickling_blob_counts_as_stalled_and_keeps_its_prefix(fake, tmp_path):
    """A byte every 0.05 s never trips the 0.3 s socket timeout; the trickle rule does."""
    doc = fake.image(layers=(b"y" * 1000,))
    layer = doc["layers"][0]["digest"]
    fake.route("GET", rf"/blobs/{layer}$", trickle(b"y" * 1000, "application/octet-stream",
                                                   interval=0.05, limit=20))
    with pytest.raises(TransferError, match="stalled: fewer than") as info:
        do_pull(fake, tmp_path, stall_timeout=0.3)
    assert info.value.hint
    partial = tmp_path / "cache" / "tmp" / (layer.split(":")[1] + ".partial")
    assert 0 < partial.stat().st_size < 1000  # kept for the next run to resume


def test_huge_content_range_is_not_a_traceback(fake, tmp_path):
    doc = fake.image(layers=(b"z" * 1000,))
    layer = doc["layers"][0]["digest"]
    partial = tmp_path / "cache" / "tmp" / (layer.split(":")[1] + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"z" * 10)  # a resume: the client sends Range, reads Content-Range
    fake.route("GET", rf"/blobs/{layer}$",
               respond(206, b"z" * 990, {"Content-Range": "bytes " + "9" * 5000 + "-1/1000"},
                       "application/octet-stream"))
    with pytest.raises(TransferError, match="resumed at byte None"):
        do_pull(fake, tmp_path)


def test_blob_larger_than_its_descriptor_stops_at_its_size(fake, tmp_path):
    doc = fake.image(layers=(b"x" * 1000,))
    layer = doc["layers"][0]["digest"]
    fake.route("GET", rf"/blobs/{layer}$",
               respond(200, b"x" * (8 << 20), content_type="application/octet-stream"))
    with pytest.raises(DigestMismatch):
        do_pull(fake, tmp_path)
    partial = tmp_path / "cache" / "tmp" / (layer.split(":")[1] + ".partial")
    assert not partial.exists() or partial.stat().st_size <= 1000
    assert not (tmp_path / "cache" / "blobs" / "sha256" / layer.split(":")[1]).exists()


def test_gzip_encoded_blob_is_hashed_as_sent_not_inflated(fake, tmp_path):
    """We ask for identity; a server that gzips anyway sends other bytes: a mismatch, and
    never a decompression bomb in memory."""
    doc = fake.image(layers=(b"x" * 1000,))
    layer = doc["layers"][0]["digest"]
    fake.route("GET", rf"/blobs/{layer}$", gzip_bomb("application/octet-stream", 64 << 20))
    with pytest.raises(DigestMismatch):
        do_pull(fake, tmp_path)


def test_redirect_loop_is_a_transfer_error(fake, tmp_path):
    fake.route("GET", r"/manifests/1$",
               respond(302, b"", {"Location": f"/v2/img/manifests/1"}, None))
    with pytest.raises(TransferError, match="redirect") as info:
        do_pull(fake, tmp_path)
    assert info.value.hint


def test_too_many_headers_is_a_transfer_error(fake, tmp_path):
    headers = {f"X-Junk-{i}": "y" for i in range(150)}
    fake.route("GET", r"/manifests/1$", respond(200, b"{}", headers, MANIFEST))
    with pytest.raises(TransferError):
        do_pull(fake, tmp_path)


def test_error_body_nested_deeply_still_gives_the_status(fake, tmp_path):
    body = b'{"errors": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    fake.route("GET", r"/manifests/1$", respond(404, body[:65536]))
    with pytest.raises(RegistryError, match="not found"):
        do_pull(fake, tmp_path)


def test_tag_list_malformed_keeps_the_missing_tag_error(fake, tmp_path):
    fake.route("GET", r"/manifests/1$",
               respond(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"x"}]}'))
    fake.route("GET", r"/tags/list$", respond(200, b'{"tags": {"a": ' * 50 + b"1"))
    with pytest.raises(RegistryError, match="tag or digest not found") as info:
        do_pull(fake, tmp_path)
    assert info.value.hint == "check the tag or digest"


def test_tag_list_hint_lists_only_strings(fake, tmp_path):
    fake.route("GET", r"/manifests/1$",
               respond(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"x"}]}'))
    fake.route("GET", r"/tags/list$", respond(200, b'{"tags": ["2", "3\\u001b[31m"]}'))
    with pytest.raises(RegistryError) as info:
        do_pull(fake, tmp_path)
    assert "\x1b" not in info.value.hint and "2" in info.value.hint


# -- token service ------------------------------------------------------------------------------

def with_token_service(fake, answer, realm=None):
    realm = realm or f"http://{fake.host}/token"
    challenge = f'Bearer realm="{realm}",service="fake"'
    fake.route("GET", r"^/v2/img/", respond(401, b"{}", {"WWW-Authenticate": challenge}))
    fake.route("GET", r"^/token", answer)


BAD_TOKENS = [
    ("token-int", {"token": 5}, "is not a string"),
    ("token-header-injection", {"token": "a\r\nX-Evil: 1"}, "not allowed in a header"),
    ("no-token", {"expires_in": 60}, "has no token"),
    ("list", [1], "is not a JSON object"),
    ("deep", deep_bytes(b"", 3000), "nested deeper"),
    ("huge", {"token": "x" * (2 << 20)}, "larger than"),
    ("long-token", {"token": "x" * 70000}, "longer than"),
]


@pytest.mark.parametrize("name,doc,words", BAD_TOKENS, ids=[c[0] for c in BAD_TOKENS])
def test_malformed_token_response(fake, tmp_path, name, doc, words):
    with_token_service(fake, json_body(doc, "application/json"))
    with pytest.raises(RegistryError) as info:
        do_pull(fake, tmp_path)
    assert words in str(info.value) and info.value.hint


@pytest.mark.parametrize("expires_in", [-1, 0, 1e308, "soon", None, True, 10 ** 30])
def test_odd_token_lifetimes_still_work(fake, tmp_path, expires_in):
    """A usable token with an unusable lifetime gets the default lifetime."""
    fake.image()
    good = {"token": "t0k3n", "expires_in": expires_in}
    with_token_service(fake, json_body(good, "application/json"))
    # the fake answers 401 to every /v2/img/ request, so the pull ends in an AuthError:
    # what matters is that the token was parsed and sent (no TypeError/OverflowError)
    with pytest.raises(AuthError):
        do_pull(fake, tmp_path)
    assert fake.count(r"^/token") >= 1


def test_huge_www_authenticate_is_not_a_usable_challenge(fake, tmp_path):
    challenge = 'Bearer realm="http://x/token",' + "a=b," * 5000
    fake.route("GET", r"^/v2/img/", respond(401, b"{}", {"WWW-Authenticate": challenge}))
    with pytest.raises(AuthError, match="without a usable WWW-Authenticate") as info:
        do_pull(fake, tmp_path)
    assert info.value.hint


# -- through the CLI: error + hint + exit 4, no traceback -------------------------------------

def test_cli_malformed_index_is_exit_4_with_a_hint(fake, tmp_path):
    fake.route("GET", r"/manifests/1$", json_body(index() | {"manifests": [[]]}, INDEX))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "PYTHONPATH": str(REPO), "UCTR_CACHE": str(tmp_path / "cache"),
           "UCTR_CONFIG_DIR": str(tmp_path / "config"), "UCTR_INSECURE_REGISTRIES": fake.host,
           "UCTR_RETRIES": "0"}
    result = subprocess.run([sys.executable, "-m", "uctr_batch", "pull", f"{fake.host}/img:1"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: malformed image index") and lines[1].startswith("hint: ")
