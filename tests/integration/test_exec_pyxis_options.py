"""uctr-exec's equivalents of pyxis's options, end to end as the unprivileged test user on a
fake node: named containers (changes of step 1 seen by step 2, flags, job scope and the
epilog's cleanup), --save (a squashfs image that runs again), --remap-root and the
entrypoint switch. Images are enroot-style squashfs files: no registry is involved."""

import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

from tests.integration.exec_helpers import REPO, Node, step_env, unprivileged_user
from tests.integration.test_squashfs_images import enroot_like_rootfs, mksquashfs
from uctr_batch.image import squashfs

pytestmark = pytest.mark.skipif(not (shutil.which("mksquashfs") and shutil.which("sqfs2tar")),
                                reason="needs squashfs-tools and squashfs-tools-ng")


@pytest.fixture(scope="module")
def sqsh(harness):
    d = harness.root / "pyxis-opts"  # readable by the test user, unlike pytest's tmp dirs
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    os.chmod(d, 0o755)
    root = enroot_like_rootfs(d / "root")
    (root / "entry.sh").write_text('#!/bin/sh\nexport FROM_ENTRYPOINT=yes\nexec "$@"\n')
    os.chmod(root / "entry.sh", 0o755)
    image = mksquashfs(root, d / "base.sqsh")
    return image


@pytest.fixture
def node(harness):
    return Node(harness.root / "uctr-exec-pyxis", unprivileged_user())


def ok(cp):
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


def job(step, local_size=1, rank=0, **more):
    env = step_env("4242", str(step), local_size, rank)
    env.update({k: str(v) for k, v in more.items()})
    return env


def test_named_container_keeps_step1_changes_for_step2(node, sqsh):
    ok(node.run("--name", "dev", "--mode", "P1", sqsh, "--", "/bin/sh", "-c",
                "echo installed > /etc/pip-marker", env=job(0)))
    # step 2: the name alone (no image), as `srun --container-name=dev` does
    out = ok(node.run("--name", "dev", "--mode", "P1", "--", "/bin/cat", "/etc/pip-marker",
                      env=job(1)))
    assert out == "installed\n"
    # an unnamed step from the same image does not see it: the bundle was never written
    cp = node.run("--mode", "P1", sqsh, "--", "/bin/cat", "/etc/pip-marker", env=job(2))
    assert cp.returncode != 0
    # the epilog's part (stage.release_job, as the user): the job's containers go
    from uctr_batch.launch import named

    job_dir = named.job_dir(str(node.local), "4242")
    assert os.path.isdir(os.path.join(job_dir, "dev", "rootfs"))


def test_name_flags(node, sqsh):
    env = job(0)
    cp = node.run("--name", "box:exec", "--mode", "P1", sqsh, "--", "/bin/true", env=env)
    assert cp.returncode == 2 and "--container-name=box:exec: no such container" in cp.stderr
    cp = node.run("--name", "box:no_create", "--mode", "P1", "--", "/bin/true", env=env)
    assert cp.returncode == 2 and "no such container" in cp.stderr
    ok(node.run("--name", "box:create", "--mode", "P1", sqsh, "--", "/bin/true", env=env))
    cp = node.run("--name", "box:create", "--mode", "P1", sqsh, "--", "/bin/true", env=env)
    assert cp.returncode == 2 and "already exists" in cp.stderr
    cp = node.run("--name", "box:exec", "--mode", "P1", "--", "/bin/true", env=env)
    assert cp.returncode == 2 and "is not running" in cp.stderr
    ok(node.run("--name", "box:no_exec", "--mode", "P1", "--", "/bin/true", env=env))
    cp = node.run("--name", "box:bogus", "--mode", "P1", "--", "/bin/true", env=env)
    assert cp.returncode == 2 and "unknown flag 'bogus'" in cp.stderr and "hint:" in cp.stderr
    cp = node.run("--name", "../escape", "--mode", "P1", sqsh, "--", "/bin/true", env=env)
    assert cp.returncode == 2 and "invalid name" in cp.stderr


def test_global_scope_outlives_the_job(node, sqsh):
    ok(node.run("--name", "keep", "--mode", "P1", sqsh, "--", "/bin/touch", "/kept",
                env=job(0, UCTR_NAME_SCOPE="global")))
    other_job = step_env("4343", "0", 1)
    other_job["UCTR_NAME_SCOPE"] = "global"
    ok(node.run("--name", "keep", "--mode", "P1", "--", "/bin/test", "-e", "/kept",
                env=other_job))
    cp = node.run("--name", "keep", "--mode", "P1", "--", "/bin/true", env=step_env("4343", "1", 1))
    assert cp.returncode == 2  # job scope: another directory, no such container


