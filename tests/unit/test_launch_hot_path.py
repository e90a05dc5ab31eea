"""The per-rank hot path stays lean: with the image staged and the policy cached, ranks
import neither the network and YAML stacks nor (with the step's container set up, or
outside a launcher) the heavier parts of the standard library. sys.modules is recorded
at the moment the payload replaces the process, through a descriptor opened before (the
rank is inside the container by then); python -X importtime would miss what
importlib.import_module loads.

The rank that sets up a step's container under a launcher computes the step's PMI part
with inject.pmi/inject.plan (per step, not per rank) and writes its manifest: it may use
inject.plan, nothing else heavy (every step of a job waits for it): not json, re or
collections either, which cost it ~5 ms together.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NEVER = ("requests", "urllib3", "yaml", "jsonschema", "hostlist", "zstandard", "isal")
HEAVY = ("json", "re", "enum", "collections", "typing", "dataclasses", "logging", "argparse", "pathlib", "socket",
         "tempfile", "hashlib", "uctr_batch.inject.plan", "uctr_batch.policy.model",
         "uctr_batch.run")
CREATOR_MAY = ("uctr_batch.inject.plan",)  # the step's PMI part and its manifest


def _env(tmp_path, **extra):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO),
           "UCTR_CACHE": str(tmp_path / "cache"), "UCTR_LOCAL_DIR": str(tmp_path / "local"),
           "PYTHONDONTWRITEBYTECODE": "1", "SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0",
           "SLURM_PROCID": "0", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NUM_TASKS": "2"}
    env.update(extra)
    return env


WRAPPER = """
import os, sys
fd = os.open(%r, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
real_execve = os.execve
def execve(path, argv, env):
    os.write(fd, "\\n".join(sorted(sys.modules)).encode())
    real_execve(path, argv, env)
os.execve = execve
from uctr_batch.launch.main import main
raise SystemExit(main())
"""


def _argv(*args, record=None):
    if record is None:
        code = "from uctr_batch.launch.main import main; raise SystemExit(main())"
    else:
        code = WRAPPER % str(record)
    return [sys.executable, "-S", "-c", code, *args]


def _imported(path):
    with open(path) as f:
        return set(f.read().split())


@pytest.fixture
def image(test_images):
    return test_images["busybox"].oci_ref


def test_warm_creator_and_joiner_import_only_small_modules(image, tmp_path):
    env = _env(tmp_path)
    cold = subprocess.run(_argv(image, "true"), env=env, capture_output=True, text=True,
                          timeout=120)
    assert cold.returncode == 0, cold.stderr  # staged, policy and recipe cached
    warm = subprocess.run(_argv("--verbose", image, "true", record=tmp_path / "warm"),
                          env=dict(env, SLURM_STEP_ID="2"), capture_output=True, text=True,
                          timeout=60)  # another step: creates its own container
    assert warm.returncode == 0, warm.stderr
    assert "injection manifest" in warm.stderr
    creator = _imported(tmp_path / "warm")
    assert "uctr_batch.launch.main" in creator and "uctr_batch.inject.pmi" in creator
    heavy = set(NEVER + HEAVY) - set(CREATOR_MAY)
    assert not creator & heavy, sorted(creator & heavy)

    # The first step of another job reads the recipe too: the default policy names no job
    # in a path (recipe.names_the_job), so the recipe is the node's, not the job's.
    other = subprocess.run(_argv(image, "true", record=tmp_path / "other"),
                           env=dict(env, SLURM_JOB_ID="10"), capture_output=True, text=True,
                           timeout=60)
    assert other.returncode == 0, other.stderr
    creator = _imported(tmp_path / "other")
    assert "uctr_batch.inject.pmi" in creator and not creator & heavy, sorted(creator & heavy)

    # A recipe that must be built (here: a new working directory; -w shapes the container)
    # builds it (run.build_spec, the policy model, the planners): still no typing, and
    # logging only to log.
    first = subprocess.run(_argv("-w", "/tmp", image, "true", record=tmp_path / "first"),
                           env=dict(env, SLURM_JOB_ID="11"), capture_output=True, text=True,
                           timeout=60)
    assert first.returncode == 0, first.stderr
    creator = _imported(tmp_path / "first")
    assert "uctr_batch.run" in creator and "uctr_batch.inject.pmi" in creator
    banned = set(NEVER) | {"typing", "logging"}
    assert not creator & banned, sorted(creator & banned)

    alone = {k: v for k, v in env.items() if not k.startswith("SLURM_")}  # no launcher
    assert subprocess.run(_argv(image, "true"), env=alone, timeout=60).returncode == 0  # recipe
    single = subprocess.run(_argv(image, "true", record=tmp_path / "single"), env=alone,
                            capture_output=True, text=True, timeout=60)
    assert single.returncode == 0, single.stderr
    creator = _imported(tmp_path / "single")
    assert "uctr_batch.modes.n1" in creator
    assert not creator & set(NEVER + HEAVY), sorted(creator & set(NEVER + HEAVY))

    anchor = subprocess.Popen(_argv(image, "sh", "-c", "stat -L -c %i /proc/self/ns/mnt; sleep 5"),
                              env=dict(env, SLURM_STEP_ID="3"), stdout=subprocess.PIPE, text=True)
    try:
        mnt = anchor.stdout.readline().strip()
        joined = subprocess.run(
            _argv("--verbose", "--verbose", image, "stat", "-L", "-c", "%i", "/proc/self/ns/mnt",
                  record=tmp_path / "joiner"),
            env=dict(env, SLURM_STEP_ID="3", SLURM_PROCID="1"), capture_output=True, text=True,
            timeout=60, cwd=str(tmp_path))  # another working directory than the creator's
    finally:
        anchor.kill()
        anchor.wait()
    assert joined.returncode == 0, joined.stderr
    assert joined.stdout.strip() == mnt and "joining the step's container" in joined.stderr
    joiner = _imported(tmp_path / "joiner")
    assert "uctr_batch.launch.sharedns" in joiner
    assert not joiner & set(NEVER + HEAVY), sorted(joiner & set(NEVER + HEAVY))
