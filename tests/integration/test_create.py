"""`uctr create / ps / rm` end to end: images pulled from the real registry, unpacked on the
node, as root and as the unprivileged test user, concurrently, and with hostile layers."""

import json
import os
import pwd
import shutil
from pathlib import Path

import pytest

from tests.harness import users
from tests.harness.images import TestImage
from tests.harness.oci import TAG, ImageConfig, Layer, LayerBuilder, LayoutWriter
from tests.unit.layer_tars import dir_, reg, sym, tar

N = 8


def ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


def unpack_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("unpacking ")]


def work_dirs(bundles: Path):
    return (
        [n for n in os.listdir(bundles) if n.startswith((".tmp-", ".rm-"))]
        if bundles.exists()
        else []
    )


def test_create_prints_only_the_rootfs_path_and_reuses_it(uctr, pushed, test_images):
    ref = pushed["busybox"]
    result = uctr("create", "-v", ref)
    out = ok(result)
    digest = test_images["busybox"].manifest_digest().split(":")[1]
    expected = uctr.dirs().local / "bundles" / digest / "rootfs"
    assert out == f"{expected}\n"
    assert (expected / "bin/busybox").is_file() and os.readlink(expected / "bin/sh") == "busybox"
    assert len(unpack_lines(result.stderr)) == 1
    again = uctr("create", "-v", ref)
    assert ok(again) == out and unpack_lines(again.stderr) == []
    meta = json.loads((expected.parent / "image.json").read_text())
    assert meta["reference"] == ref and meta["config"]["Cmd"] == ["/bin/sh"]
    assert (uctr.dirs().local.stat().st_mode & 0o777) == 0o700


def test_concurrent_creates_download_once_and_unpack_once(uctr, pushed, test_images, registry_http):
    image = test_images["debian"]
    ref = pushed["debian"]
    blobs = [image.manifest()["config"]["digest"]] + image.layer_digests()
    before = {d: registry_http.blob_gets(d) for d in blobs}
    procs = [uctr.popen("create", "-v", ref) for _ in range(N)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert [rc for _, _, rc in results] == [0] * N, [err for _, err, _ in results]
    paths = {out for out, _, _ in results}
    assert len(paths) == 1 and paths.pop().count("\n") == 1
    assert sum(len(unpack_lines(err)) for _, err, _ in results) == 1
    assert {d: registry_http.blob_gets(d) - before[d] for d in blobs} == {d: 1 for d in blobs}
    assert work_dirs(uctr.dirs().local / "bundles") == []
    listed = json.loads(ok(uctr("ps", "--json")))
    assert [b["reference"] for b in listed] == [ref]


@pytest.fixture
def user():
    if not users.can_switch_user():
        pytest.skip("needs root and the test user to switch to")
    return users.TEST_USER


def test_create_as_the_unprivileged_user(uctr, pushed, user):
    out = ok(uctr("create", pushed["layers"], user=user))
    rootfs = Path(out.strip())
    uid = pwd.getpwnam(user).pw_uid
    assert os.lstat(uctr.dirs(user).local).st_uid == uid
    assert os.lstat(rootfs / "locked").st_uid == uid
    assert (rootfs / "locked").stat().st_mode & 0o777 == 0o500
    assert (rootfs / "locked/late").read_bytes() == b"added to a 0500 dir by a later layer\n"
    listed = json.loads(ok(uctr("ps", "--json", user=user)))
    assert [b["rootfs"] for b in listed] == [str(rootfs)]
    ok(uctr("rm", listed[0]["id"][:12], user=user))  # 0500 dirs inside do not stop it
    assert not rootfs.parent.exists()


def test_planted_local_directory_is_refused(uctr, pushed, user):
    base = uctr.dirs(user).base
    planted = base / "planted-by-root"
    planted.mkdir(mode=0o755)  # owned by root, like a directory another user made in /tmp
    result = uctr("create", pushed["busybox"], user=user, env={"UCTR_LOCAL_DIR": planted})
    assert result.returncode == 1 and result.stdout == ""
    assert (
        f"error: refusing to use the node-local directory: {planted}: it belongs to root"
        in result.stderr
    )
    assert "hint:" in result.stderr and "UCTR_LOCAL_DIR" in result.stderr
    assert os.listdir(planted) == []

    attacker = base / "attacker-target"
    attacker.mkdir(mode=0o777)
    link = base / "symlinked"
    link.symlink_to(attacker)
    result = uctr("create", pushed["busybox"], user=user, env={"UCTR_LOCAL_DIR": link})
    assert result.returncode == 1 and "it is a symbolic link" in result.stderr
    assert os.listdir(attacker) == []


def _hostile_image(root: Path, name: str, *layers: bytes) -> TestImage:
    writer = LayoutWriter(root / name)
    writer.tag(
        writer.add_image(ImageConfig(cmd=["/bin/sh"]), [Layer.from_tar(t) for t in layers]), TAG
    )
    return TestImage(name, root / name)


def test_hostile_layers_are_rejected_or_neutralised(uctr, push, registry_http, tmp_path):
    outside = uctr.dirs().base / "outside"
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"original\n")
    good = LayerBuilder().dir("etc").file("etc/hostname", b"ok\n").tar_bytes()

    traversal = _hostile_image(
        tmp_path, "traversal", good, tar(reg("../../../outside/escape", b"pwned"))
    )
    result = uctr("create", push(traversal, registry_http))
    assert result.returncode == 5 and result.stdout == ""
    assert "error: layer sha256:" in result.stderr and "rejected: path with '..'" in result.stderr
    assert json.loads(ok(uctr("ps", "--json"))) == []
    assert work_dirs(uctr.dirs().local / "bundles") == []

    through = _hostile_image(
        tmp_path,
        "through",
        tar(sym("link", str(outside)), sym("up", "../../../..")),
        tar(reg("link/sentinel", b"pwned"), reg("up/outside/new", b"pwned")),
    )
    rootfs = Path(ok(uctr("create", push(through, registry_http))).strip())
    assert (rootfs / str(outside).lstrip("/") / "sentinel").read_bytes() == b"pwned"
    assert sorted(os.listdir(outside)) == ["sentinel"]
    assert (outside / "sentinel").read_bytes() == b"original\n"


