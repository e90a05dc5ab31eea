"""`uctr resolve`: the submit-time pin (IMAGE:tag -> IMAGE@sha256:...) against the real local
registry, and what it saves the nodes: a pinned pull asks the registry for no manifest."""

import re

import pytest

from tests.harness.images import push


def ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


def manifest_gets(registry, repository):
    pattern = re.compile(rf'GET /v2/{re.escape(repository)}/manifests/\S+ HTTP/[\d.]+" 200')
    return sum(1 for line in registry.access_log() if pattern.match(line))


def test_resolve_prints_the_manifest_digest_and_caches_it(uctr, registry_http, test_images):
    busybox = test_images["busybox"]
    ref = push(busybox, registry_http, repo="pin-a", tag="1")
    before = manifest_gets(registry_http, "pin-a")
    pinned = ok(uctr("resolve", ref)).strip()
    assert pinned == f"{registry_http.host}/pin-a@{busybox.manifest_digest()}"
    assert manifest_gets(registry_http, "pin-a") == before + 1
    # the nodes of a pinned job: the manifest comes from the shared cache, blobs once
    assert ok(uctr("pull", pinned)).split() == [pinned, busybox.manifest_digest()]
    assert manifest_gets(registry_http, "pin-a") == before + 1


def test_a_moved_tag_does_not_move_the_pin(uctr, registry_http, test_images):
    first = push(test_images["busybox"], registry_http, repo="pin-moved", tag="1")
    pinned = ok(uctr("resolve", first)).strip()
    push(test_images["layers"], registry_http, repo="pin-moved", tag="1")  # the tag moves
    assert ok(uctr("resolve", first)).strip() != pinned
    out = ok(uctr("pull", pinned)).split()
    assert out[1] == test_images["busybox"].manifest_digest()


def test_multi_platform_images_are_pinned_to_their_index(uctr, registry_http, test_images):
    multiarch = test_images["multiarch"]
    ref = push(multiarch, registry_http, repo="pin-index", tag="1")
    pinned = ok(uctr("resolve", ref)).strip()
    assert pinned == f"{registry_http.host}/pin-index@{multiarch.top_descriptor()['digest']}"


def test_a_digest_reference_needs_no_registry(uctr):
    digest = "sha256:" + "ab" * 32
    result = uctr("resolve", f"127.0.0.1:9/x@{digest}")
    assert ok(result).strip() == f"127.0.0.1:9/x@{digest}"


@pytest.mark.parametrize("image", ["/shared/images/app.sqsh", "./app.sqsh", "squashfs:app.sqsh",
                                   "oci-archive:image.tar", "docker-archive:image.tar"])
def test_an_image_file_is_echoed_unpinned(uctr, image):
    """Files are read as they are (no tag to move): the submit-time pin passes them through,
    without reading them, so sbatch --container-image=./x.sqsh keeps working."""
    assert ok(uctr("resolve", image)).strip() == image


def test_an_unreachable_registry_is_an_error(uctr):
    result = uctr("resolve", "--timeout", "20", "127.0.0.1:9/nothing:1")
    assert result.returncode == 4, result.stderr
    assert result.stderr.startswith("error: ") and "hint: " in result.stderr
    assert "Traceback" not in result.stderr
