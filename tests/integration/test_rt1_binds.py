"""-v onto the container's own /, /dev, /proc or /sys (red-team pass 2). R1's crun failed with
"failed open()ing /dev/null" (exit 1, no `error:` or `hint:`) after a bind onto /dev, and a
bind onto / hid the whole image (exit 127). Now every mode refuses it as a usage error."""

import subprocess

import pytest

from tests.conftest import PYTHON
from tests.harness import users
from tests.integration.test_mode_escape import (  # noqa: F401 (fixtures)
    USER, assert_clean_failure, canaries, escape, make_case, runtime_params,
)

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("runtime", runtime_params())
@pytest.mark.parametrize("destination", ["/dev", "/dev/", "/", "//", "/proc", "/sys/../dev"])
def test_a_bind_onto_a_directory_uctr_sets_up_is_a_usage_error(escape, runtime, destination):
    mode, mode_opts, path = runtime
    rootfs, _canary, home, opts = make_case(escape, {}, ("-v", "SRC:" + destination))
    env = escape.env(home, path)
    args = [PYTHON, "-m", "uctr_batch", "run", "--mode", mode, *mode_opts, *opts, str(rootfs),
            "--", "sh", "-c", "echo ok"]
    cp = subprocess.run(users.as_user_argv(USER, args, env), env=env, capture_output=True,
                        text=True, cwd=str(home), timeout=120)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    assert_clean_failure(cp)
    assert "cannot bind onto" in cp.stderr
