"""Property tests for every reader of JSON (and header text) that comes from a registry or an
image archive: image index / manifest list, image manifest, image config, token response,
error body, tag list, docker-archive manifest.json, OCI index.json and oci-layout, the
Retry-After and WWW-Authenticate headers, and `uctr load` of a whole layout directory.

Properties: a reader returns a value its callers can use without further checks, or raises
the documented UctrError subclass (RegistryError for registries, ArchiveError for archives,
StorageError for cache records), never anything else; a document that passes the checks
never breaks the code that consumes it (platform selection, build_record). Inputs: random
JSON of odd shapes, valid documents with one field replaced, deleted or retyped, deep
nesting, huge numbers, bad digests and random bytes. Bounded work: every reader refuses
oversize input before parsing (asserted below), and nesting is refused past MAX_DEPTH.

Fixed budget: derandomize=True, bounded max_examples, no example database; the seed corpus
in corpus/registry/ (READER--NAME.json, crashers included) is replayed every run.
"""

import copy
import io
import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uctr_batch.errors import RegistryError, StorageError, UctrError
from uctr_batch.image import archive, platforms, pull, registry
from uctr_batch.image import manifest as mt
from uctr_batch.image.store import Store, build_record

CORPUS = Path(__file__).parent / "corpus" / "registry"
BUDGET = dict(deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
GOOD = "sha256:" + "a" * 64
WANTED = platforms.parse("linux/amd64")

INDEX = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
    {"mediaType": mt.OCI_MANIFEST, "digest": GOOD, "size": 10,
     "platform": {"os": "linux", "architecture": "amd64"},
     "annotations": {archive.OCI_REF_NAME: "1"}}]}
MANIFEST = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": mt.OCI_CONFIG, "digest": GOOD, "size": 100},
            "layers": [{"mediaType": mt.OCI_LAYER_GZIP, "digest": GOOD, "size": 5}]}
CONFIG = {"architecture": "amd64", "os": "linux",
          "rootfs": {"type": "layers", "diff_ids": [GOOD]},
          "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "Entrypoint": None,
                     "WorkingDir": "/", "User": "", "Labels": {"a": "b"}}}
TOKEN = {"token": "abc", "access_token": "abc", "expires_in": 300, "issued_at": "x"}
TAGS = {"name": "x", "tags": ["1", "2"]}
ERRORS = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no", "detail": {}}]}
DOCKER_MANIFEST = [{"Config": "c.json", "RepoTags": ["a/b:1"], "Layers": ["l/layer.tar"]}]
LAYOUT = {"imageLayoutVersion": "1.0.0"}


# -- the readers, each with what it may raise and what it must return --------------------------

def read_index(data):
    doc = pull._document(data, "image index", mt.check_index)
    try:
        chosen = platforms.select(doc["manifests"], WANTED, "x")
    except RegistryError:
        chosen = None
    platforms.available(doc["manifests"])
    if chosen is not None:
        assert mt.check_descriptor(chosen, "chosen", mt.MAX_CONFIG)


def read_manifest(data):
    doc = pull._document(data, "image manifest", mt.check_image_manifest)
    rec = build_record("example.org/a/b:1", GOOD, doc, {})  # must not raise: checked
    assert all(type(la.size) is int and la.size >= 0 for la in rec.layers)


def read_config(data):
    doc = pull._document(data, "image config", mt.check_image_config, mt.MAX_CONFIG)
    rec = build_record("example.org/a/b:1", GOOD, MANIFEST, doc)
    runtime = doc.get("config") or {}
    for key in ("Env", "Cmd", "Entrypoint"):
        assert all(isinstance(item, str) for item in runtime.get(key) or [])
    assert rec.platform is None or isinstance(rec.platform, str)


def read_token(data):
    token, lifetime = registry._token_response(data, "http://realm")
    assert isinstance(token, str) and token and "\n" not in token and "\r" not in token
    assert 0 < lifetime <= registry.MAX_TOKEN_LIFETIME


def read_tags(data):
    tags = registry._tag_list(data)
    assert all(isinstance(t, str) and t.isprintable() for t in tags)


class _Raw(io.BytesIO):
    def read(self, n=-1, decode_content=False):
        return super().read(n)


class _Response:
    def __init__(self, data):
        self.raw = _Raw(data)


def read_errors(data):
    codes, message = registry._error_codes(_Response(data))
    assert all(isinstance(c, str) for c in codes) and isinstance(message, str)
    assert message.isprintable()


def read_media_type(data):
    for content_type in ("", "text/plain", "application/json; charset=utf-8"):
        media_type = registry._media_type(content_type, data, "x")
        assert media_type in mt.INDEX_TYPES + mt.MANIFEST_TYPES


def read_docker_manifest(data):
    entries = archive.parse_checked(data, archive._check_docker_manifest, "manifest.json")
    for entry in entries:
        for name in [entry["Config"]] + entry["Layers"]:
            try:
                archive.safe_name(name, "x")
            except archive.ArchiveError:
                pass
        for tag in entry.get("RepoTags") or ():
            archive._canonical_tag(tag)


