"""RegistryClient through the fault-injecting proxy in front of the real registry: retries,
Retry-After, resume with Range, corrupt data, stalls, and the errors left when all fails."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.harness.net import free_port
from uctr_batch.errors import DigestMismatch, TransferError
from uctr_batch.image.registry import RegistryClient
from uctr_batch.settings import RegistryConfig

STALL = 1.0  # seconds without a byte before a transfer is abandoned (kept small for the tests)


@pytest.fixture(autouse=True)
def no_stored_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("UCTR_CONFIG_DIR", str(tmp_path / "uctr-config"))


@pytest.fixture
def busybox(pushed, test_images):
    pushed["busybox"]
    return test_images["busybox"]


@pytest.fixture
def layer(busybox):
    """(digest, size, bytes) of busybox's layer: ~1 MiB, big enough to cut in the middle."""
    descriptor = busybox.manifest()["layers"][0]
    return descriptor["digest"], descriptor["size"], busybox.blob(descriptor["digest"])


def client_via(proxy, retries=3) -> RegistryClient:
    config = RegistryConfig(insecure=(proxy.host,), retries=retries, stall_timeout=STALL,
                            connect_timeout=2.0)
    return RegistryClient(proxy.host, config)


def download(client, layer, partial, progress=None):
    digest, size, _ = layer
    return client.download_blob("busybox", digest, str(partial), size, progress)


def test_500_then_success(fault_proxy, busybox, layer, tmp_path):
    fault_proxy.fail(r"/manifests/", status=500, times=2)
    fault_proxy.fail(r"/blobs/", status=502, times=1)
    with client_via(fault_proxy) as client:
        assert client.get_manifest("busybox", "1")[2] == busybox.manifest_digest()
        assert download(client, layer, tmp_path / "p") == layer[1]
    assert [r.status for r in fault_proxy.matching(r"/manifests/1$")] == [500, 500, 200]
    assert [r.status for r in fault_proxy.matching(r"/blobs/")] == [502, 200]
    assert (tmp_path / "p").read_bytes() == layer[2]


def test_persistent_5xx_gives_a_clean_error(fault_proxy, busybox):
    fault_proxy.fail(r"/manifests/", status=503, times=None)
    with client_via(fault_proxy, retries=2) as client, pytest.raises(TransferError) as info:
        client.get_manifest("busybox", "1")
    assert info.value.message == (f"HTTP 503 Service Unavailable (after 3 attempts): "
                                  f"http://{fault_proxy.host}/v2/busybox/manifests/1")
    assert info.value.hint.startswith("check that the registry is up and reachable")
    assert info.value.exit_code == 4
    assert fault_proxy.count(r"/manifests/") == 3


def test_429_retry_after_is_honoured(fault_proxy, busybox, layer, tmp_path):
    fault_proxy.rate_limit(r"/blobs/", retry_after=1)
    with client_via(fault_proxy) as client:
        start = time.monotonic()
        download(client, layer, tmp_path / "p")
        waited = time.monotonic() - start
    assert [r.status for r in fault_proxy.matching(r"/blobs/")] == [429, 200]
    assert 1.0 <= waited < 5.0
    assert (tmp_path / "p").read_bytes() == layer[2]


def test_truncated_blob_is_resumed_with_range(fault_proxy, busybox, layer, tmp_path):
    digest, size, data = layer
    cut = size // 2
    fault_proxy.truncate(r"/blobs/" + digest, after=cut)
    seen = []
    with client_via(fault_proxy) as client:
        assert download(client, layer, tmp_path / "p", seen.append) == size
    requests = fault_proxy.matching(r"/blobs/" + digest)
    assert [(r.status, r.range) for r in requests] == [(200, None), (206, f"bytes={cut}-")]
    assert requests[1].bytes_sent == size - cut  # only the missing part crossed the wire
    assert (tmp_path / "p").read_bytes() == data
    assert sum(seen) == size and all(delta > 0 for delta in seen)


def test_partial_file_from_an_earlier_run_is_resumed(fault_proxy, busybox, layer, tmp_path):
    _, size, data = layer
    (tmp_path / "p").write_bytes(data[:1000])
    seen = []
    with client_via(fault_proxy) as client:
        download(client, layer, tmp_path / "p", seen.append)
    assert [r.range for r in fault_proxy.matching(r"/blobs/")] == ["bytes=1000-"]
    assert seen[0] == 1000 and sum(seen) == size
    assert (tmp_path / "p").read_bytes() == data


def test_whole_leftover_of_unknown_size_is_verified_without_a_body(fault_proxy, busybox, layer,
                                                                   tmp_path):
    digest, size, data = layer
    (tmp_path / "p").write_bytes(data)
    with client_via(fault_proxy) as client:
        assert client.download_blob("busybox", digest, str(tmp_path / "p")) == size
    assert [(r.status, r.range) for r in fault_proxy.matching(r"/blobs/")] == [(416, f"bytes={size}-")]
    assert (tmp_path / "p").read_bytes() == data


def test_whole_leftover_of_known_size_needs_no_request(fault_proxy, busybox, layer, tmp_path):
    (tmp_path / "p").write_bytes(layer[2])
    with client_via(fault_proxy) as client:
        assert download(client, layer, tmp_path / "p") == layer[1]
    assert fault_proxy.count(r"/blobs/") == 0


