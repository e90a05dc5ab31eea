"""Hostile image runtime configs (red-team pass 2): a NUL byte or a lone surrogate in Env,
PATH, Cmd or WorkingDir ("\\u0000" and "\\ud800" are valid JSON and the registry-side checks
allow them), or fields of the wrong type in a bundle's image.json. The old code ended in a
traceback (exit 70: ValueError, TypeError or UnicodeEncodeError) in the mode's execve or path
resolution; now `uctr run` and `uctr-exec` refuse the config with `error:` + `hint:` and exit
1, before any mode starts.
"""

import json
import os
import subprocess

import pytest

from tests.conftest import PYTHON
from tests.harness import users
from tests.harness.images import busybox_layer, readable_layout
from tests.harness.oci import ImageConfig
from tests.integration.test_mode_escape import (  # noqa: F401 (fixtures)
    USER, assert_clean_failure, canaries, escape, exec_node, make_case, runtime_params,
)

pytestmark = pytest.mark.timeout(900)

CONFIGS = [
    ("env-nul", {"Env": ["A=b\u0000c"]}),
    ("path-nul", {"Env": ["PATH=/bin\u0000/x"]}),
    ("cmd-nul", {"Cmd": ["sh", "-c", "echo ok\u0000"]}),
    ("workdir-nul", {"WorkingDir": "/a\u0000b"}),
    ("env-lone-surrogate", {"Env": ["A=\ud800"]}),
    ("cmd-lone-surrogate", {"Cmd": ["sh", "-c", "echo ok", "\udbff"]}),
    ("workdir-lone-surrogate", {"WorkingDir": "/x\ud800"}),
    ("workdir-not-a-string", {"WorkingDir": 5}),
    ("env-not-strings", {"Env": [1, {"a": 1}]}),
    ("entrypoint-a-string", {"Entrypoint": "/bin/sh"}),
    ("config-a-list", [1]),
]


def run_bundle_with_config(escape, runtime, config, timeout: float):
    """`uctr run` as the test user of a bundle whose image.json holds CONFIG."""
    mode, mode_opts, path = runtime
    rootfs, _canary, home, _opts = make_case(escape, {}, ())
    bundle = rootfs.parent / "bundle"
    bundle.mkdir()
    os.rename(rootfs, bundle / "rootfs")
    (bundle / "image.json").write_text(json.dumps({"config": config, "reference": "x"}))
    users.chown_tree(bundle, USER)
    env = escape.env(home, path)
    command = [] if "Cmd" in str(config) else ["--", "sh", "-c", "echo ok"]
    args = [PYTHON, "-m", "uctr_batch", "run", "--mode", mode, *mode_opts, str(bundle), *command]
    return subprocess.run(users.as_user_argv(USER, args, env), env=env, capture_output=True,
                          text=True, cwd=str(home), timeout=timeout)


@pytest.mark.parametrize("runtime", runtime_params())
@pytest.mark.parametrize("name, config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_uctr_run_refuses_an_unusable_image_config(escape, runtime, name, config):
    cp = run_bundle_with_config(escape, runtime, config, timeout=120)
    assert cp.returncode == 1, (cp.returncode, cp.stderr)
    assert_clean_failure(cp)
    assert "image config" in cp.stderr


def nul_image(layout):
    config = ImageConfig(cmd=["/bin/sh"], env=["PATH=/bin", "BAD=x\u0000y"])
    return readable_layout(layout, config, busybox_layer(accounts=False))


@pytest.mark.parametrize("mode", ["N1", "P1"])
def test_uctr_exec_refuses_a_nul_in_the_image_env(exec_node, mode):
    ref = nul_image(exec_node.base / "nul-env")
    cp = exec_node.run("--mode", mode, ref, "sh", "-c", "echo ok")
    assert cp.returncode == 1, (cp.returncode, cp.stderr)
    assert_clean_failure(cp)
    # refused when the image is loaded (manifest.check_string), before any bundle exists
    assert "Env[1] holds a NUL character" in cp.stderr


# An Env or Cmd that execve cannot take (E2BIG): N1 and P1 said so (exit 126); R1's crun
# exited 1 with no hint, after about a minute and a half parsing a 100k-entry Env.
TOO_BIG = [
    ("env-one-1MiB-string", {"Env": ["V=" + "y" * (1 << 20)]}),
    ("env-100k-entries", {"Env": ["V%d=%s" % (i, "y" * 50) for i in range(100000)]}),
    ("cmd-3MiB", {"Cmd": ["sh", "-c", "echo ok"] + ["y" * 100000] * 30}),
]


@pytest.mark.parametrize("runtime", runtime_params())
@pytest.mark.parametrize("name, config", TOO_BIG, ids=[c[0] for c in TOO_BIG])
def test_an_env_or_command_too_large_for_execve_is_exit_126(escape, runtime, name, config):
    cp = run_bundle_with_config(escape, runtime, config, timeout=300)
    assert cp.returncode == 126, (cp.returncode, cp.stderr[-500:])
    assert_clean_failure(cp)
    assert "too large" in cp.stderr
