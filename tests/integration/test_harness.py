"""The harness checks itself: registries answer, skopeo gets pushed images back byte for byte,
the test images hold what they claim, the fault proxy injects each fault, and the uctr runner
really switches to the unprivileged user. None of this uses uctr_batch's own image code.
"""

import hashlib
import http.client
import json
import os
import socket
import subprocess
import tarfile
import time

import pytest

from tests.harness.oci import MT_LAYER_GZIP, MT_LAYER_TAR, MT_LAYER_ZSTD


def curl(*args):
    return subprocess.run(["curl", "-s", "-S", *args], capture_output=True, text=True)


def skopeo_pull(ref, registry, dest, *extra, creds=True):
    argv = ["skopeo", "--insecure-policy", "copy", "--quiet",
            *registry.skopeo_args("src", creds=creds),
            *extra, f"docker://{ref}", f"oci:{dest}:pulled"]
    return subprocess.run(argv, capture_output=True, text=True)


def oci_manifest(layout, tag):
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"]
                 if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    return entry["digest"], json.loads(
        (layout / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_text())


def layer_members(image, index):
    """Names of the tar members of layer INDEX, read with tarfile (gzip or plain)."""
    digest = image.layer_digests()[index]
    path = image.layout / "blobs" / "sha256" / digest.split(":")[1]
    with tarfile.open(path, "r:*") as tar:
        return {m.name: m for m in tar.getmembers()}


# -- registries ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,status,challenge", [
    ("registry_http", 200, None),
    ("registry_tls", 200, None),
    ("registry_token", 401, "Bearer realm="),
    ("registry_basic", 401, 'Basic realm="uctr-test"'),
])
def test_registry_answers_v2(request, name, status, challenge):
    registry = request.getfixturevalue(name)
    result = curl("-i", *registry.curl_args(), f"{registry.url}/v2/")
    assert result.returncode == 0, result.stderr
    head = result.stdout.split("\r\n\r\n")[0]
    assert head.split()[1] == str(status), head
    if challenge:
        assert challenge in head
    assert registry.url.startswith(registry.scheme + "://" + registry.host)


def test_tls_registry_rejects_unknown_ca(registry_tls):
    result = curl(f"{registry_tls.url}/v2/")
    assert result.returncode == 60  # peer certificate cannot be authenticated


def test_tls_certificate_names_loopback_in_san(registry_tls):
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName",
                           "-in", registry_tls.ca_file], capture_output=True, text=True).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text


@pytest.mark.parametrize("registry_name", ["registry_http", "registry_tls", "registry_token",
                                           "registry_basic"])
def test_skopeo_gets_pushed_busybox_back_unchanged(request, registry_name, push, test_images,
                                                    tmp_path):
    registry = request.getfixturevalue(registry_name)
    image = test_images["busybox"]
    ref = push(image, registry)
    assert ref == f"{registry.host}/busybox:1"
    result = skopeo_pull(ref, registry, tmp_path / "back")
    assert result.returncode == 0, result.stderr
    digest, manifest = oci_manifest(tmp_path / "back", "pulled")
    assert digest == image.manifest_digest()
    assert [layer["digest"] for layer in manifest["layers"]] == image.layer_digests()


def test_pushed_refs_live_on_registry_http(pushed, registry_http):
    assert pushed["busybox"] == f"{registry_http.host}/busybox:1"
    tags = curl(f"{registry_http.url}/v2/busybox/tags/list").stdout
    assert json.loads(tags)["tags"] == ["1"]


def test_registry_counts_blob_gets(pushed, registry_http, test_images, tmp_path):
    layer = test_images["busybox"].layer_digests()[0]
    before = registry_http.blob_gets(layer)
    result = skopeo_pull(pushed["busybox"], registry_http, tmp_path / "a")
    assert result.returncode == 0, result.stderr
    assert registry_http.blob_gets(layer) == before + 1


