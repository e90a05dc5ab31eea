"""enroot/pyxis image references: [USER@][REGISTRY#]IMAGE[:TAG], squashfs paths, and the
daemon prefixes uctr refuses (uctr_batch/image/reference.py)."""

import pytest

from uctr_batch.errors import ReferenceError_
from uctr_batch.image.reference import SQUASHFS, parse

D = "sha256:" + "0" * 64


@pytest.mark.parametrize("text,canonical", [
    ("nvcr.io#nvidia/pytorch:24.01-py3", "nvcr.io/nvidia/pytorch:24.01-py3"),
    ("docker://nvcr.io#nvidia/pytorch:24.01-py3", "nvcr.io/nvidia/pytorch:24.01-py3"),
    ("nvcr.io#nvidia/cuda", "nvcr.io/nvidia/cuda:latest"),
    ("docker.io#ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
    ("registry-1.docker.io#library/ubuntu", "registry-1.docker.io/library/ubuntu:latest"),
    ("localhost:5000#team/app:1", "localhost:5000/team/app:1"),
    (f"nvcr.io#nvidia/cuda@{D}", f"nvcr.io/nvidia/cuda@{D}"),
    ("ubuntu:22.04", "docker.io/library/ubuntu:22.04"),  # enroot's hub default = Docker's
])
def test_enroot_registry_form(text, canonical):
    ref = parse(text)
    assert str(ref) == canonical and ref.user is None
    assert parse(canonical) == ref  # the two spellings name the same image


def test_user_is_kept_and_printed_in_enroot_form():
    ref = parse("alice@nvcr.io#nvidia/pytorch:24.01-py3")
    assert (ref.user, ref.registry, ref.repository, ref.tag) == \
        ("alice", "nvcr.io", "nvidia/pytorch", "24.01-py3")
    assert str(ref) == "alice@nvcr.io#nvidia/pytorch:24.01-py3"
    assert parse(str(ref)) == ref
    hub = parse("docker://bob@ubuntu")
    assert (hub.user, str(hub)) == ("bob", "bob@docker.io#library/ubuntu:latest")
    # the user is part of the identity: alice's and anonymous pulls are cached apart
    assert ref.for_path() != parse("nvcr.io#nvidia/pytorch:24.01-py3").for_path()


def test_dotless_registry_stays_in_enroot_form():
    ref = parse("myregistry#app")  # '#' makes any host name a registry
    assert (ref.registry, ref.repository) == ("myregistry", "app")
    assert str(ref) == "myregistry#app:latest"
    assert parse(str(ref)) == ref and parse("myregistry/app").registry == "docker.io"


def test_at_sign_of_a_digest_is_not_a_user():
    assert parse(f"ubuntu@{D}").user is None
    assert parse(f"alice@ubuntu@{D}").user == "alice"


@pytest.mark.parametrize("text,path", [
    ("/shared/images/pytorch.sqsh", "/shared/images/pytorch.sqsh"),
    ("./pytorch.sqsh", "./pytorch.sqsh"),
    ("../img/pytorch.sqsh", "../img/pytorch.sqsh"),
    ("squashfs:pytorch.sqsh", "pytorch.sqsh"),
    ("/images/with:colon.sqsh", "/images/with:colon.sqsh"),
])
def test_paths_are_squashfs_files(text, path):
    ref = parse(text)
    assert (ref.transport, ref.path, ref.is_registry) == (SQUASHFS, path, False)
    assert parse(str(ref)) == ref


@pytest.mark.parametrize("text,message,hint", [
    ("dockerd://ubuntu:22.04", '"dockerd://" images come from a local container daemon',
     "docker save IMAGE -o image.tar, then use docker-archive:image.tar"),
    ("podman://ubuntu", '"podman://" images come from a local container daemon',
     "podman save --format oci-archive IMAGE -o image.tar, then use oci-archive:image.tar"),
    ("a#b#c", 'more than one "#" in "a#b#c"', "only the registry"),
    ("#ubuntu", 'invalid registry "" before "#"', "[USER@][REGISTRY#]IMAGE[:TAG]"),
    ("bad_host#x", 'invalid registry "bad_host" before "#"', "nvcr.io#nvidia/pytorch"),
    ("bad user@ubuntu", 'invalid user name "bad user"', "[USER@][REGISTRY#]IMAGE[:TAG]"),
    ("squashfs:", 'missing path in "squashfs:"', "squashfs:PATH"),
])
def test_refused_with_what_to_do(text, message, hint):
    with pytest.raises(ReferenceError_) as info:
        parse(text)
    assert info.value.message.startswith(message) and hint in info.value.hint
    assert info.value.exit_code == 1
