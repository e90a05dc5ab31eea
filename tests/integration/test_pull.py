"""`uctr pull` and ensure_image against the real local registry, plus the cache commands on
a pulled image (images, inspect, rmi, gc, verify)."""

import hashlib
import json
import os
import pty
import select
import subprocess
import time

import pytest

from uctr_batch import settings
from uctr_batch.errors import ConfigError, ImageNotFound
from uctr_batch.image import pull
from uctr_batch.image.store import Store


def ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


def blob_file(uctr, digest):
    return uctr.dirs().cache / "blobs" / "sha256" / digest.split(":")[1]


def registry_config(registry, **kw):
    return settings.RegistryConfig(insecure=(registry.host,), **kw)


def test_pull_stores_verified_blobs_and_prints_reference(uctr, pushed, test_images):
    busybox = test_images["busybox"]
    result = uctr("pull", pushed["busybox"])
    assert ok(result).split() == [pushed["busybox"], busybox.manifest_digest()]
    assert result.stderr == ""  # not a TTY: no progress bar, no chatter
    heads = [busybox.manifest_digest(), busybox.manifest()["config"]["digest"]]
    for digest in heads + busybox.layer_digests():
        data = blob_file(uctr, digest).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    info = json.loads(ok(uctr("inspect", pushed["busybox"])))
    assert info["manifest_digest"] == busybox.manifest_digest()
    assert [la["digest"] for la in info["layers"]] == busybox.layer_digests()
    assert info["config"] == busybox.config() and info["platform"] == "linux/amd64"


def test_repull_downloads_no_blob(uctr, pushed, test_images, registry_http):
    image = test_images["layers"]
    ok(uctr("pull", pushed["layers"]))
    before = {d: registry_http.blob_gets(d) for d in image.layer_digests()}
    assert all(n >= 1 for n in before.values())
    again = uctr("pull", "-v", pushed["layers"])
    ok(again)
    assert {d: registry_http.blob_gets(d) for d in image.layer_digests()} == before
    for digest in image.layer_digests():
        assert f"{digest}: cached" in again.stderr


def test_ensure_image_uses_the_cache_without_asking_the_registry(tmp_path, pushed, registry_http,
                                                                  test_images):
    store = Store(tmp_path / "cache")
    config = registry_config(registry_http)
    with pytest.raises(ImageNotFound, match="not in the cache") as exc:
        pull.ensure_image(pushed["busybox"], config, store, pull=False)
    assert exc.value.hint == f"pull it first: uctr pull {pushed['busybox']}"
    rec = pull.ensure_image(pushed["busybox"], config, store)
    assert rec.manifest_digest == test_images["busybox"].manifest_digest()
    requests_before = len(registry_http.access_log())
    assert pull.ensure_image(pushed["busybox"], config, store) == rec
    assert pull.ensure_image(pushed["busybox"], config, store, pull=False) == rec
    assert len(registry_http.access_log()) == requests_before
    # a layer lost from the cache (verify --remove, gc) is fetched again
    os.unlink(store.blob_path(rec.layers[0].digest))
    with pytest.raises(ImageNotFound, match="incomplete"):
        pull.ensure_image(pushed["busybox"], config, store, pull=False)
    assert pull.ensure_image(pushed["busybox"], config, store) == rec
    assert store.has_blob(rec.layers[0].digest)


@pytest.mark.parametrize("platform,arch", [
    (None, "amd64"), ("linux/arm64", "arm64"), ("linux/arm64/v8", "arm64")])
def test_platform_selection_from_an_index(uctr, pushed, test_images, platform, arch):
    multiarch = test_images["multiarch"]
    extra = ["--platform", platform] if platform else []
    assert ok(uctr("pull", *extra, pushed["multiarch"])).split() == [
        pushed["multiarch"], multiarch.manifest_digest(arch)]
    info = json.loads(ok(uctr("inspect", *extra, pushed["multiarch"])))
    assert [la["digest"] for la in info["layers"]] == multiarch.layer_digests(arch)
    assert info["index_digest"] == multiarch.top_descriptor()["digest"]
    assert info["platform"].split("/")[:2] == ["linux", arch]


def test_both_platforms_live_side_by_side(uctr, pushed, test_images):
    ok(uctr("pull", pushed["multiarch"]))
    ok(uctr("pull", "--platform", "linux/arm64", pushed["multiarch"]))
    entries = json.loads(ok(uctr("images", "--json")))
    assert sorted(e["platform"] for e in entries) == ["linux/amd64", "linux/arm64"]


def test_unknown_platform_lists_the_available_ones(uctr, pushed):
    result = uctr("pull", "--platform", "linux/s390x", pushed["multiarch"])
    assert result.returncode == 4
    assert "no linux/s390x image in" in result.stderr
    assert "hint: available platforms: linux/amd64, linux/arm64" in result.stderr
    bad = uctr("pull", "--platform", "linux", pushed["multiarch"])
    assert bad.returncode == 2 and 'invalid platform "linux"' in bad.stderr


def test_single_platform_image_refuses_another_platform(uctr, pushed):
    result = uctr("pull", "--platform", "linux/arm64", pushed["busybox"])
    assert result.returncode == 4 and "is a linux/amd64 image, not linux/arm64" in result.stderr


