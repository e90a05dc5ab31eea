"""Issue 10: every `uctr` command and `uctr-exec`, fed malformed input, fails cleanly.

The commands are enumerated from cli.COMMANDS and their argparse trees (sub-actions too),
so a new command or option is swept without touching this file. Each case runs the real CLI
in a subprocess (`python -m uctr_batch`, like the `uctr` fixture) with a private HOME,
UCTR_CACHE, UCTR_LOCAL_DIR and UCTR_CONFIG_DIR, stdin from /dev/null and a generous timeout
that only detects hangs. A case passes when the run

  * prints no traceback,
  * exits with a code from errors.EXIT_CODES (uctr run / uctr-exec: or a payload status),
  * and, when it fails, prints `error:` and a `hint:` (the few errors without a fix are
    listed in NO_HINT, each with the reason).

All cases start at once on a small thread pool (one module fixture); the tests then only
look at the results, so the sweep costs a few python start-ups per core, not one per test.
"""

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest

from tests.harness import users
from tests.harness.oci import ImageConfig, Layer, LayerBuilder, LayoutWriter
from uctr_batch import cli, envnum, errors

REPO = Path(__file__).resolve().parents[2]
PYTHON = os.environ.get("UCTR_TEST_PYTHON", sys.executable)
HANG = 120  # seconds: only a hang gets near this
WORKERS = 4
IMAGE = "local/sweep:1"  # loaded into the private cache by the fixture
CLOSED = "127.0.0.1:9/nothing/here:1"  # a registry that refuses at once

# Case ids whose error has no fix a hint could name. Empty today: every swept error has one.
NO_HINT: Dict[str, str] = {}

HUGE = "a" * 100_000
ODD = "\u202e\ufeffé\u0301\U0001f642\u200b名前"  # bidi override, BOM, combining, emoji, ZWSP, CJK


class Case(NamedTuple):
    id: str
    argv: Tuple[str, ...]  # after `uctr` (after `uctr-exec` when exec_)
    env: Tuple[Tuple[str, str], ...] = ()
    exec_: bool = False  # uctr-exec instead of uctr
    user: bool = False  # as the unprivileged test user
    may_succeed: bool = False


# -- the argparse tree -------------------------------------------------------------------------

def leaves() -> List[Tuple[Tuple[str, ...], argparse.ArgumentParser]]:
    """(command words, parser) for every runnable (sub)command, hidden ones included."""
    found = []

    def walk(words, parser):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found.append((words, parser))
            return
        for name, sub in subs[0].choices.items():
            walk(words + (name,), sub)

    for name in cli.COMMANDS:
        top = cli.build_parser([name])
        sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        walk((name,), sub.choices[name])
    return found


def _value_options(parser) -> List[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.nargs is None
            and not isinstance(a, (argparse._StoreTrueAction, argparse._CountAction,
                                   argparse._HelpAction, argparse._VersionAction))]


def _positionals(parser) -> List[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings
            and not isinstance(a, argparse._SubParsersAction)]


def _numeric(action) -> bool:
    return action.type in (int, float) or getattr(action.type, "__name__", "") in ("int", "float")


def _required_options(parser) -> List[str]:
    """Values for the required options, and --dry-run where there is one: the sweep must
    never really install or uninstall the Slurm plugin or the PBS hook of this host."""
    out = ["--dry-run"] if any("--dry-run" in a.option_strings for a in parser._actions) else []
    for a in parser._actions:
        if a.option_strings and a.required:
            out += [a.option_strings[-1], "1" if _numeric(a) else "/nonexistent/sweep"]
    return out