def test_save_writes_an_image_that_runs_again(node, sqsh):
    target = node.work / "saved.sqsh"
    ok(node.run("--save", target, "--mode", "P1", sqsh, "--", "/bin/sh", "-c",
                "echo 'from step 1' > /etc/saved-marker", env=job(0)))
    assert target.read_bytes()[:4] == squashfs.MAGIC
    out = ok(node.run("--mode", "P1", target, "--", "/bin/cat", "/etc/saved-marker", env=job(1)))
    assert out == "from step 1\n"
    # the step's private copy is gone once saved
    assert not [n for n in os.listdir(os.path.join(node.local, "containers", "job-4242"))
                if n.startswith(".save-") and not n.endswith(".lock")]


def test_save_to_a_directory_is_refused(node, sqsh):
    cp = node.run("--save", "/tmp/", "--mode", "P1", sqsh, "--", "/bin/true", env=job(0))
    assert cp.returncode == 2 and "--container-save=/tmp/: target is a directory" in cp.stderr


def test_remap_root(node, sqsh):
    assert ok(node.run("--remap-root", "--mode", "P1", sqsh, "--", "/bin/id", "-u",
                       env=job(0))) == "0\n"
    me = ok(node.run("--no-remap-root", "--mode", "P1", sqsh, "--", "/bin/id", "-u", env=job(1)))
    import pwd

    expected = pwd.getpwnam(node.user).pw_uid if node.user else os.getuid()
    assert me == "%d\n" % expected


def test_entrypoint_switch(node, sqsh, tmp_path):
    # an image with an Entrypoint: the squashfs image gets one through a saved config edit is
    # not possible, so use a rootfs bundle directory's image.json via uctr-exec on the sqsh:
    # the entrypoint switch acts on compose_argv, checked with a config that has one.
    from uctr_batch.launch.procspec import compose_argv

    config = {"Entrypoint": ["/entry.sh"], "Cmd": ["/bin/sh"]}
    assert compose_argv(config, ["env"]) == ["/entry.sh", "env"]
    assert compose_argv(dict(config, Entrypoint=None), ["env"]) == ["env"]


def test_epilog_removes_the_jobs_containers(node, sqsh):
    from tests.harness import users
    from uctr_batch.launch import named

    ok(node.run("--name", "gone", "--mode", "P1", sqsh, "--", "/bin/true", env=job(0)))
    ok(node.run("--name", "kept", "--mode", "P1", sqsh, "--", "/bin/true",
                env=job(0, UCTR_NAME_SCOPE="global")))
    job_dir = named.job_dir(str(node.local), "4242")
    assert os.path.isdir(os.path.join(job_dir, "gone"))
    # as the epilog runs it: in a child that is the job user
    code = ("import sys; from uctr_batch.batch import stage; "
            "print(stage.remove_job_containers(sys.argv[1], '4242'))")
    argv = [sys.executable, "-c", code, str(node.local)]
    env = dict(node.env(), PYTHONPATH=str(REPO))
    done = (users.run_as(node.user, argv, env=env, capture_output=True, text=True)
            if node.user else subprocess.run(argv, env=env, capture_output=True, text=True))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1" and not os.path.exists(job_dir)
    assert os.path.isdir(os.path.join(named.scope_dir(str(node.local), "4242", "global"), "kept"))


def test_a_changed_squashfs_file_is_staged_again(node, sqsh, harness):
    copy = harness.root / "pyxis-opts" / "changing.sqsh"
    shutil.copy(sqsh, copy)
    os.chmod(copy, 0o644)
    assert ok(node.run("--mode", "P1", copy, "--", "/bin/sh", "-c", "echo $GREETING",
                       env=job(0))) == "from enroot\n"
    root = enroot_like_rootfs(harness.root / "pyxis-opts" / "root2")
    (root / "etc" / "environment").write_text('PATH="/bin"\nGREETING="version 2"\n')
    mksquashfs(root, copy)
    assert ok(node.run("--mode", "P1", copy, "--", "/bin/sh", "-c", "echo $GREETING",
                       env=job(1))) == "version 2\n"


