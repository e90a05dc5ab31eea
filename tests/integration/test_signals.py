"""The payload gets the signal dispositions and mask its launcher received (issue 10, class 3).

Each mode runs `grep Sig /proc/self/status` inside the container, started through uctr-exec
(the launchers/uctr-exec shim, which captures SigIgn/SigBlk from /proc, and the C front,
which hands the rank to Python itself and captures them with sigaction/sigprocmask) and
through `uctr run` (Python entry point, no capture), from a parent that ignores SIGPIPE and
SIGUSR1 and blocks SIGUSR2, and from a clean parent. The launcher's own state is what the
same parent gives a plain `grep` on the host. Expected (docs/modes.md, "Signals"):
  * uctr-exec: exactly the launcher's SigIgn and SigBlk, in N1, P1, P2 and F1;
  * uctr run: the launcher's, except that SIGPIPE and SIGXFSZ are default (Python ignores
    both at start-up and cannot tell whether they were ignored before);
  * R1: crun resets every disposition to default and unblocks everything in the container's
    init (by design): SigIgn = SigBlk = 0; runc resets the dispositions and keeps the mask.
And `yes | head -1` from a clean parent: head prints one line, yes dies of SIGPIPE (141 in
sh), no "Broken pipe" message.
"""

import os
import signal
import subprocess

import pytest

from tests.conftest import PYTHON
from tests.harness import cfront, users
from tests.integration.exec_helpers import SHIM, Node
from tests.integration.test_mode_conformance import F1_DEBIAN, missing_binary

pytestmark = pytest.mark.timeout(900)

USER = users.TEST_USER


def why_not(mode: str):
    """Why MODE cannot run the Debian test image every test here uses, or None."""
    return missing_binary(mode) or (F1_DEBIAN if mode == "F1" else None)


MODES = [pytest.param(m, marks=[pytest.mark.skip(reason=f"{m}: {why_not(m)}")]
                      if why_not(m) else [], id=m) for m in ("N1", "R1", "P1", "P2", "F1")]
# runc: only as --root rootless, found when crun is not on PATH
RUNC = pytest.param("R1-runc", id="R1-runc", marks=[pytest.mark.skip(reason="runc not installed")]
                    if not os.path.exists("/usr/sbin/runc") or os.path.exists("/usr/sbin/crun")
                    else [])


def mode_args(mode: str):
    """(uctr options, launcher PATH) for a mode id."""
    if mode == "R1-runc":
        return ["--mode", "R1", "--root"], "/usr/sbin:/sbin"
    return ["--mode", mode], None
POLICY = """\
version: 1
defaults:
  modes: [N1, R1, P1, P2, F1]
  user_modes: [N1, R1, P1, P2, F1]
"""
# argv: IGNORED BLOCKED CMD...: reset every disposition, ignore/block the named signals, exec.
PARENT = """\
import os, signal, sys
for s in signal.Signals:
    if s not in (signal.SIGKILL, signal.SIGSTOP):
        try:
            signal.signal(s, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
for name in filter(None, sys.argv[1].split(",")):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_SETMASK,
                       [getattr(signal, n) for n in filter(None, sys.argv[2].split(","))])
os.execvp(sys.argv[3], sys.argv[3:])
"""
PARENTS = {"hostile": ("SIGPIPE,SIGUSR1", "SIGUSR2"), "clean": ("", "")}
PROBE = ["grep", "^Sig[IB]", "/proc/self/status"]
PYTHON_IGNORES = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))


def masks(text: str):
    found = dict(line.split(":", 1) for line in text.splitlines() if line.startswith("Sig"))
    return int(found["SigIgn"], 16), int(found["SigBlk"], 16)


@pytest.fixture(scope="module")
def node(harness, test_images):
    if not users.can_switch_user():
        pytest.skip(f"needs root and the user {USER} (run scripts/install.sh)")
    n = Node(harness.root / "signals", USER)
    policy = n.base / "policy.yaml"
    policy.write_text(POLICY)
    policy.chmod(0o644)
    n.policy = policy
    n.ref = test_images["debian"].oci_ref
    return n