def read_oci_index(data):
    doc = archive.parse_checked(data, mt.check_index, "index.json")
    for entry in doc["manifests"]:
        (entry.get("annotations") or {}).get(archive.OCI_REF_NAME)


def read_oci_layout(data):
    archive.parse_checked(data, archive._check_layout, "oci-layout")


def read_retry_after(data):
    value = registry._retry_after(data.decode("utf-8", "replace"))
    assert value is None or (math.isfinite(value) and value >= 0)
    delay = registry.RegistryClient._delay(0, value)
    assert 0 <= delay <= max(registry.RETRY_AFTER_CAP, registry.BACKOFF_CAP * 1.5)


def read_challenge(data):
    parsed = registry._parse_challenge(data.decode("utf-8", "replace"))
    if parsed is not None:
        scheme, params = parsed
        assert scheme in ("bearer", "basic")
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())


# reader name -> (function, exceptions it may raise)
READERS = {
    "index": (read_index, RegistryError),
    "manifest": (read_manifest, RegistryError),
    "config": (read_config, RegistryError),
    "token": (read_token, RegistryError),
    "tags": (read_tags, ()),
    "errors": (read_errors, ()),
    "media-type": (read_media_type, RegistryError),
    "docker-manifest": (read_docker_manifest, archive.ArchiveError),
    "oci-index": (read_oci_index, archive.ArchiveError),
    "oci-layout": (read_oci_layout, archive.ArchiveError),
    "retry-after": (read_retry_after, ()),
    "challenge": (read_challenge, ()),
}
TEMPLATES = {
    "index": INDEX, "manifest": MANIFEST, "config": CONFIG, "token": TOKEN, "tags": TAGS,
    "errors": ERRORS, "media-type": MANIFEST, "docker-manifest": DOCKER_MANIFEST,
    "oci-index": INDEX, "oci-layout": LAYOUT,
}


def feed(reader: str, data: bytes) -> None:
    function, allowed = READERS[reader]
    try:
        function(data)
    except UctrError as e:
        assert allowed and isinstance(e, allowed), (reader, type(e).__name__, e)
        assert e.message and e.hint, (reader, e.message)
    # any other exception propagates and fails the test, with the input shown


@pytest.mark.parametrize("path", sorted(CORPUS.iterdir()), ids=lambda p: p.name)
def test_corpus(path):
    reader = path.name.split("--", 1)[0]
    assert reader in READERS, f"corpus file {path.name} names no reader"
    feed(reader, path.read_bytes())


@pytest.mark.parametrize("reader", sorted(READERS))
def test_oversize_input_is_refused_before_parsing(reader):
    """5 MiB of one valid JSON string: a reader must refuse it by size (or, for headers,
    ignore it) without building the document."""
    if reader in ("retry-after", "challenge"):
        feed(reader, b"x" * (5 << 20))
        return
    data = b'"' + b"x" * (9 << 20) + b'"'
    function, allowed = READERS[reader]
    try:
        function(data)
    except UctrError as e:
        assert "larger than" in e.message or not allowed, e.message


# -- strategies -------------------------------------------------------------------------------

leaves = st.one_of(
    st.none(), st.booleans(),
    st.integers(-2 ** 70, 2 ** 70), st.sampled_from([0, -1, 2 ** 63, 2 ** 64, 10 ** 30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from([GOOD, "sha256:", "sha256:" + "A" * 64, "sha512:" + "b" * 128,
                     "sha256:../../etc/passwd", "linux", "amd64", mt.OCI_MANIFEST, mt.OCI_INDEX,
                     "a\r\nb", "\u0000", "\udcff"]),
)
json_values = st.recursive(
    leaves,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(
                                   ["manifests", "layers", "config", "digest", "size",
                                    "mediaType", "platform", "os", "architecture", "variant",
                                    "annotations", "token", "expires_in", "tags", "errors",
                                    "code", "message", "Config", "Layers", "RepoTags", "rootfs",
                                    "diff_ids", "Env", "Cmd", "schemaVersion", "x"]) | st.text(
                                   max_size=8), children, max_size=5)),
    max_leaves=25,
)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, prefix + (i,))


@st.composite
def near_valid(draw, template):
    """TEMPLATE with one node replaced by odd JSON, deleted, or wrapped."""
    doc = copy.deepcopy(template)
    paths = list(_paths(doc))
    path = draw(st.sampled_from(paths))
    value = draw(json_values)
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    op = draw(st.sampled_from(["replace", "delete", "wrap", "duplicate"]))
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif op == "wrap":
        parent[last] = [parent[last]]
    elif isinstance(parent, list):
        parent.extend([parent[last]] * draw(st.integers(1, 3)))
    else:
        parent[last] = {"nested": parent[last]}
    return doc


def encode(doc, how: str) -> bytes:
    text = json.dumps(doc, allow_nan=True)
    return text.encode("utf-16") if how == "utf-16" else text.encode("utf-8", "surrogatepass")


