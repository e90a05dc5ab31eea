"""Flatten on hand-built layers: whiteouts, links, modes, devices, replacements, compression."""

import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from tests.harness import users
from tests.unit.layer_tars import (
    Unpacker,
    dev,
    dir_,
    fifo,
    hard,
    names,
    reg,
    snapshot,
    sym,
    tar,
)
from uctr_batch.errors import StorageError
from uctr_batch.image import flatten

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def unpack(tmp_path):
    return Unpacker(tmp_path)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- whiteouts --------------------------------------------------------------------------------
def test_explicit_whiteout_removes_file_and_whole_directory(unpack):
    lower = tar(
        dir_("a"),
        reg("a/x", b"x"),
        reg("a/y", b"y"),
        dir_("d"),
        dir_("d/sub"),
        reg("d/sub/deep", b"deep"),
    )
    upper = tar(reg("a/.wh.x"), reg(".wh.d"))
    stats = unpack(lower, upper)
    assert names(unpack.dest) == ["a", "a/y"]
    assert stats.whiteouts == 2


def test_opaque_whiteout_hides_lower_children_only(unpack):
    lower = tar(
        dir_("o"), reg("o/old", b"1"), dir_("o/sub"), reg("o/sub/old2", b"2"), reg("keep", b"k")
    )
    # the layer's own entry comes before the opaque marker: order must not matter
    upper = tar(dir_("o"), reg("o/new", b"n"), reg("o/.wh..wh..opq"), reg("o/later", b"l"))
    unpack(lower, upper)
    assert names(unpack.dest) == ["keep", "o", "o/later", "o/new"]


def test_whiteout_does_not_hide_an_entry_of_its_own_layer(unpack):
    lower = tar(reg("f", b"old"))
    upper = tar(reg("f", b"new"), reg(".wh.f"))
    unpack(lower, upper)
    assert (unpack.dest / "f").read_bytes() == b"new"


def test_top_level_whiteouts(unpack):
    lower = tar(reg("gone", b"1"), dir_("gonedir"), reg("gonedir/x", b"2"), reg("stays", b"3"))
    upper = tar(reg(".wh.gone"), reg("./.wh.gonedir"))
    unpack(lower, upper)
    assert names(unpack.dest) == ["stays"]


def test_top_level_opaque_empties_lower_layers_but_keeps_own_entries(unpack):
    lower = tar(dir_("etc"), reg("etc/passwd", b"old"), reg("f", b"old"))
    upper = tar(reg(".wh..wh..opq"), dir_("etc"), reg("etc/hosts", b"new"))
    unpack(lower, upper)
    assert names(unpack.dest) == ["etc", "etc/hosts"]
    assert unpack.dest.is_dir()


def test_whiteout_of_missing_path_is_harmless(unpack):
    unpack(tar(reg("a", b"1")), tar(reg("nodir/.wh.x"), reg(".wh.missing"), reg("a/.wh.x")))
    assert names(unpack.dest) == ["a"]


def test_whiteout_files_never_appear(unpack):
    unpack(tar(reg(".wh.nothing"), dir_("d"), reg("d/.wh..wh..opq"), reg("d/.wh..wh.plnk")))
    assert names(unpack.dest) == ["d"]


# -- links ------------------------------------------------------------------------------------
def test_hard_links_share_the_inode_and_symlinks_are_verbatim(unpack):
    stats = unpack(
        tar(
            dir_("d"),
            reg("d/f", b"data"),
            hard("d/h", "d/f"),
            hard("top", "./d/f"),
            sym("abs", "/d/f"),
            sym("rel", "d/f"),
            sym("dangling", "/no/such"),
        )
    )
    f = os.lstat(unpack.dest / "d/f")
    assert os.lstat(unpack.dest / "d/h").st_ino == f.st_ino == os.lstat(unpack.dest / "top").st_ino
    assert f.st_nlink == 3
    assert os.readlink(unpack.dest / "abs") == "/d/f"  # not rewritten: resolved at run time
    assert os.readlink(unpack.dest / "rel") == "d/f"
    assert os.readlink(unpack.dest / "dangling") == "/no/such"
    assert (stats.hardlinks, stats.symlinks) == (2, 3)


