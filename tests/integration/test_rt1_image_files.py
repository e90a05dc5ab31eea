"""Hostile image files that uctr itself reads before the payload starts (red-team pass 2).

Every mode reads the image's /etc/passwd and /etc/group to write the synthetic identity
files, and F1 reads /etc/ld.so.conf (and its includes) and libc.so.6. An image that ships one
of them as a FIFO made every mode block forever in open(); a sparse /etc/passwd declared 3 GiB
(a few hundred bytes in a layer, holes are kept) was read whole into memory. Asserted per run,
as the unprivileged test user: no hang, and the run works (a FIFO counts as absent) or fails
cleanly (`error:` + `hint:`, exit 1, no traceback).
"""

import os
import signal
import subprocess

import pytest

from tests.conftest import PYTHON
from tests.harness import users
from tests.harness.images import busybox_layer, readable_layout
from tests.harness.oci import ImageConfig
from tests.integration.test_mode_escape import (  # noqa: F401 (fixtures)
    USER, assert_clean_failure, canaries, escape, exec_modes, exec_node, make_case,
    runtime_params, snapshot,
)

pytestmark = pytest.mark.timeout(900)


def fifo(path):
    def make(rootfs):
        target = rootfs / path.lstrip("/")
        if target.exists() or target.is_symlink():
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(target, 0o644)
    return make


def include_fifo(rootfs):
    (rootfs / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    (rootfs / "etc/ld.so.conf.d").mkdir()
    os.mkfifo(rootfs / "etc/ld.so.conf.d/x.conf")


def sparse_passwd(rootfs):
    target = rootfs / "etc/passwd"
    target.unlink()  # the base rootfs is hard-linked: never truncate its inode
    with open(target, "wb") as f:
        f.truncate(3 << 30)


def run_guarded(argv, env, cwd, name):
    """subprocess.run with a hang guard (not a timing assertion: the old code blocked
    forever); on a hang the whole process group (runuser and uctr) is killed."""
    p = subprocess.Popen(argv, env=env, cwd=str(cwd), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"uctr run blocked on the image's {name}")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


# (name, how to spoil the rootfs, must work)
CASES = [
    ("passwd-fifo", fifo("/etc/passwd"), True),
    ("group-fifo", fifo("/etc/group"), True),
    ("ld-so-conf-fifo", fifo("/etc/ld.so.conf"), True),
    ("ld-so-conf-include-fifo", include_fifo, True),
    ("passwd-sparse-3GiB", sparse_passwd, False),
]


@pytest.mark.parametrize("runtime", runtime_params())
@pytest.mark.parametrize("name, spoil, must_work", CASES, ids=[c[0] for c in CASES])
def test_image_files_uctr_reads_never_block_or_balloon(escape, runtime, name, spoil, must_work):
    mode, mode_opts, path = runtime
    rootfs, canary, home, _opts = make_case(escape, {}, ())
    spoil(rootfs)
    users.chown_tree(rootfs, USER)
    before = snapshot(canary)
    env = escape.env(home, path)
    args = [PYTHON, "-m", "uctr_batch", "run", "--mode", mode, *mode_opts, str(rootfs),
            "--", "sh", "-c", "echo ok"]
    cp = run_guarded(users.as_user_argv(USER, args, env), env, home, name)
    assert snapshot(canary) == before
    if must_work:
        assert cp.returncode == 0 and cp.stdout == "ok\n", (cp.returncode, cp.stderr)
    else:
        assert cp.returncode == 1, cp.stderr
        assert_clean_failure(cp)


def fifo_image(layout):
    """busybox with /etc/passwd, /etc/group and /etc/ld.so.conf shipped as FIFOs."""
    layer = busybox_layer(accounts=False)
    for name in ("passwd", "group", "ld.so.conf"):
        layer.fifo(f"etc/{name}")
    return readable_layout(layout, ImageConfig(cmd=["/bin/sh"]), layer)


@pytest.mark.parametrize("mode", exec_modes())
def test_uctr_exec_image_with_fifo_account_files(exec_node, mode):
    ref = fifo_image(exec_node.base / "fifo-image")
    argv = exec_node.argv(("--mode", mode, ref, "sh", "-c", "echo ok"), exec_node.env(None))
    cp = run_guarded(argv, exec_node.env(None), exec_node.work, "FIFO /etc/passwd")
    assert cp.returncode == 0 and cp.stdout == "ok\n", (cp.returncode, cp.stderr)
