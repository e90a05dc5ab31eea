"""RegistryClient against real docker-registry instances: plain HTTP, TLS, token and Basic auth,
mirrors, redirects to blob storage, and `uctr login` / `uctr logout`."""

import base64
import hashlib
import json
import os
import pwd
import stat
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.harness.net import free_port
from tests.harness.registry import Registry
from uctr_batch.errors import AuthError, RegistryError, TransferError
from uctr_batch.image import auth, manifest
from uctr_batch.image.registry import RegistryClient
from uctr_batch.settings import RegistryConfig


@pytest.fixture(autouse=True)
def no_stored_credentials(tmp_path, monkeypatch):
    """Credentials come only from what a test writes, never from the machine's own files."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("UCTR_CONFIG_DIR", str(tmp_path / "uctr-config"))


def client_for(registry, credentials=None, **config) -> RegistryClient:
    config.setdefault("insecure", (registry.host,) if registry.insecure else ())
    config.setdefault("ca_file", registry.ca_file)
    config.setdefault("retries", 1)
    return RegistryClient(registry.host, RegistryConfig(**config), credentials)


def fetch_all_blobs(client, repository, image, tmp_path, architecture=None):
    """Download config and layers; return {digest: bytes} and check sizes and contents."""
    got = {}
    image_manifest = image.manifest(architecture)
    for descriptor in [image_manifest["config"]] + image_manifest["layers"]:
        partial = tmp_path / ("partial-" + descriptor["digest"][7:19])
        size = client.download_blob(repository, descriptor["digest"], str(partial), descriptor["size"])
        data = partial.read_bytes()
        assert size == descriptor["size"] == len(data)
        assert data == image.blob(descriptor["digest"])
        got[descriptor["digest"]] = data
    return got


def skopeo_push(image, registry, repo, *flags):
    """Push with a manifest format other than the harness default (e.g. Docker schema 2)."""
    ref = f"{registry.host}/{repo}:{image.tag}"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", *flags,
                    *registry.skopeo_args("dest"), image.oci_ref, f"docker://{ref}"],
                   check=True, capture_output=True)
    return ref


# -- plain HTTP, manifest types ---------------------------------------------------------------

def test_anonymous_manifest_and_blobs(registry_http, pushed, test_images, tmp_path):
    pushed["busybox"]
    image = test_images["busybox"]
    with client_for(registry_http) as client:
        data, media_type, digest = client.get_manifest("busybox", image.tag)
        assert data == image.blob(image.manifest_digest())
        assert (media_type, digest) == (manifest.OCI_MANIFEST, image.manifest_digest())
        layer = image.layer_digests()[0]
        before = registry_http.blob_gets(layer)
        fetch_all_blobs(client, "busybox", image, tmp_path)
        assert registry_http.blob_gets(layer) == before + 1


def test_manifest_by_digest_and_index(registry_http, pushed, test_images):
    pushed["multiarch"]
    image = test_images["multiarch"]
    with client_for(registry_http) as client:
        data, media_type, digest = client.get_manifest("multiarch", image.tag)
        assert media_type == manifest.OCI_INDEX
        assert digest == image.top_descriptor()["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
        arm = image.manifest_digest("arm64")
        data, media_type, digest = client.get_manifest("multiarch", arm)
        assert (media_type, digest) == (manifest.OCI_MANIFEST, arm)
        assert json.loads(data)["layers"] == image.manifest("arm64")["layers"]


def test_docker_schema2_manifest_and_manifest_list(registry_http, test_images, tmp_path):
    busybox, multiarch = test_images["busybox"], test_images["multiarch"]
    skopeo_push(busybox, registry_http, "v2s2/busybox", "--format", "v2s2")
    skopeo_push(multiarch, registry_http, "v2s2/multiarch", "--format", "v2s2", "--all")
    with client_for(registry_http) as client:
        data, media_type, digest = client.get_manifest("v2s2/busybox", busybox.tag)
        assert media_type == manifest.DOCKER_MANIFEST_V2
        assert json.loads(data)["mediaType"] == manifest.DOCKER_MANIFEST_V2
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
        layer = json.loads(data)["layers"][0]
        assert layer["mediaType"] == manifest.DOCKER_LAYER_GZIP
        size = client.download_blob("v2s2/busybox", layer["digest"], str(tmp_path / "l"), layer["size"])
        assert size == layer["size"]
        data, media_type, _ = client.get_manifest("v2s2/multiarch", multiarch.tag)
        assert media_type == manifest.DOCKER_MANIFEST_LIST
        assert {m["platform"]["architecture"] for m in json.loads(data)["manifests"]} == {"amd64", "arm64"}


def test_unknown_repository_and_tag(registry_http, pushed):
    pushed["busybox"]
    with client_for(registry_http) as client:
        with pytest.raises(RegistryError) as info:
            client.get_manifest("no/such-repo", "1")
        assert info.value.message == f"repository not found: {registry_http.host}/no/such-repo"
        assert info.value.hint == ("check the image name (e.g. docker.io/library/debian:12); a private "
                                   f"repository needs: uctr login {registry_http.host}")
        with pytest.raises(RegistryError) as info:
            client.get_manifest("busybox", "no-such-tag")
        assert info.value.message == f"tag or digest not found: {registry_http.host}/busybox:no-such-tag"
        prefix = f"tags in {registry_http.host}/busybox: "
        assert info.value.hint.startswith(prefix) and "1" in info.value.hint[len(prefix):].split(", ")
        assert info.value.exit_code == 4


def test_unknown_blob_leaves_no_complete_file(registry_http, pushed, tmp_path):
    pushed["busybox"]
    missing = "sha256:" + "0" * 64
    with client_for(registry_http) as client, pytest.raises(RegistryError) as info:
        client.download_blob("busybox", missing, str(tmp_path / "p"), 10)
    assert info.value.message == f"not found on the registry: blob {missing} of {registry_http.host}/busybox"
    assert (tmp_path / "p").stat().st_size == 0


# -- scheme: TLS and insecure ------------------------------------------------------------------

def test_tls_with_ca(registry_tls, push, test_images, tmp_path):
    push("busybox", registry_tls)
    with client_for(registry_tls) as client:
        _, media_type, _ = client.get_manifest("busybox", "1")
        assert media_type == manifest.OCI_MANIFEST
        fetch_all_blobs(client, "busybox", test_images["busybox"], tmp_path)


def test_tls_without_ca_is_a_clear_error(registry_tls, push):
    push("busybox", registry_tls)
    with client_for(registry_tls, ca_file=None) as client, pytest.raises(TransferError) as info:
        client.get_manifest("busybox", "1")
    assert info.value.message.startswith(f"TLS certificate of {registry_tls.host} not trusted (")
    assert info.value.message.endswith(f"): https://{registry_tls.host}/v2/busybox/manifests/1")
    assert info.value.hint == "give the registry's CA certificate with --tls-ca FILE (or UCTR_TLS_CA)"


def test_bad_ca_file_is_a_config_error(registry_tls, tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    from uctr_batch.errors import ConfigError
    with pytest.raises(ConfigError, match="cannot load the registry CA file"):
        client_for(registry_tls, ca_file=str(bad))


def test_plain_http_only_when_listed(registry_http, pushed):
    pushed["busybox"]
    other_port = "127.0.0.1:1"
    for insecure in ((), (other_port,)):
        with client_for(registry_http, insecure=insecure) as client, pytest.raises(TransferError) as info:
            client.get_manifest("busybox", "1")
        assert info.value.message == (f"TLS handshake with {registry_http.host} failed (it seems to speak "
                                      f"plain HTTP): https://{registry_http.host}/v2/busybox/manifests/1")
        assert info.value.hint == (f"if that is intended, allow plain HTTP with --insecure-registry "
                                   f"{registry_http.host} (or UCTR_INSECURE_REGISTRIES)")
    for insecure in ((registry_http.host,), ("127.0.0.1",), (f"http://{registry_http.host}",)):
        with client_for(registry_http, insecure=insecure) as client:
            assert client.get_manifest("busybox", "1")[1] == manifest.OCI_MANIFEST


def test_insecure_listing_of_a_tls_registry_is_explained(registry_tls, push):
    push("busybox", registry_tls)
    client = client_for(registry_tls, insecure=(registry_tls.host,))
    with client, pytest.raises(TransferError) as info:
        client.get_manifest("busybox", "1")
    assert info.value.message == (f"{registry_tls.host} speaks HTTPS, not plain HTTP: "
                                  f"http://{registry_tls.host}/v2/busybox/manifests/1")


# -- token auth --------------------------------------------------------------------------------

def test_token_flow_anonymous(registry_token, push, test_images, tmp_path):
    push("busybox", registry_token, repo="tok/anon")
    issued = len(registry_token.token_server.issued)
    with client_for(registry_token) as client:
        client.get_manifest("tok/anon", "1")
        fetch_all_blobs(client, "tok/anon", test_images["busybox"], tmp_path)
    grants = registry_token.token_server.issued[issued:]
    # One token for the repository, reused for the manifest and every blob.
    assert grants == [{"account": None, "scopes": ["repository:tok/anon:pull"],
                       "access": [{"type": "repository", "name": "tok/anon", "actions": ["pull"]}]}]
    unauthorized = [line for line in registry_token.access_log() if "/v2/tok/anon/" in line and line.endswith(" 401")]
    assert len(unauthorized) == 1


def test_token_flow_with_credentials(registry_token, push):
    push("busybox", registry_token, repo="tok/creds")
    issued = len(registry_token.token_server.issued)
    creds = auth.Credentials(registry_token.username, registry_token.password)
    with client_for(registry_token, credentials=creds) as client:
        assert client.get_manifest("tok/creds", "1")[1] == manifest.OCI_MANIFEST
        assert client.verify_credentials() is True
    accounts = {grant["account"] for grant in registry_token.token_server.issued[issued:]}
    assert accounts == {registry_token.username}


def test_token_flow_credentials_from_docker_config(registry_token, push, tmp_path):
    push("busybox", registry_token, repo="tok/dockercfg")
    (tmp_path / "docker").mkdir()
    entry = base64.b64encode(f"{registry_token.username}:{registry_token.password}".encode()).decode()
    (tmp_path / "docker" / "config.json").write_text(
        json.dumps({"auths": {f"http://{registry_token.host}": {"auth": entry}}}))
    issued = len(registry_token.token_server.issued)
    with client_for(registry_token) as client:
        client.get_manifest("tok/dockercfg", "1")
    assert registry_token.token_server.issued[issued]["account"] == registry_token.username


def test_token_flow_wrong_credentials(registry_token, push):
    push("busybox", registry_token, repo="tok/wrong")
    creds = auth.Credentials(registry_token.username, "wrong-password")
    for call in (lambda c: c.get_manifest("tok/wrong", "1"), lambda c: c.verify_credentials()):
        with client_for(registry_token, credentials=creds) as client, pytest.raises(AuthError) as info:
            call(client)
        assert info.value.message == (f"wrong username or password for {registry_token.host} "
                                      f"(user {registry_token.username})")
        assert info.value.hint == f"run: uctr login {registry_token.host}"
        assert info.value.exit_code == 4


# -- Basic auth --------------------------------------------------------------------------------

def test_basic_auth(registry_basic, push, test_images, tmp_path):
    push("busybox", registry_basic)
    with client_for(registry_basic) as client, pytest.raises(AuthError) as info:
        client.get_manifest("busybox", "1")
    assert info.value.message == ("authentication required (or the repository does not exist): "
                                  f"{registry_basic.host}/busybox")
    assert info.value.hint == f"check the name; for a private image run: uctr login {registry_basic.host}"

    good = auth.Credentials(registry_basic.username, registry_basic.password)
    with client_for(registry_basic, credentials=good) as client:
        assert client.get_manifest("busybox", "1")[1] == manifest.OCI_MANIFEST
        fetch_all_blobs(client, "busybox", test_images["busybox"], tmp_path)
        assert client.verify_credentials() is True

    bad = auth.Credentials(registry_basic.username, "nope")
    with client_for(registry_basic, credentials=bad) as client, pytest.raises(AuthError) as info:
        client.verify_credentials()
    assert info.value.message == f"wrong username or password for {registry_basic.host} (user {registry_basic.username})"


def test_open_registry_does_not_check_credentials(registry_http):
    with client_for(registry_http, credentials=auth.Credentials("any", "thing")) as client:
        assert client.verify_credentials() is False


# -- mirrors -----------------------------------------------------------------------------------

def test_dead_mirror_falls_back_to_origin(registry_http, pushed, test_images, tmp_path, caplog):
    pushed["busybox"]
    dead = f"http://127.0.0.1:{free_port()}"
    caplog.set_level(5, logger="uctr")
    with client_for(registry_http, mirrors={registry_http.host: (dead,)}, retries=3) as client:
        assert client.get_manifest("busybox", "1")[1] == manifest.OCI_MANIFEST
        fetch_all_blobs(client, "busybox", test_images["busybox"], tmp_path)
    tried_dead = [r for r in caplog.records if r.getMessage().startswith(f"mirror {dead} failed")]
    assert len(tried_dead) == 1  # one try, no retries, and skipped for the rest of the client's life


def test_mirror_serves_first_and_origin_covers_its_failures(registry_http, pushed, fault_proxy, test_images,
                                                            tmp_path):
    pushed["busybox"]
    image = test_images["busybox"]
    with client_for(registry_http, mirrors={registry_http.host: (fault_proxy.url,)}) as client:
        client.get_manifest("busybox", "1")
        assert fault_proxy.count(r"/manifests/1$") == 1
        fault_proxy.fail(r"/blobs/", status=503, times=None)  # the mirror breaks: origin takes over
        layer = image.layer_digests()[0]
        before = registry_http.blob_gets(layer)
        fetch_all_blobs(client, "busybox", image, tmp_path)
        assert fault_proxy.blob_gets(layer) == 1
        assert registry_http.blob_gets(layer) == before + 1  # only the origin's own GET got through
        fault_proxy.clear()
        fault_proxy.fail(r"/manifests/", status=404, times=1)  # a mirror without the image
        assert client.get_manifest("busybox", "1")[1] == manifest.OCI_MANIFEST
        fault_proxy.corrupt(r"/blobs/", times=None)  # a mirror serving bad bytes
        size = image.manifest()["layers"][0]["size"]
        assert client.download_blob("busybox", layer, str(tmp_path / "again"), size) == size
        assert (tmp_path / "again").read_bytes() == image.blob(layer)
        assert fault_proxy.blob_gets(layer) == 1


# -- redirects to blob storage -------------------------------------------------------------------

class _RecordingFiles(SimpleHTTPRequestHandler):
    seen: list  # (path, Authorization header) per GET; a fresh list on each subclass

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        super().do_GET()


class _RedirectingRegistry(Registry):
    """Basic-auth registry whose blob GETs redirect to a plain file server on another host name."""

    def __init__(self, workdir, storage_url):
        super().__init__(workdir, auth="basic")
        self.storage_url = storage_url

    def _config(self) -> str:
        return super()._config() + (
            "middleware:\n  storage:\n    - name: redirect\n      options:\n"
            f"        baseurl: {self.storage_url}\n")


def test_redirect_to_blob_storage_does_not_leak_credentials(tmp_path, test_images):
    storage = tmp_path / "reg" / "storage"
    storage.mkdir(parents=True)
    handler = type("Files", (_RecordingFiles,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(storage)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    registry = _RedirectingRegistry(tmp_path / "reg", f"http://localhost:{server.server_address[1]}")
    try:
        registry.start()
        registry_push = skopeo_push(test_images["busybox"], registry, "redirected")
        assert registry_push.endswith("/redirected:1")
        creds = auth.Credentials(registry.username, registry.password)
        with client_for(registry, credentials=creds) as client:
            client.get_manifest("redirected", "1")
            fetch_all_blobs(client, "redirected", test_images["busybox"], tmp_path)
    finally:
        registry.stop()
        server.shutdown()
        server.server_close()
    assert len(handler.seen) == 2  # config and layer came from the storage server
    assert all(path.startswith("/docker/registry/v2/blobs/sha256/") for path, _ in handler.seen)
    assert [authorization for _, authorization in handler.seen] == [None, None]


# -- uctr login / logout -----------------------------------------------------------------------

def test_login_verifies_then_saves_and_logout_removes(uctr, registry_basic):
    host = registry_basic.host
    result = uctr("login", "-u", registry_basic.username, "--password-stdin", host,
                  input=registry_basic.password + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    path = uctr.dirs().config / "auth.json"
    assert f"logged in to {host} as {registry_basic.username} (credentials in {path})" in result.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    expected = base64.b64encode(f"{registry_basic.username}:{registry_basic.password}".encode()).decode()
    assert json.loads(path.read_text()) == {"auths": {host: {"auth": expected}}}

    result = uctr("logout", host)
    assert result.returncode == 0, result.stderr
    assert json.loads(path.read_text()) == {"auths": {}}
    result = uctr("logout", host)
    assert (result.returncode, result.stderr.strip()) == (0, f"not logged in to {host}")


def test_login_with_wrong_password_saves_nothing(uctr, registry_token):
    result = uctr("login", "-u", registry_token.username, "--password-stdin", registry_token.host,
                  input="wrong\n")
    assert result.returncode == 4
    assert result.stderr == (f"error: wrong username or password for {registry_token.host} "
                             f"(user {registry_token.username})\nhint: run: uctr login {registry_token.host}\n")
    assert not (uctr.dirs().config / "auth.json").exists()


def test_login_without_password_input_is_a_usage_error(uctr, registry_basic):
    result = uctr("login", "-u", "someone", registry_basic.host, input="")
    assert result.returncode == 2
    assert result.stderr == (f"error: no password given for {registry_basic.host}\n"
                             f"hint: run: echo PASSWORD | uctr login -u someone --password-stdin "
                             f"{registry_basic.host}\n")


def test_login_refuses_an_unsafe_config_dir(uctr, registry_basic):
    config = uctr.dirs().config
    config.mkdir(mode=0o755)
    config.chmod(0o755)
    result = uctr("login", "-u", registry_basic.username, "--password-stdin", registry_basic.host,
                  input=registry_basic.password)
    assert result.returncode == 1
    assert result.stderr == (f"error: credentials directory is accessible to other users (mode 0755): "
                             f"{config}\nhint: run: chmod 700 {config}\n")
    assert not (config / "auth.json").exists()


def test_login_as_an_unprivileged_user(uctr, registry_basic, test_user):
    result = uctr("login", "-u", registry_basic.username, "--password-stdin", registry_basic.host,
                  input=registry_basic.password, user=test_user)
    assert result.returncode == 0, result.stderr
    path = uctr.dirs(test_user).config / "auth.json"
    info = os.stat(path)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (pwd.getpwnam(test_user).pw_uid, 0o600)