def test_hard_link_to_a_lower_layer_file(unpack):
    unpack(tar(reg("f", b"lower")), tar(hard("h", "f")))
    assert os.path.samefile(unpack.dest / "f", unpack.dest / "h")


def test_overwriting_a_hard_linked_file_leaves_the_other_name_alone(unpack):
    # udocker's bug: it rewrote the shared inode in place
    unpack(tar(reg("f", b"v1"), hard("h", "f")), tar(reg("f", b"v2")))
    assert (unpack.dest / "f").read_bytes() == b"v2"
    assert (unpack.dest / "h").read_bytes() == b"v1"


def test_hard_link_to_a_symlink_links_the_symlink(unpack):
    unpack(tar(sym("s", "/target"), hard("h", "s")))
    assert os.readlink(unpack.dest / "h") == "/target"


def test_symlinked_parent_is_followed_inside_the_rootfs(unpack):
    # usrmerge: /lib -> usr/lib, later layers write lib/...
    unpack(
        tar(
            dir_("usr"),
            dir_("usr/lib"),
            sym("lib", "usr/lib"),
            sym("abs", "/usr"),
            dir_("etc"),
            sym("etc/alt", "/usr/lib"),
            sym("etc/up", "../../../../usr/lib"),
        ),
        tar(
            reg("lib/libx.so", b"x"),
            reg("abs/lib/liby.so", b"y"),
            reg("etc/alt/z", b"z"),
            reg("etc/up/u", b"u"),
        ),
    )
    for name in ("libx.so", "liby.so", "z", "u"):  # absolute from the rootfs, '..' clamped at it
        assert (unpack.dest / "usr/lib" / name).exists(), name
    assert names(unpack.dest / "etc") == ["alt", "up"]
    assert os.path.islink(unpack.dest / "lib")


# -- modes ------------------------------------------------------------------------------------
def test_modes(unpack):
    stats = unpack(
        tar(
            reg("secret", b"s", mode=0o000),
            reg("wo", b"w", mode=0o200),
            dir_("locked", mode=0o500),
            reg("locked/child", b"c"),
            dir_("locked/sub", mode=0o755),
            reg("locked/sub/deep", b"d"),
            dir_("closed", mode=0o000),
            reg("closed/in", b"i"),
            dir_("tmp", mode=0o1777),
            dir_("sgid", mode=0o2755),
            reg("suid", b"#!", mode=0o4755),
            reg("sgidf", b"#!", mode=0o2711),
            reg("group-w", b"g", mode=0o664),
        ),
        tar(reg("locked/late", b"added by a later layer")),
    )
    dest = unpack.dest
    assert mode_of(dest / "secret") == 0o400
    assert mode_of(dest / "wo") == 0o600
    assert mode_of(dest / "locked") == 0o500
    assert (dest / "locked/late").read_bytes() == b"added by a later layer"
    assert mode_of(dest / "locked/sub") == 0o755
    assert mode_of(dest / "closed") == 0o500
    assert (dest / "closed/in").read_bytes() == b"i"
    assert mode_of(dest / "tmp") == 0o1777
    assert mode_of(dest / "sgid") == 0o2755  # setgid on a directory grants nothing
    assert mode_of(dest / "suid") == 0o755
    assert mode_of(dest / "sgidf") == 0o711
    assert mode_of(dest / "group-w") == 0o664  # the caller's umask does not apply
    assert stats.setid_stripped == 2


