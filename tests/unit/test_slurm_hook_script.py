"""The Prolog/Epilog scripts `uctr slurm install` writes end before Python starts for a job
the SPANK client marked as submitted without an image, exactly where prolog() and epilog()
would have nothing to do; every other job reaches Python. Run with /bin/sh, as slurmd does,
against a stand-in for the interpreter that records that it was started."""

import subprocess
from pathlib import Path

import pytest

from uctr_batch.batch import slurm


@pytest.fixture
def hook(tmp_path):
    ran = tmp_path / "python-ran"
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\necho \"$@\" > {ran}\nexit 7\n")
    python.chmod(0o755)
    run_dir = tmp_path / "run"
    plan = slurm.InstallPlan(tmp_path / "prefix", tmp_path, str(python), None, None)

    def run(kind, **env):
        ran.unlink(missing_ok=True)
        script = tmp_path / f"slurm-{kind}"
        script.write_text(plan.hook_script(kind, tmp_path / f"{kind}.py"))
        script.chmod(0o755)
        base = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "42", "UCTR_RUN_DIR": str(run_dir)}
        code = subprocess.run([str(script)], env=dict(base, **env)).returncode
        return code, ran.exists()
    run.run_dir = run_dir
    return run


@pytest.mark.parametrize("kind", ["prolog", "epilog"])
def test_a_job_marked_without_image_starts_no_python(hook, kind):
    assert hook(kind, SPANK_UCTR_NO_IMAGE="1") == (0, False)


@pytest.mark.parametrize("kind", ["prolog", "epilog"])
@pytest.mark.parametrize("env", [
    {},  # no mark: submitted without the plugin (slurmrestd); Python asks the controller
    {"SPANK_UCTR_NO_IMAGE": "yes"},  # only the exact value counts
    {"SPANK_UCTR_NO_IMAGE": "1", "SPANK_UCTR_IMAGE": "busybox@sha256:" + "0" * 64},
    {"SPANK_UCTR_IMAGE": "busybox:1"},
])
def test_every_other_job_reaches_python(hook, kind, env):
    assert hook(kind, **env) == (7, True)


@pytest.mark.parametrize("left", ["readiness", "containers"])
def test_the_epilog_still_cleans_what_such_a_job_left(hook, left):
    (hook.run_dir / left).mkdir(parents=True)
    (hook.run_dir / left / "42").write_text("")
    assert hook("epilog", SPANK_UCTR_NO_IMAGE="1") == (7, True)
    assert hook("prolog", SPANK_UCTR_NO_IMAGE="1") == (0, False)
    (hook.run_dir / left / "42").rename(hook.run_dir / left / "43")  # another job's
    assert hook("epilog", SPANK_UCTR_NO_IMAGE="1") == (0, False)
