"""The malicious-layer corpus: every layer is rejected or neutralised, and sentinels outside
the rootfs stay byte-for-byte the same with no new file beside them."""

import gzip
import hashlib
import os
import tarfile
from pathlib import Path

import pytest

from tests.unit.layer_tars import Unpacker, dev, dir_, hard, names, reg, snapshot, sym, tar
from uctr_batch.errors import DigestMismatch, LayerRejected, StorageError, UctrError
from uctr_batch.image import flatten

PWNED = b"pwned\n"


class Outside:
    """Sentinels beside the rootfs: a file, a directory with a file, and the host's
    /etc/passwd (read only: a hard link to it would raise its link count)."""

    def __init__(self, tmp_path: Path):
        self.top = tmp_path
        self.dir = tmp_path / "outside"
        self.dir.mkdir()
        (self.dir / "sentinel").write_bytes(b"original\n")
        (self.dir / "subdir").mkdir()
        (self.dir / "subdir" / "keep").write_bytes(b"keep\n")
        self.passwd = os.lstat("/etc/passwd")
        self.passwd_hash = _sha256(Path("/etc/passwd"))
        self.before = self.state()

    def rebase(self, unpacker: Unpacker) -> Unpacker:
        """Take the baseline once the unpacker's own directories exist."""
        unpacker.dest.mkdir(parents=True, exist_ok=True)
        self.before = self.state()
        return unpacker

    def state(self):
        """Everything under tmp_path but the rootfs and the blobs the test writes."""
        return {
            path: value
            for path, value in snapshot(self.top).items()
            if not path.startswith(("blobs/", "bundle/rootfs/"))
        }

    def assert_untouched(self):
        assert self.state() == self.before
        now = os.lstat("/etc/passwd")
        assert (now.st_ino, now.st_nlink, now.st_mtime_ns) == (
            self.passwd.st_ino,
            self.passwd.st_nlink,
            self.passwd.st_mtime_ns,
        )
        assert _sha256(Path("/etc/passwd")) == self.passwd_hash


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def outside(tmp_path):
    return Outside(tmp_path)


@pytest.fixture
def unpack(tmp_path, outside):
    # rootfs: tmp_path/bundle/rootfs, so ../../outside is the sentinel directory
    u = outside.rebase(Unpacker(tmp_path))
    yield u
    outside.assert_untouched()


def rejected(unpack, *layers, match=None):
    with pytest.raises(LayerRejected, match=match) as info:
        unpack(*layers)
    assert "layer sha256:" in info.value.message
    assert info.value.hint
    return info.value


# -- names ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "../escape",
        "../../outside/sentinel",
        "a/../../escape",
        "./../escape",
        "a/b/../../../escape",
        "/../escape",
    ],
)
def test_dotdot_names_are_rejected_and_nothing_is_written(unpack, name):
    error = rejected(unpack, tar(reg("first", b"ok"), reg(name, PWNED)), match=r"path with '\.\.'")
    assert name in error.message
    assert names(unpack.dest) == []  # validate first: not even the valid member was written


def test_absolute_names_land_inside(unpack, outside):
    abs_sentinel = str(outside.dir / "sentinel")
    unpack(tar(reg("/etc/abs", b"x"), reg(abs_sentinel, PWNED), reg("//double", b"d")))
    assert (unpack.dest / "etc/abs").read_bytes() == b"x"
    assert (unpack.dest / abs_sentinel.lstrip("/")).read_bytes() == PWNED
    assert (unpack.dest / "double").exists()


# -- symlinks ---------------------------------------------------------------------------------
def _link_targets(outside: Outside):
    return [str(outside.dir), "../" * 12 + "outside", "../../outside", "/"]


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("same_layer", [True, False])
def test_symlink_then_write_through_stays_inside(unpack, outside, index, same_layer):
    target = _link_targets(outside)[index]
    first = [sym("link", target), sym("deep", "link/subdir")]
    second = [
        reg("link/sentinel", PWNED),
        reg("link/new", PWNED),
        reg("deep/keep", PWNED),
        dir_("link/newdir"),
        reg("link/newdir/f", PWNED),
    ]
    layers = [tar(*first, *second)] if same_layer else [tar(*first), tar(*second)]
    unpack(*layers)
    assert os.readlink(unpack.dest / "link") == target  # the link itself is kept
    written = [p for p, v in snapshot(unpack.dest).items() if v[0] == "f"]
    assert len(written) == 4 and all((unpack.dest / p).read_bytes() == PWNED for p in written)


def test_symlink_replacing_a_directory_then_writes_below(unpack, outside):
    unpack(
        tar(dir_("dir"), reg("dir/f", b"lower")),
        tar(sym("dir", str(outside.dir))),
        tar(reg("dir/sentinel", PWNED), reg("dir/subdir/keep", PWNED)),
    )
    inside = unpack.dest / str(outside.dir).lstrip("/")
    assert (inside / "sentinel").read_bytes() == PWNED
    assert (inside / "subdir/keep").read_bytes() == PWNED