def flag_cases() -> List[Case]:
    cases = []
    for words, parser in leaves():
        name = " ".join(words)
        pos = _positionals(parser)
        need = _required_options(parser)
        plain = [IMAGE if "image" in a.dest else "x" for a in pos if a.nargs != "?"]
        cases.append(Case(f"{name}: unknown flag", words + ("--no-such-flag",) + tuple(plain)))
        cases.append(Case(f"{name}: lone dash flag", words + ("--",) + tuple(need)))
        opts = _value_options(parser)
        if opts:
            last = opts[-1].option_strings[-1]
            cases.append(Case(f"{name}: {last} without its value", words + tuple(need) + (last,)))
        for i, action in enumerate(opts):  # sampled: every option, not every value
            flag = action.option_strings[-1]
            values = ["abc", "-1", "99999999999999999999999"] if _numeric(action) \
                else [("-", ODD)[i % 2]]
            for value in values:
                cases.append(Case(f"{name}: {flag}={value!r}",
                                  words + tuple(need) + (f"{flag}={value}",) + tuple(plain),
                                  may_succeed=not _numeric(action)))
        if pos:
            for label, value in (("huge", HUGE), (("odd unicode", ODD), ("dash", "-"))[len(cases) % 2]):
                args = tuple(value for a in pos if a.nargs != "?") or (value,)
                cases.append(Case(f"{name}: {label} positional", words + tuple(need) + args,
                                  may_succeed=True))
    return cases


# -- environment -------------------------------------------------------------------------------

JUNK = ["abc", "-1", "nan", "1e999", ODD]
ENV_CASES = [
    # (variable, values, argv) - argv reads the variable
    *[(name, JUNK, ("pull", CLOSED)) for name in envnum.NUMERIC if name != "UCTR_STAGE_TIMEOUT"],
    ("UCTR_PARALLEL", ["abc", "0", "1e999"], ("create", CLOSED)),
    ("UCTR_RETRIES", ["-1"], ("run", CLOSED, "true")),
    ("UCTR_POLICY", ["/dev/zero", "/nonexistent/policy.yaml", "/", ""], ("pull", CLOSED)),
    ("UCTR_POLICY", ["/dev/zero", "/"], ("run", IMAGE, "true")),
    ("UCTR_CACHE", ["/dev/zero", "/dev/null/x", "relative/dir", ODD], ("images",)),
    ("UCTR_LOCAL_DIR", ["/dev/zero", "/dev/null/x", "/proc/1"], ("ps",)),
    ("UCTR_LOCAL_DIR", ["/dev/zero"], ("create", IMAGE)),
    ("UCTR_CONFIG_DIR", ["/dev/zero", "/dev/null/x"], ("logout", "example.org")),
    ("UCTR_TLS_CA", ["/dev/zero", "/nonexistent/ca.pem", "/"], ("pull", "example.invalid/x:1")),
    ("UCTR_REGISTRY_MIRRORS", ["=;=;", "docker.io=notaurl", ODD], ("pull", CLOSED)),
    ("UCTR_INSECURE_REGISTRIES", [",,,", ODD], ("pull", CLOSED)),
    ("UCTR_VERBOSE", ["abc", "-99", "99999999999999999999"], ("images",)),
]
EXEC_ENV_CASES = [
    ("UCTR_STAGE_TIMEOUT", ["abc", "-1", "nan", "inf", "1e999", ODD]),
    ("UCTR_MODE", ["junk", ODD, "-"]),
    ("UCTR_MPI", ["junk", ODD]),
    ("UCTR_GPU", ["junk"]),
    ("UCTR_MOUNTS", [":::", "a:b:c:d", ":/x", ODD + ":/x"]),
    ("UCTR_WORKDIR", ["relative", ODD]),
    ("UCTR_ENV_NAMES", [",,=,", ODD]),
    ("UCTR_VERBOSE", ["abc"]),
    ("UCTR_POLICY", ["/dev/zero", "/"]),
    ("UCTR_LOCAL_DIR", ["/dev/zero"]),
]


def env_cases() -> List[Case]:
    cases = []
    for name, values, argv in ENV_CASES:
        for value in values:
            # listing or forgetting what is not there is no error
            harmless = argv[0] in ("ps", "logout") or name in (
                "UCTR_VERBOSE", "UCTR_INSECURE_REGISTRIES", "UCTR_REGISTRY_MIRRORS")
            cases.append(Case(f"{' '.join(argv[:1])}: {name}={value!r}", argv, ((name, value),),
                              may_succeed=harmless or value in (" ", "")))
    for name, values in EXEC_ENV_CASES:
        for value in values:
            cases.append(Case(f"uctr-exec: {name}={value!r}", (IMAGE, "true"), ((name, value),),
                              exec_=True, may_succeed=name == "UCTR_VERBOSE"))
    junk_all = tuple((n, "junk\u202e") for n in sorted(ALL_VARIABLES))
    for words, _parser in leaves():
        if words[0] in ("slurm", "pbs"):
            continue  # installs and hooks: their argument cases above cover them
        cases.append(Case(f"{' '.join(words)}: every UCTR_* is junk", words + ("x",), junk_all,
                          may_succeed=True))
    cases.append(Case("uctr-exec: every UCTR_* is junk", (IMAGE, "true"), junk_all, exec_=True))
    return cases


