"""uctr-exec's command line and UCTR_* settings: the contract with the SPANK plugin and the
PBS hooks (docs/launcher.md)."""

import pytest

from uctr_batch.errors import UsageError
from uctr_batch.launch import options

CASES = [
    ("image and command", ["busybox", "echo", "-v", "x"], {},
     dict(image="busybox", command=["echo", "-v", "x"])),
    ("-- separates the command", ["img", "--", "--weird"], {},
     dict(image="img", command=["--weird"])),
    ("options stop at the image", ["--mode", "N1", "-v", "/a:/b:ro", "-e", "K=V", "-w", "/w",
                                   "img", "-e", "app-arg"], {},
     dict(mode="N1", volumes=["/a:/b:ro"], env=["K=V"], workdir="/w", image="img",
          command=["-e", "app-arg"])),
    ("--opt=value and -vVALUE", ["--mpi=auto", "--gpu=none", "-v/x", "-eA=1", "img"], {},
     dict(mpi="auto", gpu="none", volumes=["/x"], env=["A=1"], command=[])),
    ("settings from the environment", ["img", "app"],
     {"UCTR_MODE": "P1", "UCTR_MPI": "none", "UCTR_GPU": "nvidia", "UCTR_WORKDIR": "/data",
      "UCTR_MOUNTS": "/scratch,/a:/b:ro+nosuid,/c:/d:rw", "UCTR_ENV_NAMES": "FOO, BAR",
      "UCTR_WRITABLE": "1", "UCTR_MOUNT_HOME": "0", "UCTR_VERBOSE": "2"},
     dict(mode="P1", mpi="none", gpu="nvidia", workdir="/data",
          volumes=["/scratch:/scratch:rw", "/a:/b:ro", "/c:/d:rw"], env=["FOO", "BAR"],
          writable=True, mount_home=False, verbosity=2)),
    ("flags win over the environment", ["--mode", "N1", "--verbose", "-v", "/e", "img"],
     {"UCTR_MODE": "P1", "UCTR_MOUNTS": "/m", "UCTR_VERBOSE": "1"},
     dict(mode="N1", volumes=["/m:/m:rw", "/e"], verbosity=2, verbose_flags=1)),
    ("SPANK rewrote argv[0]: nothing is parsed", ["--mode", "-v", "x"],
     {"UCTR_ARGV0": "/usr/bin/app", "UCTR_IMAGE": "docker.io/library/debian:12"},
     dict(image="docker.io/library/debian:12", command=["/usr/bin/app", "--mode", "-v", "x"],
          mode=None, volumes=[])),
    ("UCTR_IMAGE with an explicit --", ["--", "app", "arg"], {"UCTR_IMAGE": "img"},
     dict(image="img", command=["app", "arg"])),
    ("UCTR_IMAGE, image from the environment only", [], {"UCTR_IMAGE": "img"},
     dict(image="img", command=[])),
]


@pytest.mark.parametrize("name,argv,env,expected", CASES, ids=[c[0] for c in CASES])
def test_parse(name, argv, env, expected):
    opts = options.parse(argv, env)
    for key, value in expected.items():
        assert getattr(opts, key) == value, key


ERRORS = [
    ("no image", [], {}, "no image given"),
    ("unknown option", ["--frobnicate", "img"], {}, "unknown option: --frobnicate"),
    ("missing value", ["--mode"], {}, "option --mode needs a value"),
    ("bad gpu", ["--gpu", "intel", "img"], {}, "unknown --gpu value: intel"),
    ("relative workdir", ["-w", "rel", "img"], {}, "working directory must be absolute"),
    ("ARGV0 without IMAGE", ["x"], {"UCTR_ARGV0": "app"},
     "UCTR_ARGV0 is set but UCTR_IMAGE is not"),
    ("bad pyxis mount", ["img"], {"UCTR_MOUNTS": "/a:/b:ro:x"}, "bad mount in UCTR_MOUNTS"),
]


@pytest.mark.parametrize("name,argv,env,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_usage_errors(name, argv, env, message):
    with pytest.raises(UsageError) as info:
        options.parse(argv, env)
    assert message in info.value.message
    assert info.value.exit_code == 2


def test_help_stops_parsing():
    assert options.parse(["--help", "not", "parsed"], {}).help


def test_pyxis_mount_flags():
    assert options.pyxis_mount("/src:/dst:ro+rprivate") == "/src:/dst:ro"
    assert options.pyxis_mount("/src:/dst") == "/src:/dst:rw"
    assert options.pyxis_mount("/src") == "/src:/src:rw"
