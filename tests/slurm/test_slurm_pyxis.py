"""pyxis job scripts run unchanged on the real cluster (issue 14): every pyxis option end to
end through the SPANK plugin, enroot image references, squashfs images, named containers
kept for later steps and removed by the epilog.

One module, one cluster session: the jobs of tests/slurm/pyxis_scripts/*.sh are submitted
together and waited for together, so the shared cluster is held as briefly as possible.
"""

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness.users import TEST_USER

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(
    not (shutil.which("mksquashfs") and shutil.which("sqfs2tar")),
    reason="needs squashfs-tools and squashfs-tools-ng (scripts/install.sh)")]

SCRIPTS = Path(__file__).parent / "pyxis_scripts"
UID = pwd.getpwnam(TEST_USER).pw_uid
LOCAL = f"/tmp/uctr-{UID}"
APPTAINER = shutil.which("apptainer")


def enroot_form(ref: str) -> str:
    """host:port/repo:tag -> host:port#repo:tag, as NGC documentation writes images."""
    registry, _, rest = ref.partition("/")
    return f"{registry}#{rest}"


def apptainer_image(root, sif):
    """ROOT as a SIF built by apptainer where it is installed (Debian sid), else a file with
    only a SIF header: enough for the nodes to tell that it is one, and to refuse it."""
    from tests.integration.test_sif_images import SIF_HEADER

    if APPTAINER:
        subprocess.run([APPTAINER, "build", str(sif), str(root)], check=True,
                       capture_output=True, stdin=subprocess.DEVNULL)
    else:
        sif.write_bytes(SIF_HEADER)
    os.chmod(sif, 0o644)
    return sif


@pytest.fixture(scope="module")
def images(slurm_cluster):
    """The placeholders' values; the files live on the shared path, readable by the user."""
    from tests.harness.images import busybox_layer, readable_layout
    from tests.harness.oci import ImageConfig
    from tests.integration.test_squashfs_images import enroot_like_rootfs, mksquashfs

    shared = slurm_cluster.path("pyxis-images")
    shutil.rmtree(shared, ignore_errors=True)
    shared.mkdir(parents=True)
    os.chmod(shared, 0o755)
    root = enroot_like_rootfs(shared / "rootfs")
    sqsh = mksquashfs(root, shared / "app.sqsh")
    sif = apptainer_image(root, shared / "app.sif")
    shutil.rmtree(root)
    entry = ["/bin/sh", "-c", 'export FROM_ENTRYPOINT=yes; exec "$@"', "entrypoint"]
    ep_image = readable_layout(shared / "ep-layout",
                               ImageConfig(entrypoint=entry, cmd=["/bin/sh"]), busybox_layer())
    return {"@IMAGE@": enroot_form(slurm_cluster.image_ref("busybox")), "@SQSH@": str(sqsh),
            "@SIF@": str(sif),
            "@EPIMAGE@": ep_image,
            # relative to the job's work dir (state/work/NAME), as a user writes ./img.sqsh
            "@RELSQSH@": os.path.relpath(sqsh, slurm_cluster.path("work", "x"))}


@pytest.fixture(scope="module")
def results(slurm_cluster, images):
    """Submit every script, then wait for all: {script name: (JobResult, key=value dict)}."""
    jobs = {}
    for script in sorted(SCRIPTS.glob("*.sh")):
        name = f"pyxis-{script.stem}"
        work = slurm_cluster.path("work", name)
        text = script.read_text()
        for key, value in dict(images, **{"@WORK@": str(work)}).items():
            text = text.replace(key, value)
        jobs[script.stem] = slurm_cluster.submit(text, name=name, args=["--time=5"])
    out = {}
    for stem, job_id in jobs.items():
        result = slurm_cluster.wait(job_id, timeout=600)
        values = dict(line.split("=", 1) for line in result.output.splitlines()
                      if "=" in line and " " not in line.split("=", 1)[0])
        out[stem] = (result, values)
    return out


def job(results, stem):
    result, values = results[stem]
    assert result.state == "COMPLETED", f"{stem}: {result.state}\n{result.output}"
    return values