def test_final_symlink_component_is_replaced_not_followed(unpack, outside):
    unpack(
        tar(sym("target-file", str(outside.dir / "sentinel")), sym("target-dir", str(outside.dir))),
        tar(reg("target-file", PWNED), dir_("target-dir", mode=0o700), reg("target-dir/x", PWNED)),
    )
    assert (unpack.dest / "target-file").read_bytes() == PWNED
    assert not os.path.islink(unpack.dest / "target-dir")


def test_whiteouts_through_symlinks_stay_inside(unpack, outside):
    unpack(
        tar(sym("link", str(outside.dir)), sym("rel", "../../outside")),
        tar(
            reg("link/.wh.sentinel"),
            reg("link/.wh..wh..opq"),
            reg("rel/.wh.subdir"),
            reg("rel/subdir/.wh..wh..opq"),
        ),
    )
    assert names(unpack.dest) == ["link", "rel"]


def test_symlink_loops_are_rejected(unpack):
    rejected(unpack, tar(sym("a", "b"), sym("b", "a"), reg("a/x", PWNED)), match="symbolic links")
    assert names(unpack.dest) == []


def test_writing_below_a_file_is_rejected(unpack):
    rejected(unpack, tar(reg("f", b"file")), tar(reg("f/x", PWNED)), match="not a directory")


def test_planted_symlink_cannot_redirect_a_write(unpack, outside, monkeypatch):
    """Even if the tree changes between plan and act (a race), the act step opens every
    directory with O_NOFOLLOW: the write fails instead of following the planted link."""
    original = flatten._Writer.apply

    def plant_then_apply(self, ops, layer, *rest):
        if any(op[0] == flatten._OP_FILE and op[1] == "d" for op in ops):
            os.rmdir(unpack.dest / "d")
            os.symlink(outside.dir, unpack.dest / "d")
        return original(self, ops, layer, *rest)

    monkeypatch.setattr(flatten._Writer, "apply", plant_then_apply)
    with pytest.raises(StorageError):
        unpack(tar(dir_("d")), tar(reg("d/new", PWNED), reg("d/sentinel", PWNED)))


# -- hard links -------------------------------------------------------------------------------
def test_hardlink_escape_with_dotdot_is_rejected(unpack):
    rejected(unpack, tar(hard("hard", "../../etc/passwd")), match="hard link target with '..'")
    rejected(unpack, tar(hard("hard", "../outside/sentinel")), match="hard link target")


def test_absolute_hardlink_to_a_missing_file_is_rejected(unpack, outside):
    rejected(unpack, tar(hard("hard", "/etc/passwd")), match="not in the image")
    rejected(unpack, tar(hard("hard", str(outside.dir / "sentinel"))), match="not in the image")


def test_absolute_hardlink_points_inside_the_rootfs(unpack):
    unpack(
        tar(dir_("etc"), reg("etc/passwd", b"root:x:0:0::/:/bin/sh\n"), hard("hard", "/etc/passwd"))
    )
    hard_path = unpack.dest / "hard"
    assert os.path.samefile(hard_path, unpack.dest / "etc/passwd")
    assert not os.path.samefile(hard_path, "/etc/passwd")


def test_hardlink_through_a_symlinked_directory(unpack, outside):
    # d -> outside dir; a hard link to d/sentinel must not reach the real sentinel
    rejected(
        unpack, tar(sym("d", str(outside.dir)), hard("x", "d/sentinel")), match="not in the image"
    )
    rejected(
        unpack, tar(sym("d", "../../outside"), hard("x", "d/sentinel")), match="not in the image"
    )


def test_hardlink_through_a_symlinked_directory_resolves_inside(unpack, outside):
    inside = str(outside.dir).lstrip("/")
    unpack(
        tar(
            reg(f"{inside}/sentinel", b"inner"), sym("d", str(outside.dir)), hard("x", "d/sentinel")
        )
    )
    assert os.path.samefile(unpack.dest / "x", unpack.dest / inside / "sentinel")
    assert (unpack.dest / "x").read_bytes() == b"inner"


def test_hardlink_to_a_directory_is_rejected(unpack):
    rejected(unpack, tar(dir_("d"), hard("h", "d")), match="directory")


# -- special files and modes ------------------------------------------------------------------
def test_device_nodes_are_never_created(unpack):
    stats = unpack(
        tar(dev("null"), dev("sda", tarfile.BLKTYPE, 8, 0), dev("etc/mem", major=1, minor=1))
    )
    assert names(unpack.dest) == ["etc"]
    assert stats.devices_skipped == 3


def test_setuid_and_setgid_are_stripped(unpack):
    stats = unpack(
        tar(
            reg("su", b"#!", mode=0o4755),
            reg("sg", b"#!", mode=0o2755),
            reg("both", b"#!", mode=0o6777),
        )
    )
    modes = {p: v[1] for p, v in snapshot(unpack.dest).items()}
    assert modes == {"su": 0o755, "sg": 0o755, "both": 0o777}
    assert stats.setid_stripped == 3


