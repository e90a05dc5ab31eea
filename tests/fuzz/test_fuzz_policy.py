"""Property tests for the policy loader and validator (issue 10: fuzz harness).

What must hold for ANY input file: loading, checking, resolving and caching it raises
nothing but a UctrError (ConfigError, PolicyInvalid), within bounded memory (tracemalloc
peak, MEMORY_BOUND) and without hanging (a generous SIGALRM per example, HANG; nothing is
timed beyond detecting a hang).

Inputs: raw bytes, mutations of the seed corpus (tests/fuzz/corpus/policy/, also replayed
whole on every run), policy-shaped YAML built from the schema's own vocabulary, and the
hostile shapes: deep nesting (flow and block) and alias/merge-key expansion.

The budget is fixed: derandomize=True and max_examples per property, no example
database, so CI time and results are the same on every run (~10-20 s in all).
"""

import json
import os
import signal
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from uctr_batch.errors import UctrError
from uctr_batch.policy import load
from uctr_batch.policy.model import NodePolicy
from uctr_batch.policy.resolver import resolve

CORPUS = Path(__file__).resolve().parent / "corpus" / "policy"
SEEDS = sorted(CORPUS.iterdir())
HANG = 30  # seconds for one example: only a hang gets near this
MEMORY_BOUND = 256 << 20  # bytes allocated at peak for one example (the old loader: GiBs)

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))  # overridden per property below


@contextmanager
def bounded():
    """Fail on a hang (SIGALRM) or on a peak allocation beyond MEMORY_BOUND."""

    def hung(signum, frame):
        raise AssertionError(f"no answer within {HANG} s")

    # pytest-timeout (signal method) may have an alarm pending: give it back afterwards
    old = signal.signal(signal.SIGALRM, hung)
    pending = signal.alarm(HANG)
    started = time.monotonic()
    tracemalloc.start()
    try:
        yield
    finally:
        _current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        if pending:
            signal.alarm(max(1, pending - int(time.monotonic() - started)))
    assert peak < MEMORY_BOUND, f"peak allocation {peak >> 20} MiB"


def exercise(directory: Path, data: bytes) -> None:
    """Everything a policy file goes through: check, trusted-less load, resolve, cache."""
    path = directory / "policy.yaml"
    path.write_bytes(data)
    with bounded():
        try:
            problems, _policy, _notes = load.check_file(path)
            for p in problems:
                assert isinstance(str(p), str)
            if problems:  # load_policy would parse it again only to raise PolicyInvalid
                return
            policy = load.load_policy(path, require_trusted=False, env={})
            node = resolve(policy, node="n001", partition="batch", features=["gpu"], env={})
            data = json.loads(json.dumps(node.to_dict()))
            assert json.loads(json.dumps(NodePolicy.from_dict(data).to_dict())) == data
        except UctrError as e:
            assert e.message and "Traceback" not in e.message


@pytest.fixture
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-policy")


# -- the seed corpus, replayed whole ------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS, ids=[p.name for p in SEEDS])
def test_corpus(tmp_path, seed):
    exercise(tmp_path, seed.read_bytes())


# -- raw and mutated bytes ----------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(workdir, data):
    exercise(workdir, data)


@st.composite
def mutated_seed(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)).read_bytes()[:20000])
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate"]))
        chunk = draw(st.sampled_from([b"&a ", b"*a", b"<<: *a", b"[", b"{", b"]", b"}", b"\n  ",
                                      b": ", b"- ", b"!!str ", b"\x00", b"\xff", b"'", b"#",
                                      b"${UID}", b"${X}", b"\t", b"? ", b"---\n", b"..."]))
        if op == "insert":
            data[at:at] = chunk
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "replace":
            data[at:at + len(chunk)] = chunk
        else:
            end = min(len(data), at + draw(st.integers(1, 200)))
            data[at:at] = data[at:end] * draw(st.integers(1, 20))
    return bytes(data)


@settings(FUZZ, max_examples=30)
@given(data=mutated_seed())
def test_mutated_corpus(workdir, data):
    exercise(workdir, data)


# -- policy-shaped documents --------------------------------------------------------------

KEYS = ["version", "defaults", "classes", "mpi_profiles", "name", "match", "hostlist", "regex",
        "features", "partition", "modes", "user_modes", "binds", "src", "dst", "ro", "devices",
        "env", "set", "prepend", "append", "unset", "passthrough", "storage", "cache_dir",
        "local_dir", "local_quota", "stage_timeout", "registries", "allow", "deny", "mirrors",
        "insecure", "ca_file", "mpi", "profile", "fallback", "gpu", "vendor", "cuda_check",
        "munge", "pmix", "readonly_rootfs", "libs", "x"]
SCALARS = st.one_of(
    st.sampled_from(["N1", "R1", "P1", "P2", "F1", "S1", "auto", "none", "nvidia", "/opt/x",
                     "/scratch/${USER}", "${NOPE}", "n[001-010]", "n[", "(((", "20G", "9" * 40 + "P",
                     "1e999", "", "yes", "off", "docker.io", "https://m"]),
    st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.none(), st.text(max_size=20))
DOCUMENTS = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=6)),
    max_leaves=60)


@FUZZ
@given(body=st.dictionaries(st.sampled_from(KEYS), DOCUMENTS, max_size=6),
       version=st.sampled_from([1, 2, "1", None]), flow=st.booleans())
def test_policy_shaped_yaml(workdir, body, version, flow):
    doc = dict(body, version=version)
    text = yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=True)
    exercise(workdir, text.encode())


# -- hostile shapes: depth and aliases ----------------------------------------------------

@settings(FUZZ, max_examples=15)  # each deep parse costs ~0.25 s (PyYAML's simple-key scan)
@given(depth=st.integers(0, 3000), kind=st.sampled_from(["flow-list", "flow-map", "block-list",
                                                          "block-map", "mixed"]))
def test_deep_nesting(workdir, depth, kind):
    if kind == "flow-list":
        value = "[" * depth + "]" * depth
    elif kind == "flow-map":
        value = "{a: " * depth + "1" + "}" * depth
    elif kind == "mixed":
        value = "[{a: " * depth + "1" + "}]" * depth
    else:
        depth = min(depth, 600)  # block style costs indentation: ~depth**2/2 bytes
        item = "- " if kind == "block-list" else "k: "
        value = "\n" + "".join(" " * (i + 2) + item + "\n" for i in range(depth)) + " " * (depth + 2) + "x"
    exercise(workdir, f"version: 1\ndefaults: {value}\n".encode())


@FUZZ
@given(levels=st.integers(1, 30), width=st.integers(1, 12), merge=st.booleans(),
       tail=st.sampled_from(["", "defaults: *a{last}\n", "classes: [*a{last}]\n",
                             "defaults: {<<: *a{last}}\n"]))
def test_alias_expansion(workdir, levels, width, merge, tail):
    lines = ["version: 1", "x0: &a0 {k: [lol, lol]}"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * width)
        body = f"{{<<: [{refs}], v{i}: [{refs}]}}" if merge else f"[{refs}]"
        lines.append(f"x{i}: &a{i} {body}")
    text = "\n".join(lines) + "\n" + tail.replace("{last}", str(levels - 1))
    exercise(workdir, text.encode())


def test_bounds_are_what_the_docs_say():
    """The numbers the admin guide quotes (docs/admin.md, security model)."""
    assert load.MAX_FILE_BYTES == 1 << 20
    assert load.MAX_DEPTH == 64
    assert load.MAX_NODES == 50_000
    assert load.MAX_DROPINS == 64
    assert os.path.isdir(CORPUS) and len(SEEDS) >= 10
