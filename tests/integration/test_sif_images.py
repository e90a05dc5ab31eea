"""Apptainer images (SIF files) as images: run as they are in mode S1 where apptainer exists,
and a clear error (exit 3, with the alternative) where it does not (uctr_batch/image/sif.py).

Three parts:
- the refusals, on any machine: apptainer missing, a policy without S1, another mode asked
  for, --name/--save, `uctr create` (a SIF is never unpacked);
- real runs with apptainer, as the unprivileged test user: `uctr run` and uctr-exec, the
  environment, identity, exit status, runscript, read-only image and --writable, binds;
- on a machine without apptainer, the real runs inside the Debian sid root, which packages
  apptainer (tests/harness/slurmroot.py): the SIF is built there with `apptainer build`
  from a busybox root filesystem, offline.
"""

import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.harness import slurmroot, users
from tests.integration.exec_helpers import Node, step_env
from tests.integration.test_squashfs_images import enroot_like_rootfs

USER = users.TEST_USER
APPTAINER = shutil.which("apptainer")
needs_apptainer = pytest.mark.skipif(APPTAINER is None, reason="apptainer is not installed here "
                                     "(test_sif_runs_in_the_sid_root runs these there)")
needs_no_apptainer = pytest.mark.skipif(APPTAINER is not None,
                                        reason="apptainer is installed here")
# the first 32 bytes of a SIF are a launch line, then comes the magic (enough for the checks)
SIF_HEADER = b"#!/usr/bin/env run-singularity\n".ljust(32, b"\0") + b"SIF_MAGIC\0" + b"\0" * 64
POLICY_WITHOUT_S1 = "version: 1\ndefaults:\n  modes: [P1, N1]\n  user_modes: [P1, N1]\n"
IMAGE_PATH = "/bin:/opt/from-image"


def shared_dir(harness, name):
    """A directory every user can traverse, under the harness root."""
    d = harness.root / f"{name}-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    d.chmod(0o755)
    return d


@pytest.fixture
def header_only(harness):
    """A file that is a SIF by its header (not named .sif: the magic alone decides)."""
    path = shared_dir(harness, "sifhead") / "app.img"
    path.write_bytes(SIF_HEADER)
    path.chmod(0o644)
    return path


def refused(result, code, *words):
    assert result.returncode == code, result.stderr
    assert "error:" in result.stderr and "hint:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


# -- refusals ---------------------------------------------------------------------------------

@needs_no_apptainer
def test_without_apptainer_the_error_names_the_image_and_the_way_out(uctr, header_only):
    result = uctr("run", header_only, "true")
    refused(result, 3, str(header_only), "Apptainer image (SIF)", "not installed",
            "apptainer build --sandbox")


@needs_no_apptainer
def test_uctr_exec_gives_the_same_error(tmp_path, header_only):
    result = Node(tmp_path).run(header_only, "true")
    refused(result, 3, str(header_only), "not installed", "apptainer build --sandbox")


def test_a_policy_without_s1_is_a_clear_error(uctr, harness, header_only):
    policy = shared_dir(harness, "policy") / "policy.yaml"
    policy.write_text(POLICY_WITHOUT_S1)
    result = uctr("run", header_only, "true", env={"UCTR_POLICY": str(policy)})
    refused(result, 3, str(header_only), "does not allow mode S1", "add S1")


def test_another_mode_is_refused(uctr, header_only):
    refused(uctr("run", "--mode", "P1", header_only, "true"), 3, "runs only in mode S1",
            "not in mode P1")


@pytest.mark.parametrize("option", ["--name=box", "--save=/tmp/never.sqsh"])
def test_named_container_and_save_are_refused_not_ignored(uctr, header_only, option):
    refused(uctr("run", option, header_only, "true"), 1, option.split("=")[0],
            "read-only", str(header_only))


def test_uctr_exec_names_the_pyxis_option(tmp_path, header_only):
    result = Node(tmp_path).run("--name", "box", header_only, "true")
    refused(result, 1, "--container-name", str(header_only))


def test_a_link_is_followed_and_the_error_names_what_was_given(uctr, header_only):
    link = header_only.parent / "current.sif"
    link.symlink_to(header_only.name)
    result = uctr("run", "--mode", "P1", link, "true")
    refused(result, 3, str(link))


def test_a_sif_is_never_unpacked(uctr, header_only):
    refused(uctr("create", header_only), 1, "Apptainer/Singularity image (SIF)",
            "never unpacks it")