def test_named_container_keeps_step1_for_step2_and_goes_with_the_job(slurm_cluster, results):
    values = job(results, "named_container")
    assert values["step2"] == "installed"
    assert values["unnamed"] == "clean"
    assert values["during"].split() == ["dev"]  # it was there while the job ran
    job_id = results["named_container"][0].job_id
    for node in ("node1", "node2"):  # the epilog removed the job's containers
        assert f"job-{job_id}" not in slurm_cluster.list_node_dir(node, f"{LOCAL}/containers")


def test_remap_root(results):
    values = job(results, "remap_root")
    assert values["remapped"] == "0"
    assert values["plain"] == values["host"] == str(UID)


def test_squashfs_image_on_every_node(results):
    result, _ = results["squashfs_image"]
    assert result.state == "COMPLETED", result.output
    lines = sorted(ln for ln in result.output.splitlines() if ln.startswith("greeting="))
    assert lines == ["greeting=from enroot node=0", "greeting=from enroot node=1"]


def test_sbatch_directives_and_a_relative_squashfs_path(results):
    assert job(results, "sbatch_directives")["sbatch"] == "from enroot/uid0"


def test_mounts_and_workdir(results):
    values = job(results, "mounts_workdir")
    assert values["read"].startswith("hello-from-host")
    assert "cwd=/data" in values["read"] and values["ro"] == "yes"


def test_entrypoint_default_is_pyxis_s(results):
    values = job(results, "entrypoint")
    assert (values["default"], values["with"], values["without"]) == ("unset", "yes", "unset")


def test_save_then_run_the_saved_image(results):
    assert job(results, "save_and_reuse")["saved"] == "from-step-1"


def test_pyxis_environment_defaults(results):
    values = job(results, "env_defaults")
    assert (values["pwd"], values["cli"], values["uid"]) == ("/etc", "/bin", "0")


def test_refusals_name_the_option(slurm_cluster, images):
    bad = {
        "--container-name=a/b": "--container-name=a/b",
        "--container-name=box:sometimes": "the flag after ':'",
        "--container-save=/tmp/dir/": "target is a directory",
        "--container-mounts=tmpfs:/scratch": "tmpfs and umount sources are not supported",
        "--container-mounts=/tmp:/t:noexec": "mount flags",
    }
    for option, message in bad.items():
        result = slurm_cluster.srun(["-N1", "-n1", "--time=1",
                                     f"--container-image={images['@IMAGE@']}", option, "true"],
                                    timeout=120)
        assert result.returncode != 0 and message in result.stderr, (option, result.stderr)
    daemon = slurm_cluster.srun(["-N1", "-n1", "--time=1", "--container-image=dockerd://busybox",
                                 "true"], timeout=120)
    assert daemon.returncode != 0 and "docker save" in daemon.stderr, daemon.stderr


def test_sif_image_runs_in_s1_or_fails_with_the_reason(slurm_cluster, images):
    """--container-image=PATH.sif: run by apptainer (mode S1) on nodes that have it; on nodes
    without it, the step fails with the image, the reason and the alternative."""
    result = slurm_cluster.srun(["-N1", "-n1", "--time=2", f"--container-image={images['@SIF@']}",
                                 "sh", "-c", "echo sif-uid=$(id -u)"], timeout=300)
    if APPTAINER:
        assert result.returncode == 0 and f"sif-uid={UID}" in result.stdout, result.stderr
    else:
        assert result.returncode != 0, result.stdout
        for words in (images["@SIF@"], "Apptainer image (SIF)", "not installed",
                      "apptainer build --sandbox"):
            assert words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_save_on_every_node_of_a_multinode_step(results):
    """pyxis: each node's last task exports its own container."""
    values = job(results, "save_multinode")
    assert values["local"].split() == ["node1", "node2"]  # each node saved its own
    assert values["shared"] in ("node1", "node2")  # one node's complete image, which runs


def test_exec_attaches_to_the_running_container(results):
    values = job(results, "attach_running")
    assert (values["attached"], values["own"]) == ("up", "not-mounted")
