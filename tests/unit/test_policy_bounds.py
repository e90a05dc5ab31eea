"""Issue 10, class 8: a policy file costs bounded time and memory, whatever it holds.

Each hostile file goes through the real CLI in a subprocess under RLIMIT_AS (1 GiB) and a
generous timeout that only detects hangs: `uctr policy check FILE` (no trust needed) and
`UCTR_POLICY=FILE uctr policy explain` (the loader every command uses, trust enforced; the
files live in root-owned private temp dirs, so as root they are trusted and really read).
Every run must end with `error:` + `hint:` naming the file, exit 1, and no traceback.
"""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from uctr_batch.errors import ConfigError, EXIT_USER
from uctr_batch.policy import load, paths

REPO = Path(__file__).resolve().parents[2]
MEMORY_LIMIT = 1 << 30  # RLIMIT_AS of the child: the old loader needed many GiB here
HANG = 60  # seconds; a bounded run takes one or two


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def uctr(*args, env=None):
    full = dict(os.environ, PYTHONPATH=str(REPO), HOME=os.environ.get("HOME", "/root"))
    full.pop("UCTR_POLICY", None)
    full.update(env or {})
    try:
        return subprocess.run([sys.executable, "-m", "uctr_batch", *args], env=full,
                              capture_output=True, text=True, timeout=HANG,
                              preexec_fn=_limit_memory, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"uctr {' '.join(args)} hung for {HANG} s")


def assert_clean_error(proc, path):
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "MemoryError" not in proc.stderr, proc.stderr
    assert proc.returncode == EXIT_USER, proc.stderr
    assert "error:" in proc.stderr and str(path) in proc.stderr, proc.stderr
    assert "hint:" in proc.stderr, proc.stderr


# -- hostile files -------------------------------------------------------------------------

def laughs(levels=9, width=9):
    """The classic billion laughs: 9 levels of 9 aliases each, ~400 bytes, 9**9 strings."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i-1}"] * width) + "]")
    return "version: 1\n" + "\n".join(lines) + "\n"


def merge_laughs(levels=40):
    """`<<:` merge keys: PyYAML's constructor copies merged pairs, doubling at each level."""
    lines = ["m0: &m0 {k0: 1, k1: 2}"]
    for i in range(1, levels):
        lines.append(f"m{i}: &m{i} {{<<: [*m{i-1}, *m{i-1}], x{i}: [*m{i-1}, *m{i-1}]}}")
    return "version: 1\n" + "\n".join(lines) + "\n"


def deep_alias_chain(levels=200):
    """Each alias small, but chained: depth grows by one level per alias."""
    lines = ["d0: &d0 [x]"]
    for i in range(1, levels):
        lines.append(f"d{i}: &d{i} [*d{i-1}]")
    return "version: 1\n" + "\n".join(lines) + "\n"


TEXTS = {
    "billion-laughs": laughs(),
    "laughs-in-a-mapping": "version: 1\n" + laughs().replace("version: 1\n", "defaults:\n  env: {set: {}}\nx:\n  ")
    .replace("\na", "\n  a"),
    "merge-key-bomb": merge_laughs(),
    "deep-alias-chain": deep_alias_chain(),
    "recursive-alias": "version: 1\ndefaults: &a {x: *a}\n",
    "recursive-alias-list": "version: 1\ndefaults: &a [*a]\n",
    "flow-lists-5000": "version: 1\ndefaults: " + "[" * 5000 + "]" * 5000 + "\n",
    "flow-maps-5000": "version: 1\ndefaults: " + "{a: " * 5000 + "}" * 5000 + "\n",
    "block-lists-1200": "version: 1\ndefaults:\n" + "".join(" " * i + "- \n" for i in range(1, 1200)),
    "block-maps-1200": "version: 1\n" + "".join(" " * i + f"k{i}:\n" for i in range(1200)),
    "nul-byte": "version: 1\x00\n",
    "bad-timestamp": "version: !!timestamp 2001-02-30\n",
    "bad-int": "version: !!int xyz\n",
    "python-tag": "version: !!python/object/apply:os.system [true]\n",
}
BYTES = {
    "not-utf8": b"version: 1\ndefaults: {env: {set: {A: \"\xff\xfe\"}}}\n",
    "binary-junk": bytes(range(256)) * 64,
}


def _write_cases(tmp_path):
    cases = {}
    for name, text in TEXTS.items():
        cases[name] = tmp_path / f"{name}.yaml"
        cases[name].write_text(text)
    for name, data in BYTES.items():
        cases[name] = tmp_path / f"{name}.yaml"
        cases[name].write_bytes(data)
    return cases


def test_the_bomb_is_small():
    assert len(laughs()) < 600


@pytest.mark.parametrize("name", sorted(TEXTS) + sorted(BYTES))
def test_hostile_yaml_check(tmp_path, name):
    path = _write_cases(tmp_path)[name]
    assert_clean_error(uctr("policy", "check", str(path)), path)


@pytest.mark.parametrize("name", ["billion-laughs", "merge-key-bomb", "flow-maps-5000",
                                  "block-lists-1200", "not-utf8"])
def test_hostile_yaml_as_uctr_policy(tmp_path, name):
    path = _write_cases(tmp_path)[name]
    assert_clean_error(uctr("policy", "explain", env={"UCTR_POLICY": str(path)}), path)