def test_server_ignoring_range_restarts_from_zero(fault_proxy, busybox, layer, tmp_path):
    _, size, data = layer
    fault_proxy.truncate(r"/blobs/", after=size // 3)
    fault_proxy.ignore_range(r"/blobs/")
    seen = []
    with client_via(fault_proxy) as client:
        download(client, layer, tmp_path / "p", seen.append)
    requests = fault_proxy.matching(r"/blobs/")
    assert [(r.status, r.range) for r in requests] == [(200, None), (200, f"bytes={size // 3}-")]
    assert (tmp_path / "p").read_bytes() == data
    assert sum(seen) == size and -(size // 3) in seen  # progress took the discarded part back


def test_corrupt_blob_is_a_digest_mismatch_and_leaves_nothing(fault_proxy, busybox, layer, tmp_path):
    fault_proxy.corrupt(r"/blobs/", at=12345)
    seen = []
    with client_via(fault_proxy) as client, pytest.raises(DigestMismatch) as info:
        download(client, layer, tmp_path / "p", seen.append)
    assert info.value.message == f"downloaded data does not match its digest: blob {layer[0]} of {fault_proxy.host}/busybox"
    assert info.value.exit_code == 4
    assert not (tmp_path / "p").exists()
    assert sum(seen) == 0
    assert fault_proxy.count(r"/blobs/") == 1  # a fresh download that fails to verify is not retried


def test_corrupt_leftover_is_discarded_and_downloaded_again(fault_proxy, busybox, layer, tmp_path):
    _, size, data = layer
    (tmp_path / "p").write_bytes(b"X" * 5000)  # not a prefix of the blob
    with client_via(fault_proxy) as client:
        assert download(client, layer, tmp_path / "p") == size
    assert [r.range for r in fault_proxy.matching(r"/blobs/")] == ["bytes=5000-", None]
    assert (tmp_path / "p").read_bytes() == data


def test_more_bytes_than_the_descriptor_says_is_a_mismatch(fault_proxy, busybox, layer, tmp_path):
    digest, size, _ = layer
    with client_via(fault_proxy) as client, pytest.raises(DigestMismatch) as info:
        client.download_blob("busybox", digest, str(tmp_path / "p"), size - 10)
    assert info.value.message == f"registry sent more than the {size - 10} bytes of blob {digest}"
    assert not (tmp_path / "p").exists()


def test_manifest_by_digest_is_verified(fault_proxy, busybox):
    fault_proxy.corrupt(r"/manifests/sha256:", at=5, times=None)
    with client_via(fault_proxy) as client, pytest.raises(DigestMismatch) as info:
        client.get_manifest("busybox", busybox.manifest_digest())
    assert info.value.message.startswith("manifest does not match its digest (got sha256:")


def test_stalled_transfer_times_out_and_resumes(fault_proxy, busybox, layer, tmp_path):
    data = layer[2]
    fault_proxy.stall(r"/blobs/", after=4096, seconds=30)
    with client_via(fault_proxy) as client:
        start = time.monotonic()
        download(client, layer, tmp_path / "p")
        elapsed = time.monotonic() - start
    assert STALL <= elapsed < STALL + 5
    assert [r.range for r in fault_proxy.matching(r"/blobs/")] == [None, "bytes=4096-"]
    assert (tmp_path / "p").read_bytes() == data


def test_stall_on_every_attempt_gives_a_clean_error_and_keeps_the_prefix(fault_proxy, busybox, layer,
                                                                        tmp_path):
    fault_proxy.stall(r"/blobs/", after=100, seconds=30, times=None)
    with client_via(fault_proxy, retries=1) as client, pytest.raises(TransferError) as info:
        download(client, layer, tmp_path / "p")
    assert info.value.message.startswith(f"stalled: no data for {STALL:g} s after 200 bytes (after 2 attempts): "
                                         f"http://{fault_proxy.host}/v2/busybox/blobs/sha256:")
    # What arrived is a verified-so-far prefix, kept so the next run resumes after it.
    assert (tmp_path / "p").read_bytes() == layer[2][:200]


def test_connection_refused_after_retries(tmp_path):
    host = f"127.0.0.1:{free_port()}"
    config = RegistryConfig(insecure=(host,), retries=2, stall_timeout=STALL)
    start = time.monotonic()
    with RegistryClient(host, config) as client, pytest.raises(TransferError) as info:
        client.get_manifest("busybox", "1")
    assert info.value.message == f"connection refused (after 3 attempts): http://{host}/v2/busybox/manifests/1"
    assert time.monotonic() - start < 5  # backoff is short at first


def test_parallel_downloads_share_one_client(fault_proxy, busybox, tmp_path):
    image_manifest = busybox.manifest()
    descriptors = [image_manifest["config"]] + image_manifest["layers"]
    fault_proxy.fail(r"/blobs/", status=500, times=1)

    def fetch(descriptor):
        path = tmp_path / descriptor["digest"][7:]
        return client.download_blob("busybox", descriptor["digest"], str(path), descriptor["size"])

    with client_via(fault_proxy) as client, ThreadPoolExecutor(len(descriptors)) as pool:
        sizes = list(pool.map(fetch, descriptors))
    assert sizes == [d["size"] for d in descriptors]
    for d in descriptors:
        assert (tmp_path / d["digest"][7:]).read_bytes() == busybox.blob(d["digest"])