def test_no_pull_of_a_missing_image(uctr, registry_http):
    result = uctr("create", "--no-pull", f"{registry_http.host}/never/pushed:1")
    assert result.returncode == 1 and result.stdout == ""
    assert "not in the cache" in result.stderr and "uctr pull" in result.stderr


def test_ps_and_rm(uctr, pushed, tmp_path):
    rootfs = Path(ok(uctr("create", pushed["busybox"])).strip())
    table = ok(uctr("ps")).splitlines()
    assert table[0].split() == ["ID", "REFERENCE", "SIZE", "CREATED", "LAST", "USED"]
    assert table[1].split()[:2] == [rootfs.parent.name[:12], pushed["busybox"]]
    assert ok(uctr("rm", rootfs.parent.name[:12])) == f"{rootfs.parent}\n"
    assert json.loads(ok(uctr("ps", "--json"))) == []
    again = uctr("rm", rootfs.parent.name[:12])
    assert again.returncode == 2 and "no such bundle" in again.stderr

    victim = uctr.dirs().base / "not-a-bundle"
    victim.mkdir()
    refused = uctr("rm", victim)
    assert refused.returncode == 2 and "not a uctr bundle" in refused.stderr and victim.exists()


def test_create_dest(uctr, pushed):
    dest = uctr.dirs().base / "jobs" / "bundle"
    out = ok(uctr("create", "--dest", dest, pushed["busybox"]))
    assert out == f"{dest / 'rootfs'}\n"
    assert json.loads((dest / "image.json").read_text())["reference"] == pushed["busybox"]
    assert ok(uctr("create", "--dest", dest, pushed["busybox"])) == out
    other = uctr("create", "--dest", dest, pushed["layers"])
    assert other.returncode == 1 and "holds another image" in other.stderr
    assert json.loads(ok(uctr("ps", "--json"))) == []  # ps lists the node-local store only
    ok(uctr("rm", dest))
    assert not dest.exists() and os.listdir(dest.parent) == []
    shutil.rmtree(dest.parent)


# -- issue 10 ---------------------------------------------------------------------------------
@pytest.mark.deep
def test_deep_tree_image_creates_and_removes_as_the_user(uctr, push, registry_http, tmp_path,
                                                         user, pushed):
    """A 1100-level tree (a legal 2.2k-character name) in 0500 directories: create, then
    other creates, then rm all work (it was exit 70, and every later create too)."""
    deep = "d/" * 1100
    image = _hostile_image(tmp_path, "deep", tar(dir_("top", mode=0o500),
                                                 reg("top/" + deep + "f", b"deep")))
    ref = push(image, registry_http)
    created = uctr("create", ref, user=user)
    assert created.returncode == 0, created.stderr
    rootfs = Path(created.stdout.strip())
    assert ok(uctr("create", pushed["busybox"], user=user))
    assert ok(uctr("rm", rootfs.parent.name[:12], user=user)) == f"{rootfs.parent}\n"
    assert not rootfs.parent.exists()
    assert work_dirs(uctr.dirs(user).local / "bundles") == []


def test_truncated_zstd_layer_is_rejected_end_to_end(uctr, push, registry_http, tmp_path):
    body = tar(reg("a", os.urandom(100_000)), reg("b", b"last"))
    whole = Layer.from_tar(body, "zstd")
    cut = Layer(whole.blob[: len(whole.blob) // 2], whole.media_type, whole.diff_id)
    image = _hostile_image_layers(tmp_path, "cutzstd", cut)
    result = uctr("create", push(image, registry_http))
    assert result.returncode == 5, result.stderr
    assert "error: layer sha256:" in result.stderr and "hint:" in result.stderr
    assert "Traceback" not in result.stderr
    assert work_dirs(uctr.dirs().local / "bundles") == []


def test_layer_not_matching_its_diff_id_is_rejected_end_to_end(uctr, push, registry_http,
                                                                tmp_path):
    real = Layer.from_tar(tar(reg("f", b"real")))
    lying = Layer(real.blob, real.media_type, Layer.from_tar(tar(reg("f", b"other"))).diff_id)
    result = uctr("create", push(_hostile_image_layers(tmp_path, "lying", lying), registry_http))
    assert result.returncode == 5, result.stderr
    assert "diff_id" in result.stderr and "hint:" in result.stderr
    assert work_dirs(uctr.dirs().local / "bundles") == []


def _hostile_image_layers(root: Path, name: str, *layers: Layer) -> TestImage:
    writer = LayoutWriter(root / name)
    writer.tag(writer.add_image(ImageConfig(cmd=["/bin/sh"]), list(layers)), TAG)
    return TestImage(name, root / name)
