"""Property tests for the image reference parser (uctr_batch/image/reference.py).

Properties: parse() returns an ImageRef or raises ReferenceError_ with a hint (nothing else);
a parsed reference prints canonically and parses back to itself; its on-disk name is one
safe path component; inputs of any length are refused or accepted in bounded work (the
parser checks the length first, and its regexes have no nested ambiguous repeats: the
long adversarial inputs below would take minutes if they backtracked).

Fixed budget: derandomize=True, bounded max_examples, no example database; the seed corpus
in corpus/reference/ (one reference per file, crashers included) is replayed every run.
"""

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uctr_batch.errors import ReferenceError_
from uctr_batch.image import reference as references

CORPUS = Path(__file__).parent / "corpus" / "reference"
BUDGET = dict(deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(text):
    """The property every input must satisfy; returns the ImageRef or None."""
    try:
        ref = references.parse(text)
    except ReferenceError_ as e:
        assert e.message and e.hint, (text[:80], e.message)
        return None
    printed = str(ref)
    again = references.parse(printed)
    assert again == ref, (text[:80], printed[:80])
    assert str(again) == printed
    name = ref.for_path()
    assert name and "/" not in name and "\0" not in name and name not in (".", "..")
    assert len(name.encode("utf-8", "surrogateescape")) <= 255
    if ref.is_registry:
        assert ref.registry and ref.repository and (ref.tag or ref.digest)
        assert len(ref.registry) + 1 + len(ref.repository) <= references.MAX_NAME
    return ref


def seeds():
    return sorted(CORPUS.iterdir())


@pytest.mark.parametrize("path", seeds(), ids=lambda p: p.name)
def test_corpus(path):
    check(path.read_bytes().decode("utf-8", "surrogateescape"))


# -- strategies -------------------------------------------------------------------------------

_ALNUM = string.ascii_lowercase + string.digits
component = st.from_regex(r"[a-z0-9]{1,8}(?:(?:[._]|__|-{1,3})[a-z0-9]{1,8}){0,3}",
                          fullmatch=True)
label = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?", fullmatch=True)
host = st.one_of(
    st.builds(lambda labels: ".".join(labels), st.lists(label, min_size=2, max_size=4)),
    st.just("localhost"),
    st.just("[::1]"),
    st.just("127.0.0.1"),
)
registry = st.one_of(host, st.builds("{}:{}".format, host, st.integers(1, 65535)))
tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
digest = st.builds(lambda h: "sha256:" + h, st.text("0123456789abcdef", min_size=64,
                                                   max_size=64))


@st.composite
def valid_docker(draw):
    parts = draw(st.lists(component, min_size=1, max_size=4))
    text = "/".join(parts)
    if draw(st.booleans()) or "." in parts[0] or parts[0] == "localhost":
        text = f"{draw(registry)}/{text}"  # (a first component with '.' names a registry)
    if draw(st.booleans()):
        text += ":" + draw(tag)
    if draw(st.booleans()):
        text += "@" + draw(digest)
    if draw(st.booleans()):
        text = "docker://" + text
    return text


@st.composite
def valid_path_ref(draw):
    path = draw(st.text(string.ascii_letters + string.digits + "/._-", min_size=1, max_size=40))
    transport = draw(st.sampled_from(["oci", "oci-archive", "docker-archive"]))
    text = f"{transport}:{path}"
    if transport == "docker-archive":
        if draw(st.booleans()):
            text += ":" + draw(valid_docker()).replace("docker://", "").split("@")[0]
    elif draw(st.booleans()):
        text += ":" + draw(tag)
    return text


@st.composite
def valid_enroot(draw):
    """enroot's [USER@][REGISTRY#]IMAGE[:TAG] (registry: any host name, dots or not)."""
    text = "/".join(draw(st.lists(component, min_size=1, max_size=3)))
    text = f"{draw(st.one_of(registry, label))}#{text}"
    if draw(st.booleans()):
        text += ":" + draw(tag)
    if draw(st.booleans()):
        text = draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True)) + "@" + text
    if draw(st.booleans()):
        text = "docker://" + text
    return text


SPECIAL = ":/@._-[]\0 \n\tABZaz09+%#?\\\u00e9\u0130\udcff"


@st.composite
def mutated(draw):
    """A seed or a valid reference with a few characters inserted, deleted or replaced."""
    base = draw(st.one_of(valid_docker(), valid_path_ref(), valid_enroot(),
                          st.sampled_from([p.read_text("utf-8", "surrogateescape")[:200]
                                           for p in seeds()])))
    chars = list(base)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(chars)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        ch = draw(st.sampled_from(SPECIAL))
        if op == "insert" or not chars:
            chars.insert(at, ch)
        elif op == "delete":
            del chars[min(at, len(chars) - 1)]
        else:
            chars[min(at, len(chars) - 1)] = ch
    return "".join(chars)


# Patterns that make backtracking regexes explode, repeated to thousands of characters.
ADVERSARIAL = ["a-", "a_", "a__", "a.", "a-a.", "-", "a:", "9", "[:", "a/", "@", "sha256:a",
               "a" * 7 + ".", "\u00e9"]


@st.composite
def long_inputs(draw):
    unit = draw(st.sampled_from(ADVERSARIAL))
    count = draw(st.integers(100, 6000))
    prefix = draw(st.sampled_from(["", "x/", "a.b/", "localhost:5000/", "oci:", "docker://",
                                   "docker-archive:f:", "u@r#", "nvcr.io#", "squashfs:"]))
    suffix = draw(st.sampled_from(["", "!", "-", "/", ":", "@", ":-", "/A"]))
    return prefix + unit * count + suffix


# -- properties -------------------------------------------------------------------------------

@settings(max_examples=200, **BUDGET)
@given(valid_docker())
def test_valid_docker_references_round_trip(text):
    ref = check(text)
    if ref is None:  # only the length rule may refuse a well-formed name
        assert len(text) > 200
        return
    assert ref.transport == references.DOCKER


@settings(max_examples=150, **BUDGET)
@given(valid_enroot())
def test_enroot_references_round_trip(text):
    ref = check(text)
    if ref is None:  # only the length rule may refuse a well-formed name
        assert len(text) > 200
        return
    registry = text.replace("docker://", "").split("#")[0].split("@")[-1]
    assert ref.transport == references.DOCKER and ref.registry == registry


@settings(max_examples=150, **BUDGET)
@given(valid_path_ref())
def test_path_references_round_trip(text):
    check(text)


@settings(max_examples=300, **BUDGET)
@given(st.text(max_size=120))
def test_any_text_parses_or_is_a_reference_error(text):
    check(text)


@settings(max_examples=200, **BUDGET)
@given(mutated())
def test_mutated_references(text):
    check(text)


@settings(max_examples=60, **BUDGET)
@given(long_inputs())
def test_long_adversarial_inputs_are_bounded(text):
    check(text)


def test_over_long_input_is_refused_before_any_regex():
    with pytest.raises(ReferenceError_, match="too long"):
        references.parse("a" * (references.MAX_REFERENCE + 1))