def test_duplicate_entries_last_wins_even_across_types(unpack):
    unpack(
        tar(
            dir_("x"),
            reg("x/in", b"in"),
            sym("x", "/"),
            reg("x", b"final"),
            reg("y", b"a"),
            hard("z", "y"),
            reg("z", b"own"),
        )
    )
    assert (unpack.dest / "x").read_bytes() == b"final"
    assert (unpack.dest / "y").read_bytes() == b"a"
    assert (unpack.dest / "z").read_bytes() == b"own"


def test_top_level_opaque_marker_does_not_remove_the_rootfs(unpack):
    unpack(
        tar(reg("lower", b"l")), tar(reg(".wh..wh..opq"), reg("/.wh..wh..opq"), reg("own", b"o"))
    )
    assert unpack.dest.is_dir()
    assert names(unpack.dest) == ["own"]


@pytest.mark.parametrize("name", [".wh...", "d/.wh..", ".wh."])
def test_invalid_whiteouts_are_rejected(unpack, name):
    rejected(unpack, tar(dir_("d"), reg(name)), match="invalid whiteout")


# -- damaged blobs ----------------------------------------------------------------------------
def test_truncated_gzip_is_rejected(unpack):
    blob = gzip.compress(tar(reg("f", os.urandom(200_000))))
    path, _ = unpack.blob(b"", raw=blob[: len(blob) // 2])
    with pytest.raises(LayerRejected, match="cannot decompress"):
        unpack.unpack([(path, None)])
    assert names(unpack.dest) == []


def test_truncated_gzip_with_a_known_digest_is_a_digest_mismatch(unpack):
    blob = gzip.compress(tar(reg("f", os.urandom(200_000))))
    path, layer = unpack.blob(b"", raw=blob)
    path.write_bytes(blob[:-100])
    with pytest.raises(DigestMismatch):
        unpack.unpack([(path, layer)])


def test_truncated_zstd_is_rejected(unpack):
    import zstandard

    blob = zstandard.ZstdCompressor().compress(tar(reg("f", os.urandom(300_000)), reg("g", b"g")))
    path, _ = unpack.blob(b"", "zstd", raw=blob[: len(blob) - 50])
    with pytest.raises(LayerRejected):
        unpack.unpack([(path, None)])


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_wrong_digest_is_rejected_before_anything_is_written(unpack, compression):
    path, layer = unpack.blob(
        tar(reg("f", b"real")),
        compression,
        digest="sha256:" + hashlib.sha256(b"something else").hexdigest(),
    )
    with pytest.raises(DigestMismatch) as info:
        unpack.unpack([(path, layer)])
    assert layer.digest in info.value.message
    assert "uctr verify" in info.value.hint
    assert names(unpack.dest) == []


def test_wrong_digest_in_a_later_layer(unpack):
    good = unpack.blob(tar(reg("a", b"a")))
    bad_path, bad = unpack.blob(tar(reg("b", b"b")))
    bad_path.write_bytes(gzip.compress(tar(reg("b", PWNED))))
    with pytest.raises(DigestMismatch):
        unpack.unpack([good, (bad_path, bad)])
    assert "b" not in names(unpack.dest)


def test_corrupt_tar_header_in_the_middle_is_rejected(unpack):
    data = bytearray(tar(reg("a", b"a" * 10), reg("b", b"b"), reg("c", b"c")))
    data[1024 + 148 : 1024 + 156] = (
        b"9999999\0"  # header of "b" (pax header at 0, 'a' at 512+): bad checksum
    )
    with pytest.raises(LayerRejected):
        unpack(bytes(data), compression="none")


def test_garbage_is_not_a_layer(unpack):
    path, _ = unpack.blob(b"", raw=b"this is not a tar archive at all" * 40)
    with pytest.raises(LayerRejected, match="tar"):
        unpack.unpack([(path, None)])


def test_unsupported_digest_algorithm(unpack):
    path, layer = unpack.blob(tar(reg("f")), digest="md5:" + "0" * 32)
    with pytest.raises(LayerRejected, match="digest algorithm"):
        unpack.unpack([(path, layer)])


# -- names the kernel cannot take -------------------------------------------------------------
def test_very_long_names(unpack):
    ok = "a" * 255
    unpack(tar(reg(ok, b"ok"), reg("d/" + "/".join(["x" * 200] * 15), b"deep")))
    assert (unpack.dest / ok).read_bytes() == b"ok"


@pytest.mark.parametrize("name", ["a" * 256, "d/" + "b" * 300 + "/f", "/".join(["y" * 250] * 17)])
def test_names_over_the_kernel_limits_are_rejected(tmp_path, outside, name):
    u = outside.rebase(Unpacker(tmp_path))
    with pytest.raises(LayerRejected, match="too long"):
        u(tar(reg(name, PWNED)))
    outside.assert_untouched()


def test_long_symlink_target_is_rejected(unpack):
    rejected(unpack, tar(sym("s", "t" * 5000)), match="symlink target")


def test_every_rejection_is_a_clean_user_error(unpack):
    with pytest.raises(UctrError) as info:
        unpack(tar(reg("../x", PWNED)))
    assert info.value.exit_code == 5