def run(node, parent: str, argv, package=None, path=None):
    ignored, blocked = PARENTS[parent]
    env = node.env({"UCTR_POLICY": node.policy})
    if package:
        env["PYTHONPATH"] = str(package)
    if path:
        env["PATH"] = path
    command = ["/usr/bin/python3", "-c", PARENT, ignored, blocked, *map(str, argv)]
    return subprocess.run(users.as_user_argv(USER, command, env), env=env, capture_output=True,
                          text=True, cwd=str(node.work), timeout=300)


def launcher_state(node, parent: str):
    cp = run(node, parent, PROBE)
    assert cp.returncode == 0, cp.stderr
    return masks(cp.stdout)


def expected(mode: str, launcher, captured: bool):
    ignored, blocked = launcher
    if mode == "R1":  # crun: every disposition default, nothing blocked
        return 0, 0
    if mode == "R1-runc":  # runc: every disposition default, the mask kept
        return 0, blocked
    return (ignored if captured else ignored & ~PYTHON_IGNORES), blocked


@pytest.fixture(scope="module")
def front(harness):
    """The C front as `uctr slurm install` builds it: with no step to join it hands the rank
    to the Python launcher itself, capturing what it inherited with sigaction/sigprocmask."""
    if cfront.compiler() is None:
        pytest.skip("no C compiler")
    return cfront.build(harness.root / "cfront-direct", ("uctr-exec",), python=PYTHON)["uctr-exec"]


@pytest.mark.parametrize("launcher", ["shim", "front"])
@pytest.mark.parametrize("parent", PARENTS)
@pytest.mark.parametrize("mode", MODES)  # runc: uctr-exec has no --root, runc needs it
def test_uctr_exec_hands_over_the_launchers_signal_state(node, mode, parent, launcher, request):
    state = launcher_state(node, parent)
    if parent == "hostile":
        assert state[0] & (1 << (signal.SIGUSR1 - 1)) and state[1]
    opts, path = mode_args(mode)
    exe = SHIM if launcher == "shim" else request.getfixturevalue("front")
    cp = run(node, parent, [exe, *opts, node.ref, *PROBE], path=path)
    assert cp.returncode == 0, cp.stderr
    assert masks(cp.stdout) == expected(mode, state, captured=True), cp.stdout


@pytest.mark.parametrize("parent", PARENTS)
@pytest.mark.parametrize("mode", MODES + [RUNC])
def test_uctr_run_hands_over_the_launchers_signal_state(node, package_for_test_user, mode, parent):
    launcher = launcher_state(node, parent)
    opts, path = mode_args(mode)
    cp = run(node, parent, [PYTHON, "-m", "uctr_batch", "run", *opts, node.ref, "--", *PROBE],
             package=package_for_test_user, path=path)
    assert cp.returncode == 0, cp.stderr
    assert masks(cp.stdout) == expected(mode, launcher, captured=False), cp.stdout


YES_HEAD = '(yes; echo "yes=$?" >&2) | head -1'


@pytest.mark.parametrize("mode", MODES)
def test_yes_head_dies_of_sigpipe(node, package_for_test_user, mode):
    for argv, package in (([SHIM, "--mode", mode, node.ref], None),
                          ([PYTHON, "-m", "uctr_batch", "run", "--mode", mode, node.ref, "--"],
                           package_for_test_user)):
        cp = run(node, "clean", [*argv, "sh", "-c", YES_HEAD], package=package)
        assert cp.returncode == 0 and cp.stdout == "y\n", cp.stderr
        assert "yes=141" in cp.stderr and "Broken pipe" not in cp.stderr, cp.stderr


def test_a_stale_or_foreign_capture_is_ignored_and_never_reaches_the_payload(node):
    """UCTR_SIGSTATE names the pid that captured it; one inherited from elsewhere is not
    trusted (SIGUSR1 would be ignored by it) and is removed from the payload's environment."""
    bogus = "1:%x:0" % (1 << (signal.SIGUSR1 - 1))
    cp = run(node, "clean", ["/usr/bin/env", f"UCTR_SIGSTATE={bogus}", SHIM, "--mode", "N1",
                             node.ref, "sh", "-c", 'grep ^SigIgn /proc/self/status; env'])
    assert cp.returncode == 0, cp.stderr
    assert masks(cp.stdout + "\nSigBlk: 0")[0] == 0
    assert "UCTR_SIGSTATE" not in cp.stdout
