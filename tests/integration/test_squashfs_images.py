"""Squashfs image files (enroot's format) as images: `uctr run /path/img.sqsh`, the content
key, the layer checks, and --container-save output read back (uctr_batch/image/squashfs.py).

The images are made here with mksquashfs the way `enroot import` makes them (-all-root, a
rootfs with /etc/environment and /etc/rc); hostile entries come from mksquashfs pseudo
definitions, so no device node is ever created on the host."""

import os
import shutil
import subprocess

import pytest

from uctr_batch.image import squashfs

pytestmark = pytest.mark.skipif(not (shutil.which("mksquashfs") and shutil.which("sqfs2tar")),
                                reason="needs squashfs-tools and squashfs-tools-ng "
                                       "(scripts/install.sh)")


def enroot_like_rootfs(root):
    """A busybox rootfs with the files enroot puts into an imported image."""
    for d in ("bin", "etc", "tmp", "dev", "proc", "sys"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for tool in ("sh", "cat", "ls", "echo", "stat", "id", "touch", "test", "true"):
        os.symlink("busybox", root / "bin" / tool)
    (root / "etc" / "environment").write_text('PATH="/bin"\nGREETING="from enroot"\n')
    (root / "etc" / "rc").write_text('exec "$@"\n')
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


def mksquashfs(src, dest, *pseudo):
    argv = ["mksquashfs", str(src), str(dest), "-all-root", "-noappend", "-quiet", "-no-progress"]
    for definition in pseudo:
        argv += ["-p", definition]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    os.chmod(dest, 0o644)
    return dest


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("sqsh")
    os.chmod(d, 0o755)
    root = enroot_like_rootfs(d / "root")
    shutil.copy("/bin/busybox", root / "bin" / "suid-tool")
    os.chmod(root / "bin" / "suid-tool", 0o4755)
    plain = mksquashfs(root, d / "plain.sqsh")
    hostile = mksquashfs(root, d / "hostile.sqsh", "dev/evil c 666 root root 1 3",
                         "evil-block b 600 root root 8 0")
    (d / "notes.txt").write_text("not an image\n")
    os.chmod(d / "notes.txt", 0o644)
    return d


def ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_run_squashfs_without_a_registry(uctr, images):
    image = images / "plain.sqsh"
    out = ok(uctr("run", "--mode", "P1", image, "/bin/sh", "-c",
                  'echo "$GREETING"; cat /etc/rc'))
    assert out.splitlines() == ["from enroot", 'exec "$@"']
    # the same file again: the index answers, no second conversion
    again = uctr("run", "--mode", "P1", image, "/bin/true", env={"UCTR_VERBOSE": "2"})
    ok(again)
    assert "converting squashfs image" not in again.stderr


def test_content_key_same_bundle_for_a_copy(uctr, images, tmp_path):
    copy = tmp_path / "copy.sqsh"
    shutil.copy(images / "plain.sqsh", copy)
    first = ok(uctr("load", f"squashfs:{images / 'plain.sqsh'}")).split()
    second = ok(uctr("load", f"squashfs:{copy}")).split()
    assert first[0] == f"squashfs:{images / 'plain.sqsh'}" and second[0] == f"squashfs:{copy}"
    assert first[1] == second[1]  # same manifest digest: one bundle per node for both


def test_layer_checks_apply(uctr, images):
    out = ok(uctr("run", "--mode", "P1", images / "hostile.sqsh", "/bin/sh", "-c",
                  "ls /dev/evil /evil-block 2>&1; stat -c %a /bin/suid-tool"))
    lines = out.splitlines()
    assert any("/dev/evil" in ln and "No such file" in ln for ln in lines), out
    assert any("/evil-block" in ln and "No such file" in ln for ln in lines), out
    assert lines[-1] == "755"  # the setuid bit is dropped


def test_not_a_squashfs_is_refused_with_a_hint(uctr, images):
    result = uctr("run", images / "notes.txt", "/bin/true")
    assert result.returncode == 1
    assert "is not a squashfs image" in result.stderr and "hint:" in result.stderr
    assert "Traceback" not in result.stderr


def test_saved_rootfs_is_accepted_again(uctr, images, tmp_path):
    rootfs = enroot_like_rootfs(tmp_path / "changed")
    (rootfs / "etc" / "step1").write_text("written in step 1\n")
    saved = tmp_path / "saved.sqsh"
    squashfs.save(str(rootfs), str(saved))
    os.chmod(tmp_path, 0o755)
    os.chmod(saved, 0o644)
    assert saved.read_bytes()[:4] == squashfs.MAGIC
    assert not list(tmp_path.glob(".saved.sqsh.*"))  # no temporary left behind
    out = ok(uctr("run", "--mode", "P1", saved, "/bin/cat", "/etc/step1"))
    assert out == "written in step 1\n"


def test_environment_file_parsing():
    text = 'PATH="/usr/bin:/bin"\nexport A=1\n# comment\nB=\'two words\'\nnot a line\n1X=bad\n'
    assert squashfs.parse_environment(text) == ["PATH=/usr/bin:/bin", "A=1", "B=two words"]


def test_uctr_run_name_and_save(uctr, images, tmp_path):
    image = images / "plain.sqsh"
    ok(uctr("run", "--mode", "P1", "--name", "dev", image, "/bin/sh", "-c",
            "echo kept > /etc/run-marker"))
    assert ok(uctr("run", "--mode", "P1", "--name", "dev", image, "/bin/cat",
                   "/etc/run-marker")) == "kept\n"
    cp = uctr("run", "--mode", "P1", "--name", "dev:create", image, "/bin/true")
    assert cp.returncode == 2 and "already exists" in cp.stderr
    saved = tmp_path / "run-saved.sqsh"
    ok(uctr("run", "--mode", "P1", "--save", saved, image, "/bin/sh", "-c",
            "echo saved > /etc/run-saved"))
    os.chmod(tmp_path, 0o755)
    assert ok(uctr("run", "--mode", "P1", saved, "/bin/cat", "/etc/run-saved")) == "saved\n"
    # the unnamed run's copy went away after saving; the base image never changed
    cp = uctr("run", "--mode", "P1", image, "/bin/cat", "/etc/run-saved")
    assert cp.returncode != 0