@pytest.fixture
def user_tmp():
    """A directory the unprivileged test user owns (pytest's tmp_path is root-only)."""
    if os.geteuid() != 0:
        path = Path(tempfile.mkdtemp(prefix="uctr-flatten-"))
        yield path, []
    else:
        if not users.can_switch_user():
            pytest.skip("needs the test user uctrtest")
        path = Path(tempfile.mkdtemp(prefix="uctr-flatten-", dir="/tmp"))
        os.chmod(path, 0o755)
        shutil.chown(path, users.TEST_USER)
        yield path, ["runuser", "-u", users.TEST_USER, "--"]
    subprocess.run(["chmod", "-R", "u+rwx", str(path)])
    shutil.rmtree(path)


def test_restrictive_dirs_as_an_unprivileged_user(user_tmp):
    """Root ignores modes, so the 0500/0000 handling is only proven by a normal user."""
    work, prefix = user_tmp
    blob = work / "layer.tar"
    blob.write_bytes(
        tar(
            dir_("locked", mode=0o500),
            reg("locked/a", b"a"),
            dir_("closed", mode=0o000),
            reg("closed/b", b"b"),
            reg("secret", b"s", mode=0o000),
        )
    )
    blob2 = work / "layer2.tar"
    blob2.write_bytes(tar(reg("locked/late", b"late"), reg("closed/.wh.b")))
    script = (
        "import sys, os\nfrom uctr_batch.image.flatten import unpack_layers\n"
        "os.mkdir(sys.argv[3])\n"
        "unpack_layers([(sys.argv[1], None), (sys.argv[2], None)], sys.argv[3])\n"
        "print(sorted(os.listdir(sys.argv[3] + '/locked')), open(sys.argv[3] + '/secret').read())\n"
    )
    result = subprocess.run(
        prefix + [sys.executable, "-c", script, str(blob), str(blob2), str(work / "rootfs")],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PYTHONPATH": str(REPO), "PATH": os.environ["PATH"]},
    )
    assert result.returncode == 0, result.stderr
    assert "['a', 'late'] s" in result.stdout
    rootfs = work / "rootfs"
    assert mode_of(rootfs / "locked") == 0o500
    assert mode_of(rootfs / "closed") == 0o500
    assert os.listdir(rootfs / "closed") == []
    assert mode_of(rootfs / "secret") == 0o400
    assert os.lstat(rootfs / "secret").st_uid == os.lstat(work).st_uid


def test_mtimes_are_kept(unpack):
    unpack(
        tar(
            dir_("d", mtime=1_000_000_000),
            reg("d/f", b"x", mtime=1_100_000_000),
            sym("s", "d/f", mtime=1_200_000_000),
            dir_("locked", mode=0o500, mtime=1_300_000_000),
            reg("locked/f", b"y"),
        )
    )
    dest = unpack.dest
    assert os.lstat(dest / "d").st_mtime == 1_000_000_000  # after its children were written
    assert os.lstat(dest / "d/f").st_mtime == 1_100_000_000
    assert os.lstat(dest / "s").st_mtime == 1_200_000_000
    assert os.lstat(dest / "locked").st_mtime == 1_300_000_000


def test_implicit_parent_directories_are_0755(unpack):
    unpack(tar(reg("a/b/c", b"x")))
    assert mode_of(unpack.dest / "a") == mode_of(unpack.dest / "a/b") == 0o755


# -- special files ----------------------------------------------------------------------------
def test_devices_are_skipped_and_counted_fifos_created(unpack, caplog):
    stats = unpack(
        tar(
            dir_("dev"),
            dev("dev/null"),
            dev("dev/sda", tarfile.BLKTYPE, 8, 0),
            fifo("dev/initctl", 0o600),
            hard("dev/null2", "dev/null"),
        )
    )
    assert names(unpack.dest) == ["dev", "dev/initctl"]
    assert stat.S_ISFIFO(os.lstat(unpack.dest / "dev/initctl").st_mode)
    assert mode_of(unpack.dest / "dev/initctl") == 0o600
    assert stats.devices_skipped == 3
    assert stats.fifos == 1


