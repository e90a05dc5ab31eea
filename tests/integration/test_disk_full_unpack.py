"""Unpacking onto a full disk (issue 10, class 5): a real size- and inode-limited tmpfs,
filled at chosen points of the unpack. Every case ends in one `errors.NoSpace` (exit 1,
`error: ... no space left on DEVICE (DIR): needed ~N, free M` + hint), nothing half-made is
kept, and the same create succeeds once space is freed.

The fill points are reached by wrapping a step of the unpack (the real code runs; the wrapper
only fills the disk with a file at that moment), so the ENOSPC is the kernel's, not a mock."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.layer_tars import dir_, reg, tar
from tests.unit.test_rootfs_dirs import make_image
from uctr_batch.errors import NoSpace
from uctr_batch.image import flatten, rootfs
from uctr_batch.image.store import Store

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs with 400 inodes, unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,nr_inodes=400,mode=0700", "tmpfs",
                    str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "cache")


@pytest.fixture
def image(store):
    """Three layers of ~1.5 MiB of incompressible data each, 20 small files in the last."""
    return make_image(
        store,
        tar(dir_("one"), reg("one/a", os.urandom(MiB)), reg("one/b", os.urandom(MiB // 2))),
        tar(dir_("two"), reg("two/a", os.urandom(3 * MiB // 2))),
        tar(dir_("three"), reg("three/a", os.urandom(MiB)),
            *[reg(f"three/small{i}", b"s") for i in range(20)]),
    )


class Filler:
    """Fills the tmpfs: all of it but LEAVE bytes, or every free inode."""

    def __init__(self, mount: Path):
        self.mount = mount
        self.paths = []

    def space(self, leave: int = 0) -> None:
        path = self.mount / f"filler{len(self.paths)}"
        self.paths.append(path)
        with open(path, "wb") as f:
            block = b"\xff" * (64 << 10)
            try:
                while True:
                    st = os.statvfs(self.mount)
                    free = st.f_bavail * st.f_frsize
                    if free <= leave:
                        break
                    f.write(block[:max(min(len(block), free - leave), 1)])
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC

    def inodes(self) -> None:
        directory = self.mount / f"inodes{len(self.paths)}"
        directory.mkdir()
        self.paths.append(directory)
        try:
            for i in range(100_000):
                (directory / str(i)).touch()
        except OSError as e:
            assert e.errno == errno.ENOSPC

    def free_all(self) -> None:
        for path in self.paths:
            if path.is_dir():
                for child in path.iterdir():
                    child.unlink()
                path.rmdir()
            else:
                path.unlink()
        self.paths.clear()


def leftovers(local: Path):
    bundles = local / "bundles"
    if not bundles.exists():
        return []
    return [n for n in os.listdir(bundles)]


def assert_clean_no_space(error: NoSpace, local: Path):
    assert "no space left on tmpfs (" in error.message or "quota" in error.message
    assert str(local.parent) in error.message  # the node-local dir, or its parent if missing
    assert error.hint and "free space" in error.hint
    assert error.exit_code == 1
    assert leftovers(local) == []


def fill_then(target, method: str, fill, when=lambda *a, **kw: True):
    """Wrap TARGET.METHOD so that FILL() runs (once) just before the first call WHEN allows."""
    real = getattr(target, method)
    state = {"done": False}

    def wrapper(*args, **kwargs):
        if not state["done"] and when(*args, **kwargs):
            state["done"] = True
            fill()
        return real(*args, **kwargs)

    return wrapper, state


def _layer_index(image):
    digests = [layer.digest for layer in image.layers]
    return lambda blob, layer, *rest: layer is not None and digests.index(layer.digest)


@pytest.mark.parametrize("point", ["first-layer", "mid-file", "last-layer", "records",
                                   "inodes-first", "inodes-last"])
def test_full_disk_at_each_point_is_a_clean_error_then_success(small_fs, store, image,
                                                               monkeypatch, point):
    local = small_fs / "local"
    monkeypatch.setenv("UCTR_LOCAL_DIR", str(local))
    filler = Filler(small_fs)
    layer_index = _layer_index(image)
    if point == "first-layer":  # before the first layer is inflated: the stream check
        wrapper, state = fill_then(flatten._LayerTar, "prepare", lambda: filler.space(MiB // 2))
        monkeypatch.setattr(flatten._LayerTar, "prepare", staticmethod(wrapper))
    elif point == "last-layer":  # the last layer's temp tar fills the disk
        wrapper, state = fill_then(flatten._LayerTar, "prepare", lambda: filler.space(MiB // 2),
                                   lambda *a: layer_index(*a[:2]) == 2)
        monkeypatch.setattr(flatten._LayerTar, "prepare", staticmethod(wrapper))
    elif point == "mid-file":  # the space check passed; the disk fills during a file's data
        def during_big_file(src_fd, dst_fd, offset, size):
            return size == MiB // 2 * 3  # two/a
        wrapper, state = fill_then(flatten, "_copy_range", lambda: filler.space(MiB // 4),
                                   during_big_file)
        monkeypatch.setattr(flatten, "_copy_range", wrapper)
    elif point == "records":  # the rootfs fits, image.json and the marker do not
        state = {"done": False}
        real_unpack = flatten.unpack_layers

        def unpack_then_fill(*args, **kwargs):
            stats = real_unpack(*args, **kwargs)
            filler.space(0)
            filler.inodes()
            state["done"] = True
            return stats
        monkeypatch.setattr(flatten, "unpack_layers", unpack_then_fill)
    elif point == "inodes-first":  # no inode left at all: the lock or the temp tree
        filler.inodes()
        state = {"done": True}
    else:  # inodes run out in the last layer (20 small files)
        def fill_inodes():
            filler.inodes()
            for path in list((small_fs / f"inodes{len(filler.paths) - 1}").iterdir())[:8]:
                path.unlink()
        wrapper, state = fill_then(flatten._Writer, "apply", fill_inodes,
                                   lambda self, ops, *rest: len(ops) > 20)
        monkeypatch.setattr(flatten._Writer, "apply", wrapper)
    with pytest.raises(NoSpace) as info:
        rootfs.create(image, store)
    assert state["done"]
    assert_clean_no_space(info.value, local)
    if point.startswith("inodes"):
        assert "inode" in info.value.message + info.value.hint
    filler.free_all()
    monkeypatch.undo()
    monkeypatch.setenv("UCTR_LOCAL_DIR", str(local))
    path = rootfs.create(image, store)
    assert (path / "three/small19").read_bytes() == b"s"
    assert [n for n in leftovers(local) if n.startswith(".")] == []


def test_image_larger_than_the_disk_is_refused_before_it_fills_it(small_fs, store):
    """A layer bigger than the whole tmpfs: stopped by the checks, the disk never fills."""
    big = make_image(store, tar(reg("huge", os.urandom(20 * MiB))))
    local = small_fs / "local"
    os.environ["UCTR_LOCAL_DIR"] = str(local)
    try:
        with pytest.raises(NoSpace) as info:
            rootfs.create(big, store)
    finally:
        del os.environ["UCTR_LOCAL_DIR"]
    assert_clean_no_space(info.value, local)
    assert "needed ~" in info.value.message and "free " in info.value.message


def test_cli_reports_a_full_disk_with_error_hint_and_exit_1(small_fs, store, tmp_path):
    big = make_image(store, tar(reg("huge", os.urandom(20 * MiB))),
                     reference="example.org/test/full:1")
    store.record(big)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(REPO),
           "UCTR_CACHE": str(store.root), "UCTR_LOCAL_DIR": str(small_fs / "local"),
           "UCTR_CONFIG_DIR": str(tmp_path / "config")}
    result = subprocess.run([sys.executable, "-m", "uctr_batch", "create", "--no-pull", big.reference], env=env,
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: cannot unpack layer sha256:"), result.stderr
    assert "no space left on tmpfs" in lines[0] and "needed ~" in lines[0]
    assert any(line.startswith("hint: free space") for line in lines)
    assert "Traceback" not in result.stderr
    assert leftovers(small_fs / "local") == []