deep_bytes = st.builds(
    lambda opener, depth, closed: opener * depth + (b"1" + b"]" * depth if closed else b""),
    st.sampled_from([b"[", b'{"a":', b'{"manifests":']), st.integers(20, 20000), st.booleans())
big_numbers = st.builds(lambda head, k, tail: head + b"1" + b"0" * k + tail,
                        st.sampled_from([b'{"size": ', b'{"expires_in": ', b"["]),
                        st.integers(10, 6000), st.sampled_from([b"}", b"]", b"e999}", b".5}"]))


def documents(reader):
    template = TEMPLATES.get(reader)
    sources = [st.binary(max_size=200), deep_bytes, big_numbers,
               st.builds(encode, json_values, st.sampled_from(["utf-8", "utf-16"]))]
    if template is not None:
        sources.append(st.builds(encode, near_valid(template),
                                 st.sampled_from(["utf-8", "utf-8", "utf-16"])))
        sources.append(st.builds(encode, near_valid(template), st.just("utf-8")))
    return st.one_of(sources)


headers = st.one_of(
    st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(lambda a, b: f"{a}, {b:02d} Jan {b * 397} 00:00:00 GMT".encode(),
              st.sampled_from(["Mon", "Xyz", ""]), st.integers(0, 99)),
    st.builds(lambda s, pairs: (s + " " + ",".join(f'{k}="{v}"' for k, v in pairs)).encode(
        "utf-8", "surrogatepass"),
        st.sampled_from(["Bearer", "Basic", "bearer", "Negotiate", ""]),
        st.lists(st.tuples(st.sampled_from(["realm", "service", "scope", "x", "é"]),
                           st.text(max_size=12)), max_size=4)),
    st.sampled_from([b"-1", b"1e9", b"\xb2", b"99999999999", b"+5", b" 5 ", b"5.5"]),
)


@pytest.mark.parametrize("reader", sorted(r for r in READERS if r not in ("retry-after",
                                                                          "challenge")))
@settings(max_examples=70, **BUDGET)
@given(data=st.data())
def test_documents(reader, data):
    feed(reader, data.draw(documents(reader)))


@pytest.mark.parametrize("reader", ["retry-after", "challenge"])
@settings(max_examples=100, **BUDGET)
@given(data=st.data())
def test_headers(reader, data):
    feed(reader, data.draw(headers))


# -- a whole `uctr load` of a layout directory with fuzzed documents ---------------------------

@settings(max_examples=40, **BUDGET)
@given(index=st.builds(encode, near_valid(INDEX), st.just("utf-8")),
       layout=st.one_of(st.none(), st.builds(encode, near_valid(LAYOUT), st.just("utf-8"))))
def test_load_oci_layout_with_fuzzed_index(tmp_path_factory, index, layout):
    base = tmp_path_factory.mktemp("oci")
    (base / "index.json").write_bytes(index)
    if layout is not None:
        (base / "oci-layout").write_bytes(layout)
    (base / "blobs" / "sha256").mkdir(parents=True)
    (base / "blobs" / "sha256" / GOOD.split(":")[1]).write_bytes(json.dumps(MANIFEST).encode())
    try:
        archive.load(str(base), Store(base / "cache"), platform=WANTED)
    except UctrError as e:
        assert e.message
        assert isinstance(e, (archive.ArchiveError, RegistryError, StorageError)) or \
            type(e).__name__ in ("ImageNotFound", "ReferenceError_"), type(e)


@settings(max_examples=40, **BUDGET)
@given(entries=st.builds(encode, near_valid(DOCKER_MANIFEST), st.just("utf-8")),
       config=st.builds(encode, near_valid(CONFIG), st.just("utf-8")))
def test_load_docker_archive_dir_with_fuzzed_documents(tmp_path_factory, entries, config):
    base = tmp_path_factory.mktemp("docker")
    (base / "manifest.json").write_bytes(entries)
    (base / "c.json").write_bytes(config)
    (base / "l").mkdir()
    (base / "l" / "layer.tar").write_bytes(b"\0" * 1024)
    try:
        archive.load(str(base), Store(base / "cache"), platform=WANTED)
    except UctrError as e:
        assert e.message
    assert not [n for n in os.listdir(base / "cache" / "tmp") if not n.startswith("pull-")]


@pytest.mark.parametrize("field, value", [
    ("Env", ["PATH=/bin", "A=x\u0000y"]),
    ("Cmd", ["sh", "\ud800"]),
    ("Entrypoint", ["/bin/\u0000sh"]),
    ("WorkingDir", "/w\u0000rk"),
    ("User", "\udfff"),
])
def test_a_config_string_no_process_can_hold_is_refused_at_pull(field, value):
    # a NUL or a lone surrogate passed the pull and broke every mode later (rt1)
    doc = {"architecture": "amd64", "os": "linux", "config": {field: value},
           "rootfs": {"type": "layers", "diff_ids": []}}
    data = json.dumps(doc).encode()
    with pytest.raises(RegistryError, match=f"config.{field}.*(NUL|surrogate)"):
        pull._document(data, "image config", mt.check_image_config, mt.MAX_CONFIG)
