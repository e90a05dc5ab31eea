"""The SPANK plugin's option parsing (spank/uctr_args.c) under ASan/UBSan: pyxis's options,
their PYXIS_CONTAINER_* / UCTR_CONTAINER_* defaults and precedence, and the refusals."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).parent / "c" / "spank_args_driver.c"

pytestmark = pytest.mark.skipif(
    not (shutil.which("cc") and Path("/usr/include/slurm/spank.h").exists()),
    reason="needs a C compiler and libslurm-dev")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    out = tmp_path_factory.mktemp("spank") / "driver"
    argv = ["cc", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-g",
            "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-I/usr/include", str(DRIVER), "-o", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def run(driver, *args, env=None):
    done = subprocess.run([str(driver), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})
    assert "Sanitizer" not in done.stderr and "runtime error" not in done.stderr, done.stderr
    values = dict(line.split("=", 1) for line in done.stdout.splitlines()
                  if "=" in line and not line.startswith("error: "))
    errors = [line for line in done.stdout.splitlines() if line.startswith("error: ")]
    return done.returncode, values, errors


def test_pyxis_options(driver):
    rc, v, errors = run(driver, "--container-image=nvcr.io#nvidia/pytorch:24.01-py3",
                        "--container-name=dev:no_exec", "--container-save=/tmp/x.sqsh",
                        "--container-remap-root", "--no-container-entrypoint",
                        "--container-entrypoint-log", "--container-mounts=./data:/data:ro+rprivate")
    assert rc == 0 and not errors
    assert (v["image"], v["name"], v["save"]) == ("nvcr.io#nvidia/pytorch:24.01-py3",
                                                 "dev:no_exec", "/tmp/x.sqsh")
    assert (v["remap_root"], v["entrypoint"], v["entrypoint_log"]) == ("1", "0", "1")


def test_environment_precedence(driver):
    env = {"PYXIS_CONTAINER_IMAGE": "pyxis-img", "UCTR_CONTAINER_IMAGE": "uctr-img",
           "PYXIS_CONTAINER_WORKDIR": "/p", "PYXIS_CONTAINER_REMAP_ROOT": "true",
           "PYXIS_CONTAINER_READONLY": "yes", "PYXIS_CONTAINER_NAME": "pyx"}
    rc, v, _ = run(driver, env=env)
    assert rc == 0
    assert (v["image"], v["workdir"], v["remap_root"], v["writable"], v["name"]) == \
        ("uctr-img", "/p", "1", "0", "pyx")  # UCTR_ beats PYXIS_; READONLY is !WRITABLE
    rc, v, _ = run(driver, "--container-image=cli", "--no-container-remap-root", env=env)
    assert (v["image"], v["remap_root"]) == ("cli", "0")  # the command line beats both


@pytest.mark.parametrize("args,env,message", [
    (["--container-name=a/b"], {}, "--container-name=a/b: a name is"),
    (["--container-name=box:maybe"], {}, "the flag after ':'"),
    (["--container-name=" + "n" * 65], {}, "a name is 1-64"),
    (["--container-save=/tmp/dir/"], {}, "--container-save=/tmp/dir/: target is a directory"),
    (["--container-mounts=tmpfs:/scratch"], {}, "tmpfs and umount sources are not supported"),
    (["--container-mounts=/a:/b:ro+noexec"], {}, "supports the mount flags"),
    (["--container-unshare=net"], {}, "--container-unshare=net: not supported"),
    ([], {"PYXIS_CONTAINER_REMAP_ROOT": "maybe"}, "PYXIS_CONTAINER_REMAP_ROOT=maybe: expected"),
])
def test_refusals_name_the_option(driver, args, env, message):
    rc, _, errors = run(driver, *args, env=env)
    assert rc == 1 and errors and message in errors[0], errors


def test_slurm_owned_names_are_not_registered(driver):
    for name in ("--container=img", "--runtime=x"):
        rc, _, _ = run(driver, name)
        assert rc == 2
