"""After the README's setup (scripts/install.sh), `uctr` and `uctr-exec` are on every user's
PATH and run an installed package, not this checkout: a new user can type the user guide's
first commands as written.

scripts/install.sh links them into /usr/local/bin (UCTR_BIN_DIR) from the venv
/opt/uctr-batch/venv (UCTR_VENV); these tests fail when that step is missing or when the
commands resolve into the checkout (an editable install, a link to launchers/)."""

import os
from pathlib import Path
from typing import Dict

import pytest

from tests.harness import users

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("uctr", "uctr-exec")
LOGIN_PATH = users.login_path()


def new_user_env(home: Path, **extra: str) -> Dict[str, str]:
    """What a new user's login shell has: no PYTHONPATH, no UCTR_* settings."""
    return {"PATH": LOGIN_PATH, "HOME": str(home), "LANG": "C.UTF-8",
            "USER": users.TEST_USER, "LOGNAME": users.TEST_USER, **extra}


def in_checkout(path: str) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(REPO)


@pytest.fixture
def home(uctr, test_user) -> Path:
    return uctr.dirs(test_user).home


def which_as_user(run_as_test_user, name: str, home: Path) -> str:
    cp = run_as_test_user(["/bin/sh", "-c", f"command -v {name}"], env=new_user_env(home),
                          cwd="/")
    assert cp.returncode == 0 and cp.stdout.strip(), (
        f"{name} is not on the PATH of a new user ({LOGIN_PATH}): run scripts/install.sh")
    return cp.stdout.strip()


@pytest.mark.parametrize("name", COMMANDS)
def test_on_every_users_path_and_not_from_the_checkout(run_as_test_user, home, name):
    path = which_as_user(run_as_test_user, name, home)
    assert not in_checkout(path), f"{path} resolves into the checkout {REPO}"
    cp = run_as_test_user([name, "--help"], env=new_user_env(home), cwd="/")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith(f"usage: {name} ")


@pytest.mark.parametrize("name", COMMANDS)
def test_they_import_an_installed_package(run_as_test_user, home, name):
    script = os.path.realpath(which_as_user(run_as_test_user, name, home))
    with open(script, "rb") as f:
        shebang = f.readline().decode()
    assert shebang.startswith("#!"), f"{script} is not a console script: {shebang!r}"
    python = shebang[2:].split()[0]
    cp = run_as_test_user([python, "-c", "import uctr_batch; print(uctr_batch.__file__)"],
                          env=new_user_env(home), cwd="/")
    assert cp.returncode == 0, cp.stderr
    package = cp.stdout.strip()
    assert "site-packages" in Path(package).parts, f"{package} is not an installed package"
    assert not in_checkout(package), f"{name} runs the checkout's package {package}"


def test_the_user_guides_first_commands_as_written(run_as_test_user, uctr, home, pushed,
                                                   registry_http):
    ref = pushed["busybox"]
    env = new_user_env(home, UCTR_INSECURE_REGISTRIES=registry_http.host,
                       UCTR_LOCAL_DIR=str(uctr.dirs(users.TEST_USER).local))
    # the guide's first example: a mistyped name gets the documented error and hint
    cp = run_as_test_user(["uctr", "pull", "docker.io/Library/debian:12"], env=env, cwd=home)
    assert cp.returncode == 1
    assert 'error: repository name must be lowercase: "Library/debian"' in cp.stderr
    assert 'hint: did you mean "docker.io/library/debian:12"?' in cp.stderr
    cp = run_as_test_user(["uctr", "pull", ref], env=env, cwd=home)
    assert cp.returncode == 0, cp.stderr
    assert (home / ".cache" / "uctr").is_dir()  # the documented default cache
    cp = run_as_test_user(["uctr", "run", ref, "--", "echo", "hello from the image"],
                          env=env, cwd=home)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == "hello from the image\n"