def test_device_count_is_shown_with_verbose(tmp_path):
    blob = tmp_path / "l.tar"
    blob.write_bytes(tar(dev("null"), dev("zero")))
    script = (
        "import sys, os\nfrom uctr_batch import log\n"
        "from uctr_batch.image.flatten import unpack_layers\n"
        "log.setup(1)\nos.mkdir(sys.argv[2])\nunpack_layers([(sys.argv[1], None)], sys.argv[2])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(blob), str(tmp_path / "r")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "skipped 2 device node(s)" in result.stderr


def test_gnu_sparse_member(unpack, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"middle")
    archive = tmp_path / "sparse.tar"
    subprocess.run(
        ["tar", "--sparse", "--format=gnu", "-cf", str(archive), "-C", str(src), "sparse"],
        check=True,
    )
    unpack(archive.read_bytes(), compression="none")
    assert (unpack.dest / "sparse").read_bytes() == (src / "sparse").read_bytes()


# -- replacement across layers ----------------------------------------------------------------
@pytest.mark.parametrize(
    "lower,upper,expect",
    [
        (tar(reg("p", b"file")), tar(dir_("p"), reg("p/in", b"i")), {"p": "d", "p/in": "f"}),
        (tar(dir_("p"), reg("p/x", b"x")), tar(reg("p", b"file")), {"p": "f"}),
        (tar(sym("p", "target")), tar(reg("p", b"file")), {"p": "f"}),
        (
            tar(dir_("t"), sym("p", "t")),
            tar(dir_("p"), reg("p/in", b"i")),
            {"t": "d", "p": "d", "p/in": "f"},
        ),
        (tar(reg("p", b"file")), tar(sym("p", "elsewhere")), {"p": "l"}),
        (
            tar(dir_("p"), reg("p/x", b"x")),
            tar(dir_("p", mode=0o700), reg("p/y", b"y")),
            {"p": "d", "p/x": "f", "p/y": "f"},
        ),  # directories merge
    ],
)
def test_type_changes_across_layers(unpack, lower, upper, expect):
    unpack(lower, upper)
    assert {k: v[0] for k, v in snapshot(unpack.dest).items()} == expect


def test_duplicate_entries_last_one_wins(unpack):
    unpack(
        tar(
            reg("f", b"first"),
            reg("f", b"second"),
            dir_("d"),
            reg("d", b"file now"),
            sym("s", "a"),
            sym("s", "b"),
        )
    )
    assert (unpack.dest / "f").read_bytes() == b"second"
    assert (unpack.dest / "d").read_bytes() == b"file now"
    assert os.readlink(unpack.dest / "s") == "b"


# -- compression and inputs -------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_compressions_with_digest_check(unpack, compression):
    layer = tar(dir_("etc"), reg("etc/os-release", b"ID=test\n"), reg("big", os.urandom(3 << 20)))
    stats = unpack(layer, tar(reg("etc/.wh.os-release")), compression=compression)
    assert names(unpack.dest) == ["big", "etc"]
    assert stats.bytes == (3 << 20) + len(b"ID=test\n")


def test_compression_is_sniffed_not_taken_from_the_media_type(unpack):
    path, layer = unpack.blob(tar(reg("f", b"plain")), "none")
    lying = layer.__class__(
        layer.digest, "application/vnd.docker.image.rootfs.diff.tar.gzip", layer.size
    )
    unpack.unpack([(path, lying)])
    assert (unpack.dest / "f").read_bytes() == b"plain"


def test_layer_without_digest_and_empty_layers(unpack):
    path = unpack.blobs / "empty"
    path.write_bytes(b"")
    path2, _ = unpack.blob(tar(), "gzip")
    path3, _ = unpack.blob(tar(reg("f", b"x")), "gzip")
    stats = unpack.unpack([(path, None), (path2, None), (path3, None)])
    assert names(unpack.dest) == ["f"]
    assert stats.layers == 3


def test_no_layers_gives_an_empty_rootfs(unpack):
    assert unpack().layers == 0
    assert names(unpack.dest) == []


def test_destination_must_be_an_empty_directory(unpack):
    unpack.dest.mkdir(parents=True)
    (unpack.dest / "x").write_text("x")
    with pytest.raises(StorageError, match="not empty"):
        unpack(tar(reg("f")))


def test_pax_long_and_utf8_names(unpack):
    long_name = "d/" + "n" * 200 + "/" + "m" * 255
    unpack(tar(reg(long_name, b"long"), reg("caf\u00e9-\u65e5\u672c", b"utf8")))
    assert (unpack.dest / long_name).read_bytes() == b"long"
    assert (unpack.dest / "caf\u00e9-\u65e5\u672c").read_bytes() == b"utf8"


def test_root_entry_sets_the_root_mode(unpack):
    unpack(tar(dir_("./", mode=0o750), reg("./f", b"x")))
    assert mode_of(unpack.dest) == 0o750


def test_many_directories_do_not_exhaust_file_descriptors(unpack):
    members = []
    for i in range(600):  # more than the fd cache
        members += [dir_(f"d{i}", mode=0o555), reg(f"d{i}/f", b"x")]
    unpack(tar(*members), tar(*[reg(f"d{i}/g", b"y") for i in range(600)]))
    assert len(names(unpack.dest)) == 1800
    assert mode_of(unpack.dest / "d599") == 0o555


def test_stats_are_counted(unpack):
    stats = unpack(
        tar(dir_("d"), reg("d/a", b"123"), sym("s", "d"), hard("h", "d/a")),
        tar(reg("d/.wh.a"), reg("d/b", b"45")),
    )
    assert stats.as_dict() == dict(
        layers=2,
        members=6,
        files=2,
        dirs=1,
        symlinks=1,
        hardlinks=1,
        fifos=0,
        whiteouts=1,
        removed=1,
        devices_skipped=0,
        other_skipped=0,
        setid_stripped=0,
        bytes=5,
    )
    assert isinstance(stats, flatten.Stats)


# -- issue 10, class 7: every stream checked to its end and against the config's diff_ids -------
import gzip as _gzip_mod  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402

import zstandard  # noqa: E402

from tests.unit.layer_tars import compress  # noqa: E402
from uctr_batch.errors import LayerRejected, NoSpace  # noqa: E402

_BIG = tar(reg("a", os.urandom(300_000)), reg("b", b"b" * 300_000), reg("c", b"last"))


def _diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _zstd_frames(data: bytes, size: int = 100_000) -> bytes:
    """DATA as several zstd frames (as parallel compressors write them)."""
    out = zstandard.ZstdCompressor(write_checksum=True)
    return b"".join(out.compress(data[i:i + size]) for i in range(0, len(data), size))


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, -3, -1])
def test_truncated_zstd_layer_is_rejected(unpack, cut):
    """It was accepted as a shorter (or empty) layer: files silently missing."""
    blob = compress(_BIG, "zstd")
    end = int(len(blob) * cut) if isinstance(cut, float) else len(blob) + cut
    with pytest.raises(LayerRejected, match="cannot decompress|truncated") as info:
        unpack.unpack([unpack.blob(b"", "zstd", raw=blob[:end])])
    assert info.value.hint
    assert names(unpack.dest) == []


