"""Many processes pulling into one cache: one download per blob, and a killed puller's
partial download is resumed by the next one, never committed unverified."""

import hashlib
import json
import os
import signal
import time

N = 6


def ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_all(uctr, ref, *extra):
    procs = [uctr.popen("pull", "-v", *extra, ref) for _ in range(N)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for _, err, rc in results:
        assert rc == 0, err
    return results


def cache_blobs(uctr):
    return uctr.dirs().cache / "blobs" / "sha256"


def assert_every_blob_verified(uctr):
    for path in cache_blobs(uctr).iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path


def test_n_processes_download_each_blob_once(uctr, pushed, test_images, registry_http):
    image = test_images["debian"]
    blobs = [image.manifest()["config"]["digest"]] + image.layer_digests()
    ref = pushed["debian"]
    before = {d: registry_http.blob_gets(d) for d in blobs}
    results = run_all(uctr, ref)
    assert {out for out, _, _ in results} == {f"{ref} {image.manifest_digest()}\n"}
    assert {d: registry_http.blob_gets(d) - before[d] for d in blobs} == {d: 1 for d in blobs}
    assert_every_blob_verified(uctr)
    assert not any((uctr.dirs().cache / "tmp").iterdir())
    assert not any((uctr.dirs().cache / "locks").iterdir())


def test_waiters_wait_while_one_downloader_works(uctr, pushed, test_images, fault_proxy):
    image = test_images["debian"]
    layer = image.layer_digests()[0]
    ref = fault_proxy.rewrite(pushed["debian"])
    # The first GET of the layer sends 1 MB, stalls 3 s and breaks: the others start meanwhile.
    fault_proxy.stall(r"/blobs/" + layer, after=1 << 20, seconds=3)
    results = run_all(uctr, ref)
    gets = fault_proxy.matching(r"/blobs/" + layer + "$")
    assert [g.range for g in gets] == [None, f"bytes={1 << 20}-"]  # one downloader, resumed once
    waited = [err for _, err, _ in results if f"{layer}: waited for another downloader" in err]
    assert len(waited) >= 1
    assert sum(f"{layer}: downloaded" in err for _, err, _ in results) == 1
    assert_every_blob_verified(uctr)
    assert ok(uctr("verify")) == ""


def test_killed_puller_leaves_only_verified_blobs_and_is_resumed(uctr, pushed, test_images,
                                                                  fault_proxy):
    image = test_images["debian"]
    layer = image.layer_digests()[0]
    ref = fault_proxy.rewrite(pushed["debian"])
    cut = 8 << 20
    fault_proxy.stall(r"/blobs/" + layer, after=cut, seconds=60)
    proc = uctr.popen("pull", ref)
    partial = uctr.dirs().cache / "tmp" / f"{layer.split(':')[1]}.partial"
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size >= cut):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "download never reached the stall"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert not (cache_blobs(uctr) / layer.split(":")[1]).exists()
    assert_every_blob_verified(uctr)
    assert partial.stat().st_size == cut
    assert any((uctr.dirs().cache / "locks").iterdir())  # the dead puller's lock is left behind

    fault_proxy.clear()
    started = time.monotonic()
    result = uctr("pull", "-v", ref)
    assert ok(result).split() == [ref, image.manifest_digest()]
    assert time.monotonic() - started < 30  # the dead holder's lock was broken at once
    assert [r.range for r in fault_proxy.matching(r"/blobs/" + layer + "$")] == [f"bytes={cut}-"]
    assert_every_blob_verified(uctr)
    assert not partial.exists()
    info = json.loads(ok(uctr("inspect", ref)))
    assert [la["digest"] for la in info["layers"]] == [layer]
    assert os.listdir(uctr.dirs().cache / "locks") == []
