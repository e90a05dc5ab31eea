"""The malicious-layer corpus: every layer is rejected or neutralised, and sentinels outside
the rootfs stay byte-for-byte the same with no new file beside them."""

import gzip
import hashlib
import io
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


# -- layer metadata (issue 10, class 6): rejected with error + hint, or clamped; never a traceback
from tests.unit.layer_tars import pax_record, raw_member, raw_tar  # noqa: E402


def pax_file(name: bytes, records: bytes, data: bytes = b"data") -> bytes:
    return raw_tar(raw_member(name, data, pax=records))


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_non_finite_pax_mtime_is_rejected(unpack, value):
    """Go's archive/tar (docker, umoci) rejects these headers; so do we."""
    rejected(unpack, pax_file(b"f", pax_record("mtime", value)), match="invalid mtime")
    assert names(unpack.dest) == []


@pytest.mark.parametrize("value,expect", [
    ("1e30", flatten._MAX_MTIME), ("-1e30", -flatten._MAX_MTIME),
    ("99999999999999999999999", flatten._MAX_MTIME), ("-99999999999999999999", -flatten._MAX_MTIME),
    ("1700000000.5", 1700000000),
])
def test_huge_pax_mtime_is_clamped(unpack, value, expect):
    """Finite but out of range: clamped to what utimensat takes (the kernel then clamps to
    the file system's range), like an mtime from the far future in any tar."""
    unpack(pax_file(b"f", pax_record("mtime", value)))
    assert (unpack.dest / "f").read_bytes() == b"data"
    mtime = os.lstat(unpack.dest / "f").st_mtime
    assert (mtime > 4e9) if expect > 0 and expect > 2e9 else (mtime < 0 if expect < 0 else True)


@pytest.mark.parametrize("keyword", ["path", "linkpath"])
def test_nul_byte_in_a_pax_name_is_rejected(unpack, keyword):
    kind = tarfile.SYMTYPE if keyword == "linkpath" else tarfile.REGTYPE
    member = raw_member(b"f", b"", kind=kind, pax=pax_record(keyword, b"a\0b"), linkname=b"t")
    rejected(unpack, raw_tar(member), match="NUL byte")


@pytest.mark.parametrize("records", [
    pax_record("uname", b"ro\0ot") + pax_record("gname", b"\xff\xfe"),
    pax_record("uid", "-1") + pax_record("gid", "abc"),
    pax_record("uid", "1" * 40) + pax_record("gid", "1e99"),
    pax_record("atime", "nan") + pax_record("ctime", "inf"),
    pax_record("comment", "x" * 10000),
])
def test_ignored_ownership_and_times_are_harmless(unpack, records):
    """Rootless unpacks own everything and keep only mtime: odd uid/gid/uname/atime values
    change nothing (tarfile turns unparsable numbers into 0), they never crash."""
    unpack(pax_file(b"f", records))
    assert (unpack.dest / "f").read_bytes() == b"data"


@pytest.mark.parametrize("value", ["-5", "-1", "-99999999999999999999"])
def test_negative_pax_size_is_rejected(unpack, value):
    """A negative size made tarfile seek backwards (a loop over the same headers)."""
    rejected(unpack, pax_file(b"f", pax_record("size", value)), match="invalid size")


@pytest.mark.parametrize("value", ["abc", "1e3", "99999999999"])
def test_unparsable_or_huge_pax_size_never_crashes(unpack, value):
    try:
        unpack(pax_file(b"f", pax_record("size", value)))
    except LayerRejected as e:
        assert e.hint
    else:
        assert names(unpack.dest) in (["f"], [])


def test_bad_mode_field_is_rejected(unpack):
    member = bytearray(raw_member(b"f", b"x"))
    member[100:108] = b"zz\0\0\0\0\0\0"
    member[148:156] = b" " * 8
    member[148:156] = b"%06o\0 " % sum(member[:512])
    with pytest.raises(LayerRejected, match="not a valid tar"):
        unpack(raw_tar(bytes(member)))


def test_non_utf8_names_are_kept_byte_for_byte(unpack):
    unpack(raw_tar(raw_member(b"caf\xe9", b"latin1"),
                   raw_member(b"x", b"", pax=pax_record("path", b"\xff\xfe-pax"))))
    assert sorted(os.listdir(os.fsencode(unpack.dest))) == [b"caf\xe9", b"\xff\xfe-pax"]


def test_gnu_long_names_and_links(unpack):
    deep = "d/" * 60 + "long-file-name-" + "x" * 150
    info, data = reg(deep, b"long")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as out:
        out.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("l" * 200)
        link.type, link.linkname = tarfile.SYMTYPE, deep
        out.addfile(link)
    unpack(buffer.getvalue())
    assert (unpack.dest / deep).read_bytes() == b"long"
    assert os.readlink(unpack.dest / ("l" * 200)) == deep


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_huge_extended_header_is_rejected_before_it_is_read(unpack, kind):
    """tarfile reads a PAX header or GNU long name into memory whole: 1 MiB at most (Go's
    archive/tar limit)."""
    head = raw_member(b"h", b"", kind=kind, size=flatten._MAX_EXT_HEADER + 1)
    body = b"x" * (flatten._MAX_EXT_HEADER + 1024)
    rejected(unpack, raw_tar(head + body + raw_member(b"f", b"x")),
             match="extended tar header")


@pytest.mark.parametrize("sparse_map", [
    "100,10,50,10",  # out of order
    "0,10,5,10",  # overlapping
    "0,10,1000000,10",  # past the declared size
    "-10,10",  # negative offset
    "0,-5",  # negative length
])
def test_bad_pax_sparse_maps_are_rejected(unpack, sparse_map):
    records = (pax_record("GNU.sparse.map", sparse_map) + pax_record("GNU.sparse.realsize", "200")
               + pax_record("GNU.sparse.name", "sparse"))
    with pytest.raises(LayerRejected) as info:
        unpack(pax_file(b"GNUSparseFile.0/sparse", records, b"z" * 20))
    assert info.value.hint


def _sparse10(map_text: bytes, realsize: int = 4096, data: bytes = b"") -> bytes:
    records = (pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
               + pax_record("GNU.sparse.name", "sparse")
               + pax_record("GNU.sparse.realsize", str(realsize)))
    payload = map_text + b"\0" * (-len(map_text) % 512) + data
    return raw_member(b"GNUSparseFile.0/sparse", payload, pax=records)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("map_text,end", [
    (b"3\n0\n", b""),  # 3 extents announced, the archive ends
    (b"99999999999\n", b""),  # an absurd count
    (b"1\nabc\n5\n", b""),  # not a number
])
def test_cut_or_absurd_gnu_1_0_sparse_map_is_rejected(unpack, map_text, end):
    # PAX header, its records, the member header, one block of map: then the archive ends
    tail = _sparse10(map_text)[:2048] + end
    with pytest.raises(LayerRejected):
        unpack(tail, compression="none")


def test_truncated_last_file_is_rejected_not_half_copied(unpack):
    whole = raw_tar(raw_member(b"a", b"a"), raw_member(b"big", b"b" * 4096))
    cut = whole[:512 * 3 + 1000]  # the header of 'big' and part of its data
    rejected(unpack, cut, match="truncated|end of data")
    assert names(unpack.dest) == []


def test_file_data_overlapping_the_next_header_is_rejected(unpack):
    """A size that reaches into the next member's header: its data would be that header."""
    first = raw_member(b"a", b"a" * 10, size=700)  # claims 700 bytes, 512 are stored
    with pytest.raises(LayerRejected) as info:
        unpack(raw_tar(first, raw_member(b"b", b"b")))
    assert info.value.hint