def test_truncated_multi_frame_zstd_layer_is_rejected(unpack):
    blob = _zstd_frames(_BIG)
    frame = len(zstandard.ZstdCompressor(write_checksum=True).compress(_BIG[:100_000]))
    with pytest.raises(LayerRejected):
        unpack.unpack([unpack.blob(b"", "zstd", raw=blob[:frame + 10])])


@pytest.mark.parametrize("tail", [b"garbage!", b"\0" * 16, b"\x28\xb5\x2f\xfd"])
def test_zstd_trailing_bytes_are_rejected(unpack, tail):
    with pytest.raises(LayerRejected):
        unpack.unpack([unpack.blob(b"", "zstd", raw=compress(_BIG, "zstd") + tail)])


def test_concatenated_zstd_frames_and_skippable_frames_are_one_stream(unpack):
    skippable = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    blob = skippable + _zstd_frames(_BIG) + skippable
    unpack.unpack([unpack.blob(b"", "zstd", raw=blob)])
    assert (unpack.dest / "c").read_bytes() == b"last"


def test_zstd_with_a_wrong_checksum_is_rejected(unpack):
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(_BIG))
    blob[-1] ^= 0xFF
    with pytest.raises(LayerRejected, match="cannot decompress"):
        unpack.unpack([unpack.blob(b"", "zstd", raw=bytes(blob))])