# every UCTR_* the package reads (a grep of the source, so new ones are swept too)
def _variables() -> List[str]:
    import re

    found = set()
    for path in (REPO / "uctr_batch").rglob("*.py"):
        found.update(re.findall(r"\bUCTR_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    return sorted(found - {"UCTR_ARGV0"})  # ARGV0 is the SPANK hand-over, swept below


ALL_VARIABLES = _variables()


# -- file arguments ----------------------------------------------------------------------------

FILE_KINDS = ["missing", "directory", "dev-zero", "fifo", "unreadable", "symlink-loop"]
DEST_KINDS = ["unwritable-dir/bundle", "symlink-to-dir", "missing/deep/x/../../..",
              "unwritable-dir"]
FILE_USES = [  # argv template (FILE replaced), env template, as the test user
    (("load", "FILE"), None),
    (("load", "oci:FILE"), None),
    (("policy", "check", "FILE"), None),
    (("policy", "explain"), "UCTR_POLICY"),
    (("pull", "--tls-ca", "FILE", CLOSED), None),
    (("create", "--dest", "FILE/bundle", IMAGE), None),
    (("create", "--dest", "FILE", IMAGE), None),
    (("run", "--rootfs", "FILE", "true"), None),
    (("run", "-v", "FILE:/mnt", IMAGE, "true"), None),
    (("pbs", "install", "--dry-run", "--config", "FILE"), None),
]
ALL_KINDS = ("load", "policy", "--dest", "--config")  # uses that get every kind of file


def file_cases() -> List[Case]:
    cases = []
    for n, (argv, env_name) in enumerate(FILE_USES):
        kinds = FILE_KINDS if set(argv) & set(ALL_KINDS) or env_name else FILE_KINDS[n % 3::3]
        for kind in kinds:
            label = f"{' '.join(argv)} with {kind}"
            if argv[0] == "run" and "--rootfs" in argv and not _run_has_rootfs():
                continue
            env = ((env_name, "@" + kind),) if env_name else ()
            args = tuple(a.replace("FILE", "@" + kind) for a in argv)
            cases.append(Case(label, args, env, user=kind == "unreadable",
                              may_succeed="-v" in argv or (kind in ("missing", "directory")
                                                           and "FILE/bundle" in argv)))
    for kind in DEST_KINDS:  # --dest in a directory the user may not write, or a symlink
        cases.append(Case(f"create --dest with {kind}", ("create", "--dest", "@" + kind, IMAGE),
                          user=True))
    cases.append(Case("uctr-exec: -v with a FIFO", ("-v", "@fifo:/mnt", IMAGE, "true"), exec_=True,
                      may_succeed=True))
    return cases


def _run_has_rootfs() -> bool:
    parser = dict((w, p) for w, p in leaves())[("run",)]
    return any("--rootfs" in a.option_strings for a in parser._actions)


EXTRA_CASES = [  # uctr-exec, and bundles with a junk image.json
    Case("run: bundle whose image.json is a list", ("run", "@bundle-list", "true")),
    Case("run: bundle whose image.json nests deeply", ("run", "@bundle-deep", "true")),
    Case("run: bundle whose image.json is /dev/zero", ("run", "@bundle-zero", "true")),
    Case("uctr-exec: no arguments", (), exec_=True),
    Case("uctr-exec: unknown flag", ("--no-such-flag", IMAGE, "true"), exec_=True),
    Case("uctr-exec: --mode without value", ("--mode",), exec_=True),
    Case("uctr-exec: -v without value", ("-v",), exec_=True),
    Case("uctr-exec: --mode junk", ("--mode", "junk", IMAGE, "true"), exec_=True),
    Case("uctr-exec: --gpu junk", ("--gpu", ODD, IMAGE, "true"), exec_=True),
    Case("uctr-exec: --mpi junk", ("--mpi", "junk", IMAGE, "true"), exec_=True),
    Case("uctr-exec: -w relative", ("-w", "rel", IMAGE, "true"), exec_=True),
    Case("uctr-exec: -v empty", ("-v", "", IMAGE, "true"), exec_=True),
    Case("uctr-exec: -v ::::", ("-v", "::::", IMAGE, "true"), exec_=True),
    Case("uctr-exec: -e =", ("-e", "=", IMAGE, "true"), exec_=True),
    Case("uctr-exec: huge image", (HUGE, "true"), exec_=True),
    Case("uctr-exec: odd image", (ODD, "true"), exec_=True),
    Case("uctr-exec: dash image", ("-", "true"), exec_=True),
    Case("uctr-exec: image not cached", (CLOSED, "true"), exec_=True),
    Case("uctr-exec: UCTR_ARGV0 without UCTR_IMAGE", ("x",), (("UCTR_ARGV0", "true"),), exec_=True),
    Case("uctr-exec: UCTR_IMAGE junk", ("--",), (("UCTR_IMAGE", ODD),), exec_=True),
]


ALL_CASES = flag_cases() + env_cases() + file_cases() + EXTRA_CASES


# -- running -----------------------------------------------------------------------------------

def _tiny_layout(root: Path) -> Path:
    layer = LayerBuilder()
    layer.dir("bin", 0o755)
    layer.file("bin/hello", b"#!/bin/sh\necho hello\n", 0o755)
    writer = LayoutWriter(root)
    writer.tag(writer.add_image(ImageConfig(cmd=["/bin/hello"]), [Layer.build(layer)]), "1")
    return root


class World:
    """Private directories for root and for the test user, and the odd files."""

    def __init__(self, base: Path):
        self.base = base
        self.files: Dict[str, str] = {}
        odd = base / "odd"
        odd.mkdir()
        self.files["missing"] = str(odd / "missing")
        (odd / "directory").mkdir()
        self.files["directory"] = str(odd / "directory")
        self.files["dev-zero"] = "/dev/zero"
        os.mkfifo(odd / "fifo")
        os.chmod(odd / "fifo", 0o666)
        self.files["fifo"] = str(odd / "fifo")
        (odd / "unreadable").write_text("version: 1\n")
        os.chmod(odd / "unreadable", 0o600)
        self.files["unreadable"] = str(odd / "unreadable")
        (odd / "loop").symlink_to(odd / "loop2")
        (odd / "loop2").symlink_to(odd / "loop")
        self.files["symlink-loop"] = str(odd / "loop")
        (odd / "unwritable-dir").mkdir(mode=0o755)  # root's: the test user cannot write it
        self.files["unwritable-dir"] = str(odd / "unwritable-dir")
        (odd / "symlink-to-dir").symlink_to(base)
        self.files["symlink-to-dir"] = str(odd / "symlink-to-dir")
        for kind, meta in (("bundle-list", "[1]"), ("bundle-deep", "[" * 100_000),
                           ("bundle-zero", None)):  # bundles whose image.json is junk
            (odd / kind / "rootfs").mkdir(parents=True)
            if meta is None:
                (odd / kind / "image.json").symlink_to("/dev/zero")
            else:
                (odd / kind / "image.json").write_text(meta)
            self.files[kind] = str(odd / kind)
        (base / "policy.yaml").write_text("version: 1\n")
        self.root_env = self._dirs(base / "root")
        self.user_env: Optional[Dict[str, str]] = None
        if users.can_switch_user():
            src = base / "src"
            users.copy_package(REPO / "uctr_batch", src)
            self.user_env = self._dirs(base / "user", pythonpath=str(src))
            users.chown_tree(base / "user", users.TEST_USER)

    def _dirs(self, home: Path, pythonpath: str = str(REPO)) -> Dict[str, str]:
        home.mkdir(mode=0o755)
        return {"PATH": users.BASE_PATH, "LANG": "C.UTF-8", "PYTHONPATH": pythonpath,
                "HOME": str(home / "home"), "UCTR_CACHE": str(home / "cache"),
                "UCTR_LOCAL_DIR": str(home / "local"), "UCTR_CONFIG_DIR": str(home / "config"),
                "XDG_CACHE_HOME": str(home / "xdg"), "TMPDIR": str(home),
                "UCTR_POLICY": str(self.base / "policy.yaml"), "UCTR_RETRIES": "0",
                "UCTR_STAGE_TIMEOUT": "5", "UCTR_RUN_DIR": str(home / "run")}

    def argv(self, case: Case) -> List[str]:
        args = [self._file(a) for a in case.argv]
        if case.exec_:
            return [PYTHON, "-c", "from uctr_batch.launch.main import main; "
                    "raise SystemExit(main())", *args]
        return [PYTHON, "-m", "uctr_batch", *args]

    def _file(self, word: str) -> str:
        for kind, path in sorted(self.files.items(), key=lambda kv: -len(kv[0])):
            word = word.replace("@" + kind, path)
        return word

    def run(self, case: Case) -> subprocess.CompletedProcess:
        if case.user and self.user_env is None:
            pytest.skip("needs root and the test user uctrtest")
        env = dict(self.user_env if case.user else self.root_env)
        env.update((k, self._file(v)) for k, v in case.env)
        argv = self.argv(case)
        if case.user:
            argv = users.as_user_argv(users.TEST_USER, argv, env)
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, errors="replace", timeout=HANG,
                                  cwd=self.base, start_new_session=True)
        except subprocess.TimeoutExpired as e:
            proc = subprocess.CompletedProcess(argv, "hang", e.stdout or "", e.stderr or "")
        proc.seconds = time.monotonic() - started  # for finding slow cases, never asserted
        return proc


@pytest.fixture(scope="module")
def results():
    base = Path(tempfile.mkdtemp(prefix="uctr-sweep-", dir="/tmp"))
    base.chmod(0o755)
    try:
        world = World(base)
        layout = _tiny_layout(base / "layout")
        loaded = subprocess.run([PYTHON, "-m", "uctr_batch", "load", str(layout), "--tag", IMAGE],
                                env=world.root_env, capture_output=True, text=True, timeout=HANG)
        assert loaded.returncode == 0, loaded.stderr
        if world.user_env is not None:  # the test user's own cache gets the image too
            os.chmod(layout, 0o755)
            for root, dirs, files in os.walk(layout):
                for name in dirs:
                    os.chmod(os.path.join(root, name), 0o755)
                for name in files:
                    os.chmod(os.path.join(root, name), 0o644)
            argv = [PYTHON, "-m", "uctr_batch", "load", str(layout), "--tag", IMAGE]
            loaded = users.run_as(users.TEST_USER, argv, world.user_env, timeout=HANG)
            assert loaded.returncode == 0, loaded.stderr
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            futures = {case.id: pool.submit(world.run, case) for case in ALL_CASES}
        out = {}
        for case_id, future in futures.items():
            try:
                out[case_id] = future.result()
            except pytest.skip.Exception as e:
                out[case_id] = e
        yield out
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def _allowed(case: Case, code) -> bool:
    if code in errors.EXIT_CODES:
        return True
    payload = case.exec_ or case.argv[:1] == ("run",)
    return payload and (code in errors.PAYLOAD_CODES or 128 < code < 128 + 65)


def test_the_sweep_covers_every_command():
    swept = {case.argv[0] for case in ALL_CASES if not case.exec_ and case.argv}
    assert set(cli.COMMANDS) <= swept
    assert any(case.exec_ for case in ALL_CASES)
    ids = [case.id for case in ALL_CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id[:90] for c in ALL_CASES])
def test_malformed_input_fails_cleanly(results, case):
    proc = results[case.id]
    if isinstance(proc, BaseException):
        pytest.skip(str(proc))
    tail = "\n".join(line[:300] for line in proc.stderr[-3000:].splitlines())
    shown = f"$ {' '.join(a[:60] for a in case.argv)}\nexit {proc.returncode}\n{tail}"
    assert proc.returncode != "hang", "hung:\n" + shown
    assert "Traceback" not in proc.stderr, shown
    assert _allowed(case, proc.returncode), "undocumented exit code:\n" + shown
    assert proc.returncode != errors.EXIT_INTERNAL, "internal error:\n" + shown
    if proc.returncode == 0:
        assert case.may_succeed, "accepted malformed input:\n" + shown
        return
    if _allowed(case, proc.returncode) and proc.returncode not in errors.EXIT_CODES:
        return  # the payload's own status (the sweep's payload `true` never fails)
    assert "error:" in proc.stderr, shown
    if case.id not in NO_HINT:
        assert "hint:" in proc.stderr, "no hint:\n" + shown