# -- token auth ------------------------------------------------------------------------------
def test_token_registry_allows_anonymous_pull(registry_token, push, tmp_path):
    ref = push("busybox", registry_token, repo="anon-pull")
    result = skopeo_pull(ref, registry_token, tmp_path / "anon", "--src-no-creds",
                         creds=False)
    assert result.returncode == 0, result.stderr
    grants = [g for g in registry_token.token_server.issued if g["account"] is None
              and any(a["name"] == "anon-pull" for a in g["access"])]
    assert grants and all(a["actions"] == ["pull"] for g in grants for a in g["access"])


def test_token_registry_refuses_anonymous_push(registry_token, test_images):
    argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
            "--dest-no-creds", test_images["busybox"].oci_ref,
            f"docker://{registry_token.host}/anon-push:1"]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode != 0
    assert "unauthorized" in result.stderr.lower() or "denied" in result.stderr.lower()


def test_token_server_rejects_wrong_password(registry_token):
    realm = registry_token.token_server.realm
    query = "?service=uctr-registry&scope=repository:busybox:pull"
    wrong = curl("-o", "/dev/null", "-w", "%{http_code}", "-u", "uctr:wrong", realm + query)
    right = curl("-w", "\n%{http_code}", "-u", "uctr:uctrpass",
                 realm + query.replace("pull", "pull,push"))
    assert wrong.stdout == "401"
    body, code = right.stdout.rsplit("\n", 1)
    assert code == "200"
    token = json.loads(body)["token"]
    claims = json.loads(_b64decode(token.split(".")[1]))
    assert claims["access"] == [{"type": "repository", "name": "busybox",
                                 "actions": ["pull", "push"]}]
    assert claims["aud"] == "uctr-registry"


def _b64decode(part):
    import base64
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# -- images ----------------------------------------------------------------------------------
def test_busybox_image_runs_its_applets(test_images, tmp_path):
    members = layer_members(test_images["busybox"], 0)
    assert members["bin/busybox"].mode == 0o755
    for applet in ("sh", "true", "cat", "id", "sleep", "env"):
        assert members[f"bin/{applet}"].issym() and members[f"bin/{applet}"].linkname == "busybox"
    config = test_images["busybox"].config()
    assert config["config"]["Cmd"] == ["/bin/sh"]
    assert any(e.startswith("PATH=") for e in config["config"]["Env"])


def test_layers_image_holds_every_tricky_entry(test_images):
    image = test_images["layers"]
    types = [layer["mediaType"] for layer in image.manifest()["layers"]]
    assert types == [MT_LAYER_GZIP, MT_LAYER_TAR, MT_LAYER_GZIP]
    one, two = layer_members(image, 0), layer_members(image, 1)
    assert one["secret"].mode == 0 and one["locked"].mode == 0o500
    assert one["bin/suid"].mode & 0o4000 and one["fifo/pipe"].isfifo()
    assert one["data/hard1"].islnk() and one["links/abs"].linkname == "/data/file1"
    whiteouts = {".wh.toplevel-file", ".wh.toplevel-dir", "a/.wh.gone", "opaque/.wh..wh..opq"}
    assert whiteouts <= set(two)
    assert two["other/hard-lower"].islnk() and two["other/hard-lower"].linkname == "data/file1"
    assert two["dir-to-file"].isfile() and two["file-to-dir"].isdir()


def test_layers_zstd_differs_only_in_last_layer_compression(test_images):
    plain, zstd = test_images["layers"], test_images["layers-zstd"]
    assert plain.layer_digests()[:2] == zstd.layer_digests()[:2]
    assert zstd.manifest()["layers"][2]["mediaType"] == MT_LAYER_ZSTD
    assert plain.config()["rootfs"] == zstd.config()["rootfs"]  # same diff_ids, same rootfs