def test_exec_flag_joins_the_running_steps_namespace(node, sqsh):
    """pyxis: --container-name=NAME:exec (and NAME alone) attaches to the running container:
    a mount made in the running step is seen, the joining step's mounts are ignored with a
    warning. :no_exec starts its own namespaces over the same files."""
    running = node.popen(
        "--name", "live", "--mode", "N1", "--remap-root", sqsh, "--", "/bin/sh", "-c",
        "busybox mkdir -p /mymnt && busybox mount -t tmpfs none /mymnt && echo up > /mymnt/flag"
        " && echo ready && exec busybox sleep 600", env=job(0), start_new_session=True)
    try:
        assert running.stdout.readline() == "ready\n", running.stderr.read()
        joined = ok(node.run("--name", "live:exec", "--", "/bin/cat", "/mymnt/flag", env=job(1)))
        assert joined == "up\n"
        auto = node.run("--name", "live", "-v", f"{node.work}:/data", "--", "/bin/cat",
                        "/mymnt/flag", env=job(5))
        assert ok(auto) == "up\n" and "ignoring --container-mounts" in auto.stderr
        own = node.run("--name", "live:no_exec", "--mode", "N1", "--", "/bin/cat",
                       "/mymnt/flag", env=job(2))
        assert own.returncode != 0  # the same files (/mymnt exists), not the step's tmpfs
        other = node.run("--name", "live:exec", "--mode", "P1", "--", "/bin/true", env=job(3))
        assert other.returncode == 3 and "--container-name=live:exec" in other.stderr
        assert "needs mode N1" in other.stderr and "hint:" in other.stderr
    finally:  # the whole session: the user switch leaves the payload in a child
        os.killpg(running.pid, signal.SIGKILL)
        running.communicate()
    cp = node.run("--name", "live:exec", "--", "/bin/true", env=job(4))  # nothing to join
    assert cp.returncode == 2 and "--container-name=live:exec" in cp.stderr


def quota_node(harness, quota):
    """A node whose policy sets storage.local_quota (root-owned, as the policy must be)."""
    policy = harness.root / f"quota-{quota}-{uuid.uuid4().hex[:8]}" / "policy.yaml"
    policy.parent.mkdir()
    policy.parent.chmod(0o755)
    policy.write_text(f"version: 1\ndefaults:\n  storage:\n    local_quota: {quota}\n")
    policy.chmod(0o644)
    node = Node(harness.root / "uctr-exec-quota", unprivileged_user())
    return node, {"UCTR_POLICY": str(policy)}


def test_a_named_container_must_fit_in_the_local_quota(harness, sqsh):
    """The busybox image unpacks to about 2 MB: its bundle fits in 3M, a copy beside it not."""
    node, policy = quota_node(harness, "3M")
    ok(node.run("--mode", "P1", sqsh, "--", "/bin/true", env=job(0, **policy)))
    cp = node.run("--name", "big", "--mode", "P1", sqsh, "--", "/bin/true", env=job(1, **policy))
    assert cp.returncode == 1 and "cannot create the container big" in cp.stderr, cp.stderr
    assert "quota" in cp.stderr and "hint:" in cp.stderr
    from uctr_batch.launch import named

    assert named.container_dirs(str(node.local)) == []  # nothing half-made left behind


def test_named_containers_count_when_another_image_is_staged(harness, sqsh):
    """5M: bundle A + container from A fit (4 MB); staging image B (2 MB more) must evict
    bundle A, because the container's 2 MB count too; the container itself stays."""
    other_root = sqsh.parent / "other-root"
    if not other_root.exists():
        shutil.copytree(sqsh.parent / "root", other_root, symlinks=True)
        (other_root / "etc" / "other").write_text("another image\n")
    other = sqsh.parent / "other.sqsh"
    if not other.exists():
        mksquashfs(other_root, other)
    node, policy = quota_node(harness, "5M")
    ok(node.run("--name", "kept", "--mode", "P1", sqsh, "--", "/bin/true", env=job(0, **policy)))
    assert len(node.bundles()) == 1
    ok(node.run("--mode", "P1", other, "--", "/bin/cat", "/etc/other", env=job(1, **policy)))
    assert len(node.bundles()) == 1  # A was evicted for B
    ok(node.run("--name", "kept", "--mode", "P1", "--", "/bin/true", env=job(2, **policy)))