@pytest.mark.parametrize("damage", ["cut", "garbage", "crc"])
def test_damaged_gzip_layer_is_rejected(unpack, damage):
    blob = compress(_BIG, "gzip")
    if damage == "cut":
        blob = blob[:-20]
    elif damage == "garbage":
        blob += b"garbage!"
    else:
        blob = blob[:-8] + bytes([blob[-8] ^ 1]) + blob[-7:]
    with pytest.raises(LayerRejected):
        unpack.unpack([unpack.blob(b"", "gzip", raw=blob)])


def test_concatenated_gzip_members_are_one_stream(unpack):
    half = len(_BIG) // 2
    blob = _gzip_mod.compress(_BIG[:half]) + _gzip_mod.compress(_BIG[half:])
    unpack.unpack([unpack.blob(b"", "gzip", raw=blob)])
    assert (unpack.dest / "c").read_bytes() == b"last"


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_diff_ids_are_checked(unpack, compression):
    good, other = tar(reg("f", b"f")), tar(reg("g", b"g"))
    inputs = [unpack.blob(good, compression), unpack.blob(other, compression)]
    unpack.dest.mkdir(parents=True)
    with pytest.raises(LayerRejected, match="diff_id") as info:
        flatten.unpack_layers(inputs, unpack.dest, diff_ids=[_diff_id(good), _diff_id(good)])
    assert info.value.hint
    shutil.rmtree(unpack.dest)
    unpack.dest.mkdir()
    stats = flatten.unpack_layers(inputs, unpack.dest, diff_ids=[_diff_id(good), _diff_id(other)])
    assert stats.layers == 2


@pytest.mark.parametrize("count", [0, 1, 3])
def test_diff_ids_must_match_the_layers_one_to_one(unpack, count):
    layer = tar(reg("f", b"f"))
    unpack.dest.mkdir(parents=True)
    with pytest.raises(LayerRejected, match="diff_ids"):
        flatten.unpack_layers([unpack.blob(layer), unpack.blob(layer)], unpack.dest,
                              diff_ids=[_diff_id(layer)] * count)
    assert names(unpack.dest) == []


# -- issue 10, class 10: holes stay holes; size bounded by the quota and the free space --------
def test_sparse_file_keeps_its_holes(unpack, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(2 << 30)
        f.seek(1 << 30)
        f.write(b"middle" * 50_000)
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=posix", "-cf", str(archive), "-C", str(src),
                    "sparse"], check=True)
    assert archive.stat().st_size < 1 << 20
    stats = unpack(archive.read_bytes())
    out = unpack.dest / "sparse"
    st = os.stat(out)
    assert st.st_size == 2 << 30
    assert st.st_blocks * 512 < 4 << 20  # was 2 GiB of zeros
    with open(out, "rb") as f:
        f.seek((1 << 30) - 2)
        assert f.read(8) == b"\0\0middle"
    assert 300_000 <= stats.bytes < 1 << 20  # data, not the apparent size