def test_zstd_layer_survives_push_unchanged(push, registry_http, test_images, tmp_path):
    ref = push("layers-zstd", registry_http)
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                         capture_output=True, text=True, check=True).stdout
    digests = [layer["digest"] for layer in json.loads(raw)["layers"]]
    assert digests == test_images["layers-zstd"].layer_digests()


def test_umoci_unpacks_the_test_images(test_images, tmp_path):
    """The correctness oracle must accept every image (multiarch through its per-arch tags)."""
    refs = [test_images["busybox"].oci_ref, test_images["layers"].oci_ref,
            test_images["multiarch"].platform_ref("amd64"),
            test_images["multiarch"].platform_ref("arm64")]
    for number, ref in enumerate(refs):
        image = ref[len("oci:"):]
        result = subprocess.run(["umoci", "unpack", "--rootless", "--image", image,
                                 str(tmp_path / str(number))], capture_output=True, text=True)
        assert result.returncode == 0, (ref, result.stderr)
    rootfs = tmp_path / "1" / "rootfs"
    assert not (rootfs / "toplevel-file").exists() and (rootfs / "opaque" / "new").exists()
    assert (tmp_path / "3" / "rootfs" / "arch-marker").read_text() == "arm64\n"


def test_multiarch_is_an_index_of_amd64_and_arm64(pushed, registry_http, tmp_path):
    ref = pushed["multiarch"]
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                         capture_output=True, text=True, check=True).stdout
    platforms = {(m["platform"]["architecture"], m["platform"].get("variant"))
                 for m in json.loads(raw)["manifests"]}
    assert platforms == {("amd64", None), ("arm64", "v8")}
    result = skopeo_pull(ref, registry_http, tmp_path / "arm", "--override-arch", "arm64")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_debian_image_is_minbase_with_empty_dev(test_images):
    image = test_images["debian"]
    members = layer_members(image, 0)
    names = {name[2:] if name.startswith("./") else name for name in members}
    assert "etc/debian_version" in names and "usr/bin/apt-get" in names
    assert not [n for n in names if n.startswith("dev/")]
    assert not [m for m in members.values() if m.ischr() or m.isblk()]
    assert image.config()["config"]["Cmd"] == ["bash"]


def test_debian_cache_is_reused(test_images):
    from tests.harness import debian
    layout = test_images["debian"].layout
    started = time.monotonic()
    assert debian.cached_debian_layout() == layout
    assert time.monotonic() - started < 5
    assert layout.parent == debian.cache_root()


# -- fault proxy -----------------------------------------------------------------------------
def _get(proxy, path, headers=None, timeout=10):
    conn = http.client.HTTPConnection(proxy.host, timeout=timeout)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    try:
        body = resp.read()
    except http.client.IncompleteRead as err:
        body = err.partial
    return resp, body


@pytest.fixture
def blob(pushed, test_images):
    pushed["busybox"]
    digest = test_images["busybox"].layer_digests()[0]
    return f"/v2/busybox/blobs/{digest}", test_images["busybox"].blob(digest)


def test_proxy_passes_through_with_range(fault_proxy, blob):
    path, data = blob
    resp, body = _get(fault_proxy, path)
    assert resp.status == 200 and body == data
    resp, body = _get(fault_proxy, path, {"Range": "bytes=100-"})
    assert resp.status == 206 and body == data[100:]
    assert resp.getheader("Content-Range") == f"bytes 100-{len(data) - 1}/{len(data)}"
    assert [(r.status, r.range) for r in fault_proxy.matching("/blobs/")] == [
        (200, None), (206, "bytes=100-")]