def _special(tmp_path, kind):
    if kind == "dev-zero":
        return Path("/dev/zero")
    if kind == "fifo":  # nobody ever writes: opening it for reading must not block
        p = tmp_path / "policy.yaml"
        os.mkfifo(p)
        return p
    if kind == "directory":
        p = tmp_path / "policy.yaml"
        p.mkdir()
        return p
    if kind == "big-file":  # 100 MiB of real YAML-ish text, sparse would do as well
        p = tmp_path / "policy.yaml"
        with open(p, "wb") as f:
            f.write(b"version: 1\n# " + b"x" * (1 << 20) + b"\n")
            f.truncate(100 << 20)
        return p
    if kind == "symlink-to-big-file":
        big = _special(tmp_path, "big-file")
        p = tmp_path / "link.yaml"
        p.symlink_to(big)
        return p
    if kind == "symlink-loop":
        p = tmp_path / "loop.yaml"
        p.symlink_to(tmp_path / "loop2.yaml")
        (tmp_path / "loop2.yaml").symlink_to(p)
        return p
    raise AssertionError(kind)


SPECIAL = ["dev-zero", "fifo", "directory", "big-file", "symlink-to-big-file", "symlink-loop"]


@pytest.mark.parametrize("kind", SPECIAL)
def test_special_files_check(tmp_path, kind):
    path = _special(tmp_path, kind)
    assert_clean_error(uctr("policy", "check", str(path)), path)


@pytest.mark.parametrize("kind", SPECIAL)
def test_special_files_as_uctr_policy(tmp_path, kind):
    path = _special(tmp_path, kind)
    assert_clean_error(uctr("policy", "explain", env={"UCTR_POLICY": str(path)}), path)


@pytest.mark.parametrize("kind", ["dev-zero-link", "fifo", "directory", "big-file"])
def test_special_dropins(tmp_path, kind):
    """conf.d/*.yaml entries get the same checks as the main file."""
    main = tmp_path / "policy.yaml"
    main.write_text("version: 1\n")
    conf = tmp_path / "conf.d"
    conf.mkdir()
    bad = conf / "50-bad.yaml"
    if kind == "dev-zero-link":
        bad.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(bad)
    elif kind == "directory":
        bad.mkdir()
    else:
        with open(bad, "wb") as f:
            f.truncate(load.MAX_FILE_BYTES + 1)
    assert_clean_error(uctr("policy", "check", str(main)), bad)
    assert_clean_error(uctr("policy", "explain", env={"UCTR_POLICY": str(main)}), bad)


# -- in-process: the bounds themselves -----------------------------------------------------

def test_too_many_dropins(tmp_path):
    main = tmp_path / "policy.yaml"
    main.write_text("version: 1\n")
    (tmp_path / "conf.d").mkdir()
    for i in range(paths.MAX_DROPINS + 1):
        (tmp_path / "conf.d" / f"{i:03d}.yaml").write_text("version: 1\n")
    with pytest.raises(ConfigError) as e:
        load.load_policy(main, require_trusted=False)
    assert "too many policy drop-ins" in e.value.message and e.value.hint
    assert paths.watched_paths(main)  # the fingerprint still works


def test_anchors_within_bounds_still_work(tmp_path):
    """Aliases and merge keys stay allowed: sites share class bodies with them."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\n"
        "x-common: &common\n  modes: [N1, P1]\n"
        "classes:\n"
        "  - name: a\n    match: {hostlist: 'a[1-2]'}\n    <<: *common\n"
        "  - name: b\n    match: {hostlist: 'b[1-2]'}\n    <<: *common\n"
    )
    pf = load.parse_text(str(path), path.read_text())
    assert pf.data["classes"][1]["modes"] == ["N1", "P1"]


def test_depth_limit_is_not_the_recursion_limit():
    """The composer stops at MAX_DEPTH even when Python's recursion limit is far away."""
    text = "version: 1\ndefaults: " + "[" * (load.MAX_DEPTH + 1) + "]" * (load.MAX_DEPTH + 1)
    with pytest.raises(load.PolicyInvalid) as e:
        load.parse_text("p.yaml", text)
    assert f"more than {load.MAX_DEPTH} levels" in str(e.value)
    ok = "version: 1\ndefaults: " + "[" * 20 + "]" * 20
    assert load.parse_text("p.yaml", ok).data["version"] == 1


def test_file_that_grows_after_fstat_is_cut(tmp_path):
    """Reads are bounded by count, not by the size fstat saw."""
    path = tmp_path / "p.yaml"
    with open(path, "wb") as f:
        f.write(b"version: 1\n" + b"#" * load.MAX_FILE_BYTES)
    with pytest.raises(ConfigError) as e:
        load.read_file(path, require_trusted=False)
    assert "larger than" in e.value.message


@pytest.mark.parametrize("name", ["billion-laughs", "merge-key-bomb"])
def test_pull_with_a_bomb_policy(tmp_path, name):
    """The issue's report: `uctr pull` hung for minutes on a 600-byte alias bomb."""
    path = _write_cases(tmp_path)[name]
    env = {"UCTR_POLICY": str(path), "UCTR_CACHE": str(tmp_path / "cache"),
           "UCTR_LOCAL_DIR": str(tmp_path / "local"), "HOME": str(tmp_path), "UCTR_RETRIES": "0"}
    assert_clean_error(uctr("pull", "127.0.0.1:9/x:1", env=env), path)