def test_digest_reference(uctr, pushed, test_images, registry_http):
    busybox = test_images["busybox"]
    by_digest = f"{registry_http.host}/busybox@{busybox.manifest_digest()}"
    assert ok(uctr("pull", by_digest)).split() == [by_digest, busybox.manifest_digest()]
    pushed["busybox"]  # noqa: B018 - make sure it is on the registry
    info = json.loads(ok(uctr("inspect", by_digest)))
    assert info["reference"] == by_digest
    row = ok(uctr("images")).splitlines()[1].split()
    assert row[:3] == [f"{registry_http.host}/busybox", "<none>", busybox.manifest_digest()[:19]]
    missing = f"{registry_http.host}/busybox@sha256:{'0' * 64}"
    result = uctr("pull", missing)
    assert result.returncode == 4 and "not found" in result.stderr


def test_index_digest_reference(uctr, pushed, test_images, registry_http):
    multiarch = test_images["multiarch"]
    pushed["multiarch"]  # noqa: B018
    ref = f"{registry_http.host}/multiarch@{multiarch.top_descriptor()['digest']}"
    out = ok(uctr("pull", "--platform", "linux/arm64", ref))
    assert out.split() == [ref, multiarch.manifest_digest("arm64")]


def test_allow_and_deny(tmp_path, pushed, registry_http):
    store = Store(tmp_path / "cache")
    ref = pushed["busybox"]
    host = registry_http.host
    for config, why in [
        (registry_config(registry_http, deny=(f"{host}/busy*",)), "denied by"),
        (registry_config(registry_http, allow=("docker.io/library/*",)), "not in the allowed"),
        (registry_config(registry_http, allow=(f"{host}/*",), deny=("*:1",)), "denied by"),
    ]:
        with pytest.raises(ConfigError, match=why) as exc:
            pull.ensure_image(ref, config, store)
        assert exc.value.hint
    assert list(store.blobs()) == []
    allowed = registry_config(registry_http, allow=(f"{host}/*",), deny=("*/debian*",))
    rec = pull.ensure_image(ref, allowed, store)
    assert rec.reference == ref


def test_allow_and_deny_from_the_site_policy(uctr, tmp_path, pushed, registry_http):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefaults:\n  registries:\n"
                      f"    deny: ['{registry_http.host}/busybox*']\n")
    result = uctr("pull", pushed["busybox"], env={"UCTR_POLICY": policy})
    assert result.returncode == 1, result.stderr
    assert "refused by the site policy" in result.stderr


def test_cache_commands_on_a_pulled_image(uctr, pushed, test_images):
    busybox = test_images["busybox"]
    ok(uctr("pull", pushed["busybox"]))
    table = ok(uctr("images")).splitlines()
    assert table[0].split()[:3] == ["REPOSITORY", "TAG", "DIGEST"]
    repo, tag = pushed["busybox"].rsplit(":", 1)
    assert table[1].split()[:3] == [repo, tag, busybox.manifest_digest()[:19]]

    layer = blob_file(uctr, busybox.layer_digests()[0])
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 1
    layer.write_bytes(bytes(data))
    result = uctr("verify")
    assert result.returncode == 1
    assert result.stdout.startswith(f"bad {busybox.layer_digests()[0]}")
    result = uctr("verify", "--remove")
    assert result.returncode == 0
    assert result.stdout.startswith(f"removed {busybox.layer_digests()[0]}")
    assert not layer.exists()
    ok(uctr("pull", pushed["busybox"]))  # fetches the removed layer again
    assert ok(uctr("verify")) == ""

    assert "untagged" in ok(uctr("rmi", pushed["busybox"]))
    assert ok(uctr("images", "--json")).strip() == "[]"
    result = uctr("rmi", pushed["busybox"])
    assert result.returncode == 1 and "no such image" in result.stderr
    # blobs stay until gc, and gc keeps young blobs (a concurrent pull may own them)
    assert layer.exists()
    assert ok(uctr("gc")) == ""
    old = time.time() - 7200
    for path in (uctr.dirs().cache / "blobs" / "sha256").iterdir():
        os.utime(path, (old, old))
    out = ok(uctr("gc"))
    assert f"removed {busybox.layer_digests()[0]}" in out
    assert list((uctr.dirs().cache / "blobs" / "sha256").iterdir()) == []


def test_progress_bar_only_on_a_tty(uctr, pushed):
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(uctr.argv("pull", pushed["layers"]), env=uctr.env(),
                                cwd=uctr.dirs().base, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        seen = b""
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the pty
                break
            if not chunk:
                break
            seen += chunk
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
    assert proc.returncode == 0, seen
    assert out.decode().startswith(pushed["layers"])
    text = seen.decode(errors="replace")
    assert "\r" in text and "MB/s" in text and pushed["layers"] in text
    assert "MB" not in ok(uctr("pull", pushed["layers"]))  # stdout stays clean


def test_unreachable_registry_is_a_registry_error(uctr):
    env = {"UCTR_RETRIES": "0", "UCTR_INSECURE_REGISTRIES": "127.0.0.1:9"}
    result = uctr("pull", "127.0.0.1:9/none:1", env=env)
    assert result.returncode == 4 and "error:" in result.stderr and "Traceback" not in result.stderr


def test_unprivileged_user_gets_a_private_cache(uctr, pushed, test_user):
    import pwd

    assert ok(uctr("pull", pushed["busybox"], user=test_user)).startswith(pushed["busybox"])
    cache = uctr.dirs(test_user).cache
    st = cache.stat()
    assert st.st_uid == pwd.getpwnam(test_user).pw_uid and st.st_mode & 0o777 == 0o700
    assert ok(uctr("verify", user=test_user)) == ""