def test_unpack_over_the_policy_limit_stops_before_writing(unpack):
    layer = tar(reg("small", b"s"), reg("big", b"b" * (3 << 20)))
    unpack.dest.mkdir(parents=True)
    with pytest.raises(StorageError, match="quota") as info:
        flatten.unpack_layers([unpack.blob(layer)], unpack.dest, limit=1 << 20)
    assert "local_quota" in info.value.hint
    assert names(unpack.dest) == []


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_decompression_bomb_stops_at_the_limit(unpack, compression):
    """64 MiB of zeros in a few KiB: inflating stops once past the limit."""
    bomb = tar(reg("zeros", b"\0" * (64 << 20)))
    blob = compress(bomb, compression)
    assert len(blob) < 1 << 20
    unpack.dest.mkdir(parents=True)
    with pytest.raises(StorageError, match="quota"):
        flatten.unpack_layers([unpack.blob(b"", compression, raw=blob)], unpack.dest,
                              limit=8 << 20)
    assert names(unpack.dest) == []


def test_layer_larger_than_the_free_space_is_refused_before_writing(unpack, monkeypatch):
    """The free-space check (statvfs) runs before the first write of a layer."""
    real = os.statvfs

    class Small:
        def __init__(self, st):
            self.f_blocks, self.f_frsize, self.f_files = st.f_blocks, st.f_frsize, st.f_files
            self.f_bavail, self.f_favail = 64, st.f_favail  # 64 blocks left

    monkeypatch.setattr(flatten.os, "statvfs", lambda p: Small(real(p)))
    layer = tar(reg("big", b"b" * (4 << 20)))
    unpack.dest.mkdir(parents=True)
    with pytest.raises(NoSpace, match="no space left") as info:
        flatten.unpack_layers([unpack.blob(layer, "none")], unpack.dest)
    assert info.value.hint and "free" in info.value.message
    assert names(unpack.dest) == []


# -- issue 10, class 4: any depth, bounded open files -------------------------------------------
DEEP_CHILD = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))
from pathlib import Path
from uctr_batch import fsutil
from uctr_batch.image import flatten
blobs, dest = sys.argv[1:-1], Path(sys.argv[-1])
dest.mkdir(parents=True)
stats = flatten.unpack_layers([(b, None) for b in blobs], dest)
print(stats.files)
fsutil.remove_tree(dest)
print(dest.exists())
"""


@pytest.mark.deep
def test_deep_trees_unpack_and_are_removed_with_few_open_files(tmp_path):
    """1100 levels (a legal 2.2k-character name) and, through a symlink, a real path of
    ~4400 levels (far beyond PATH_MAX): unpacked and removed with at most 400 open files
    (the old writer opened one fd per level and rmtree recursed: exit 70)."""
    deep = "a/" * 1100
    far = "b/" * 1999
    lower = tar(reg(deep + "file", b"deep"), sym("s", deep.rstrip("/")))
    upper = tar(reg("s/" + far + "f2", b"far"), reg("s/" + far + "f3", b"far"))
    blobs = []
    for index, layer in enumerate((lower, upper)):
        blob = tmp_path / f"layer{index}"
        blob.write_bytes(layer)
        blobs.append(str(blob))
    result = subprocess.run([sys.executable, "-c", DEEP_CHILD, *blobs, str(tmp_path / "root")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["3", "False"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "symlink-to-dev-zero"])
def test_a_blob_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, kind):
    # a group-shared cache: another member swaps a layer blob for a FIFO or a link to
    # /dev/zero; opening it used to wait forever (FIFO) or read without end
    blob = tmp_path / "blob"
    if kind == "fifo":
        os.mkfifo(blob)
    else:
        os.symlink("/dev/zero", blob)
    dest = tmp_path / "root"
    dest.mkdir()
    with pytest.raises(StorageError, match="cannot read layer") as info:
        flatten.unpack_layers([(str(blob), None)], dest)
    assert info.value.hint
    assert os.listdir(dest) == []