def test_proxy_fails_n_times_then_passes(fault_proxy, blob):
    path, data = blob
    fault_proxy.fail("/blobs/", status=500, times=2)
    statuses = [_get(fault_proxy, path)[0].status for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert fault_proxy.blob_gets(path.rsplit("/", 1)[1]) == 3


def test_proxy_rate_limits_with_retry_after(fault_proxy, blob):
    path, _ = blob
    fault_proxy.rate_limit("/blobs/", retry_after=3)
    resp, _ = _get(fault_proxy, path)
    assert resp.status == 429 and resp.getheader("Retry-After") == "3"


def test_proxy_truncates_body(fault_proxy, blob):
    path, data = blob
    fault_proxy.truncate("/blobs/", after=1000)
    resp, body = _get(fault_proxy, path)
    assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(data)
    assert body == data[:1000]
    assert _get(fault_proxy, path)[1] == data  # fired once


def test_proxy_corrupts_body(fault_proxy, blob):
    path, data = blob
    fault_proxy.corrupt("/blobs/", at=500)
    _, body = _get(fault_proxy, path)
    assert len(body) == len(data) and body != data
    assert hashlib.sha256(body).hexdigest() != hashlib.sha256(data).hexdigest()
    assert [i for i in range(len(data)) if body[i] != data[i]] == [500]


def test_proxy_stalls_until_client_times_out(fault_proxy, blob):
    path, _ = blob
    fault_proxy.stall("/blobs/", after=10, seconds=30)
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        conn = http.client.HTTPConnection(fault_proxy.host, timeout=1)
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.read(10) and resp.read(1)
    assert time.monotonic() - started < 5


def test_proxy_ignores_range(fault_proxy, blob):
    path, data = blob
    fault_proxy.ignore_range("/blobs/")
    resp, body = _get(fault_proxy, path, {"Range": "bytes=100-"})
    assert resp.status == 200 and body == data


def test_skopeo_pulls_through_proxy_and_rewrite(fault_proxy, pushed, tmp_path):
    ref = fault_proxy.rewrite(pushed["busybox"])
    argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
            f"docker://{ref}", f"oci:{tmp_path / 'p'}:x"]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert fault_proxy.count("/manifests/") >= 1 and fault_proxy.count("/blobs/") >= 2


# -- uctr runner -----------------------------------------------------------------------------
def test_uctr_runner_env_points_at_per_test_dirs(uctr, registry_http):
    env = uctr.env()
    dirs = uctr.dirs()
    assert env["UCTR_CACHE"] == str(dirs.cache) and env["HOME"] == str(dirs.home)
    assert registry_http.host in env["UCTR_INSECURE_REGISTRIES"].split(",")
    assert "UCTR_CACHE" not in uctr.env(env={"UCTR_CACHE": None})
    result = uctr("--help")
    assert result.returncode == 0, result.stderr


def test_uctr_runner_switches_to_test_user(uctr, test_user, run_as_test_user):
    probe = ("import os, uctr_batch; print(os.getuid(), os.environ['UCTR_LOCAL_DIR'], "
             "uctr_batch.__file__)")
    env = uctr.env(user=test_user)
    result = run_as_test_user([uctr.argv()[0], "-c", probe], env=env, cwd=uctr.dirs(test_user).base)
    assert result.returncode == 0, result.stderr
    uid, local, package = result.stdout.split()
    assert int(uid) == __import__("pwd").getpwnam(test_user).pw_uid
    assert local == str(uctr.dirs(test_user).local)
    assert os.stat(uctr.dirs(test_user).base).st_uid == int(uid)
    result = uctr("--help", user=test_user)
    assert result.returncode == 0, result.stderr


def test_fault_proxy_for_token_registry_keeps_auth_flow(fault_proxy_for, registry_token, push,
                                                          uctr, tmp_path):
    ref = push("busybox", registry_token, repo="via-proxy")
    proxy = fault_proxy_for(registry_token)
    assert proxy.host in uctr.env()["UCTR_INSECURE_REGISTRIES"].split(",")
    result = skopeo_pull(proxy.rewrite(ref), registry_token, tmp_path / "t")
    assert result.returncode == 0, result.stderr
    assert [r.status for r in proxy.matching("^/v2/$")][:1] == [401]  # challenge passed on
    assert 200 in [r.status for r in proxy.matching("/manifests/")]