def test_the_prolog_records_a_user_error_without_staging(harness, header_only, tmp_path):
    """The prolog (and PBS hook) stage step: nothing is copied or unpacked; a node that
    cannot run the SIF fails the job with the reason, as a user error (the node stays up)."""
    from uctr_batch.batch import stage

    policy = shared_dir(harness, "policy") / "policy.yaml"
    policy.write_text(POLICY_WITHOUT_S1)
    env = {"UCTR_POLICY": str(policy), "UCTR_LOCAL_DIR": str(tmp_path / "local"),
           "UCTR_CACHE": str(tmp_path / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        outcome = stage.stage_outcome(str(header_only))
    assert outcome["status"] == "error" and outcome["fault"] == stage.USER, outcome
    assert "does not allow mode S1" in outcome["message"] and outcome["hint"]
    assert not (tmp_path / "local" / "bundles").exists()


# -- real runs (apptainer installed) ----------------------------------------------------------

@pytest.fixture(scope="module")
def app_sif(harness):
    """A SIF built by apptainer from a busybox rootfs, with apptainer's environment script
    (PATH and a variable of the image) and a runscript."""
    if APPTAINER is None:
        pytest.skip("apptainer is not installed here")
    d = shared_dir(harness, "sif")
    root = enroot_like_rootfs(d / "root")
    meta = root / ".singularity.d"
    (meta / "env").mkdir(parents=True)
    (meta / "env" / "90-environment.sh").write_text(
        f"export PATH={IMAGE_PATH}\nexport FROM_IMAGE=image\n")
    (meta / "runscript").write_text('#!/bin/sh\necho "runscript ran: $*"\n')
    (meta / "runscript").chmod(0o755)
    sif = d / "app.sif"
    done = subprocess.run([APPTAINER, "build", str(sif), str(root)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    sif.chmod(0o644)
    return sif


def ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_apptainer
def test_uctr_run_runs_the_sif_as_the_user(uctr, app_sif):
    out = ok(uctr("run", "-e", "BY_E=set", app_sif, "--", "sh", "-c",
                  'id -u; echo "$FROM_IMAGE $BY_E"; echo "$PATH"', user=USER))
    assert out.split("\n")[:3] == [str(pwd.getpwnam(USER).pw_uid), "image set", IMAGE_PATH], out


@needs_apptainer
def test_exit_status_and_runscript(uctr, app_sif):
    assert uctr("run", app_sif, "sh", "-c", "exit 7", user=USER).returncode == 7
    assert ok(uctr("run", app_sif, user=USER)).strip() == "runscript ran:"


@needs_apptainer
def test_the_image_is_read_only_and_binds_work(uctr, app_sif):
    data = uctr.dirs(USER).home / "data"
    data.mkdir()
    users.chown_tree(data, USER)
    result = uctr("run", "-v", f"{data}:/data", app_sif, "sh", "-c",
                  "touch /in-image 2>/dev/null && echo wrote; echo out > /data/f", user=USER)
    assert ok(result).strip() == ""  # the image itself cannot be written
    assert (data / "f").read_text() == "out\n" and (data / "f").stat().st_uid == \
        pwd.getpwnam(USER).pw_uid


@needs_apptainer
def test_a_link_runs_its_target(uctr, app_sif):
    link = app_sif.parent / "latest.sif"
    if not link.exists():
        link.symlink_to(app_sif.name)
    result = uctr("run", "--dry-run", link, "true", user=USER)
    assert f'"rootfs": "{app_sif}"' in ok(result)
    assert ok(uctr("run", link, "echo", "via link", user=USER)).strip() == "via link"


@needs_apptainer
def test_uctr_exec_runs_a_rank_with_the_step_environment(harness, app_sif):
    node = Node(harness.root, user=USER)
    env = step_env("41", "0", 1)
    out = ok(node.run(app_sif, "sh", "-c", 'echo "$SLURM_PROCID $FROM_IMAGE"; touch /x || '
                      "echo read-only", env=env))
    assert out.split("\n")[:2] == ["0 image", "read-only"], out
    # --container-writable: a tmpfs over the image, gone when the step ends
    out = ok(node.run("--writable", app_sif, "sh", "-c", "echo w > /x && cat /x", env=env))
    assert out.strip() == "w"
    assert ok(node.run("--remap-root", app_sif, "id", "-u", env=env)).strip() == "0"
    assert node.bundles() == []  # nothing unpacked on the node


@needs_apptainer
def test_a_rank_in_a_sif_reaches_its_pmix_server_directory(harness, app_sif):
    """srun --mpi=pmix hands a rank PMIX_SERVER_TMPDIR (Slurm: <SlurmdSpoolDir>/pmix.J.S),
    which apptainer does not bind by itself: without it the rank cannot reach its server."""
    # where slurmd puts it, outside /tmp and $HOME (which a rank gets anyway)
    server = Path(tempfile.mkdtemp(prefix="pmix.43.0-", dir="/var/spool"))
    try:
        server.chmod(0o755)
        (server / "usock").write_text("server socket stands here\n")
        (server / "usock").chmod(0o644)
        env = dict(step_env("43", "0", 1), PMIX_SERVER_TMPDIR=str(server),
                   PMIX_NAMESPACE="slurm.pmix.43.0", PMIX_RANK="0")
        out = ok(Node(harness.root, user=USER).run(
            app_sif, "sh", "-c",
            'echo "$PMIX_NAMESPACE $PMIX_RANK"; cat "$PMIX_SERVER_TMPDIR/usock"', env=env))
    finally:
        shutil.rmtree(server, ignore_errors=True)
    assert out.split("\n")[:2] == ["slurm.pmix.43.0 0", "server socket stands here"], out


# -- the real runs in the Debian sid root, where apptainer is packaged -------------------------

@needs_no_apptainer
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sif_runs_in_the_sid_root():
    why = slurmroot.missing_prerequisites()
    if why:
        pytest.skip(why)
    if "sid" not in slurmroot.selected_releases():
        pytest.skip("UCTR_SLURM_MATRIX leaves out the sid root")
    if Path("/etc/uctr-root.json").exists():  # the marker every release root carries
        pytest.skip("already inside a Debian release root (roots do not nest)")
    result = slurmroot.run_in_root("sid", [
        slurmroot.VENV_PYTHON, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
        "tests/integration/test_sif_images.py"], timeout=1500)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    # everything ran there except the tests of a machine without apptainer
    skipped = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    assert all("apptainer is installed here" in line for line in skipped), skipped
    assert "passed" in output and "apptainer is not installed here" not in output, output[-3000:]
