"""Image reference parsing: canonical strings, fields and exact error texts."""

import pytest

from uctr_batch.errors import ReferenceError_
from uctr_batch.image.reference import ImageRef, parse

D1 = "sha256:" + "0123456789abcdef" * 4
D2 = "sha256:" + "f" * 64

# text -> canonical str()
CANONICAL = [
    ("debian", "docker.io/library/debian:latest"),
    ("debian:12", "docker.io/library/debian:12"),
    ("library/debian:12", "docker.io/library/debian:12"),
    ("docker.io/library/debian:12", "docker.io/library/debian:12"),
    ("docker.io/debian", "docker.io/library/debian:latest"),
    ("index.docker.io/debian:12", "docker.io/library/debian:12"),
    ("docker://debian:12", "docker.io/library/debian:12"),
    ("nvidia/cuda:12.2.0-base-ubuntu22.04", "docker.io/nvidia/cuda:12.2.0-base-ubuntu22.04"),
    ("quay.io/biocontainers/samtools:1.17--h00cdaf9_0",
     "quay.io/biocontainers/samtools:1.17--h00cdaf9_0"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/app:v1", "localhost:5000/app:v1"),
    ("127.0.0.1:5000/busybox:1", "127.0.0.1:5000/busybox:1"),
    ("[::1]:5000/busybox:1", "[::1]:5000/busybox:1"),
    ("registry.example.org/a/b/c:x_Y.z-1", "registry.example.org/a/b/c:x_Y.z-1"),
    ("ghcr.io/o/my__repo-x.y:1", "ghcr.io/o/my__repo-x.y:1"),
    # a bare "host:port" is a repository and tag, as in Docker
    ("localhost:5000", "docker.io/library/localhost:5000"),
    # a digest alone pins the image: no tag is invented
    (f"debian@{D1}", f"docker.io/library/debian@{D1}"),
    (f"debian:12@{D1}", f"docker.io/library/debian:12@{D1}"),
    (f"docker://127.0.0.1:5000/x/y@{D2}", f"127.0.0.1:5000/x/y@{D2}"),
    ("a/b", "docker.io/a/b:latest"),
    # transports
    ("docker://oci:1", "docker.io/library/oci:1"),
    ("oci:/srv/layout", "oci:/srv/layout"),
    ("oci:/srv/layout:v1", "oci:/srv/layout:v1"),
    ("oci:rel/dir:latest", "oci:rel/dir:latest"),
    ("oci:/a:b/c", "oci:/a:b/c"),
    ("oci-archive:/tmp/img.tar", "oci-archive:/tmp/img.tar"),
    ("oci-archive:/tmp/img.tar:2", "oci-archive:/tmp/img.tar:2"),
    ("docker-archive:/tmp/save.tar", "docker-archive:/tmp/save.tar"),
    ("docker-archive:/tmp/save.tar:busybox", "docker-archive:/tmp/save.tar:docker.io/library/busybox:latest"),
    ("docker-archive:save.tar:reg.io:5000/a/b:7", "docker-archive:save.tar:reg.io:5000/a/b:7"),
]


@pytest.mark.parametrize("text,canonical", CANONICAL)
def test_canonical_string(text, canonical):
    ref = parse(text)
    assert str(ref) == canonical
    assert parse(canonical) == ref  # canonical text round-trips to the same value


# text -> (transport, registry, repository, tag, digest, path)
FIELDS = [
    ("debian", ("docker", "docker.io", "library/debian", "latest", None, None)),
    (f"a.b/c@{D1}", ("docker", "a.b", "c", None, D1, None)),
    (f"localhost:443/c:t@{D2}", ("docker", "localhost:443", "c", "t", D2, None)),
    ("oci:/x", ("oci", None, None, None, None, "/x")),
    ("oci:/x:t", ("oci", None, None, "t", None, "/x")),
    ("oci-archive:f.tar:t", ("oci-archive", None, None, "t", None, "f.tar")),
    ("docker-archive:f.tar", ("docker-archive", None, None, None, None, "f.tar")),
    ("docker-archive:f.tar:a/b:c", ("docker-archive", "docker.io", "a/b", "c", None, "f.tar")),
]


@pytest.mark.parametrize("text,fields", FIELDS)
def test_fields(text, fields):
    ref = parse(text)
    assert (ref.transport, ref.registry, ref.repository, ref.tag, ref.digest, ref.path) == fields


@pytest.mark.parametrize("text,host", [
    ("debian", "registry-1.docker.io"),
    ("docker.io/x/y", "registry-1.docker.io"),
    ("quay.io/x/y", "quay.io"),
    ("127.0.0.1:5000/x", "127.0.0.1:5000"),
])
def test_api_host(text, host):
    assert parse(text).api_host == host


@pytest.mark.parametrize("text,reference", [
    ("debian", "latest"), ("debian:12", "12"), (f"debian:12@{D1}", D1), (f"debian@{D1}", D1),
])
def test_manifest_reference_prefers_digest(text, reference):
    assert parse(text).manifest_reference == reference


@pytest.mark.parametrize("text,name", [
    ("debian:12", "docker.io%library%debian+12"),
    ("127.0.0.1:5000/a/b:v1", "127.0.0.1+5000%a%b+v1"),
    (f"x.io/y@{D1}", f"x.io%y@sha256+{D1[7:]}"),
])
def test_for_path_of_registry_images(text, name):
    assert parse(text).for_path() == name


def test_for_path_is_one_safe_component_and_distinct():
    texts = ["debian:12", "debian:13", "a/b:1", "a:1", "oci:/x", "oci:/x:1", "oci:/y",
             "oci-archive:/x", "docker-archive:/x", "r.io/" + "a" * 240 + ":" + "t" * 128]
    names = [parse(t).for_path() for t in texts]
    assert len(set(names)) == len(names)
    for name in names:
        assert "/" not in name and name not in (".", "..") and 0 < len(name) <= 200


def test_imageref_is_frozen_and_hashable():
    ref = parse("debian:12")
    with pytest.raises(AttributeError):
        ref.tag = "13"
    assert {ref: 1}[ImageRef("docker", "docker.io", "library/debian", "12")] == 1


TAG_HINT = "a tag is 1-128 letters, digits, '_', '.' or '-' and does not start with '.' or '-'"
DIGEST_HINT = "a digest is 'sha256:' followed by 64 lowercase hex digits"
REPO_HINT = ("repository path components are lowercase letters and digits, separated by "
             "'.', '_', '__' or '-', and joined by '/'")
REGISTRY_HINT = ("a registry is a host name or IP address with an optional :PORT, "
                 "e.g. registry.example.org:5000")

# text -> (message, hint)
ERRORS = [
    ("", ("empty image reference", "give an image such as docker.io/library/debian:12")),
    ("debian:bad tag!", ('invalid tag "bad tag!" in "debian:bad tag!"', TAG_HINT)),
    ("debian:.hidden", ('invalid tag ".hidden" in "debian:.hidden"', TAG_HINT)),
    ("debian:" + "t" * 129, (f'invalid tag "{"t" * 129}" in "debian:{"t" * 129}"', TAG_HINT)),
    ("debian:", ('empty tag in "debian:"', f"drop the trailing ':' or name a tag: {TAG_HINT}")),
    ("Debian", ('repository name must be lowercase: "Debian"', 'did you mean "debian"?')),
    ("Debian:Debian", ('repository name must be lowercase: "Debian"', 'did you mean "debian:Debian"?')),
    ("docker.io/Library/debian:12",
     ('repository name must be lowercase: "Library/debian"', 'did you mean "docker.io/library/debian:12"?')),
    ("docker://MyOrg/App:1", ('repository name must be lowercase: "MyOrg/App"',
                              'did you mean "docker://myorg/app:1"?')),
    ("foo..bar", ('invalid repository name "foo..bar" in "foo..bar"', REPO_HINT)),
    ("a//b", ('invalid repository name "a//b" in "a//b"', REPO_HINT)),
    ("-a", ('invalid repository name "-a" in "-a"', REPO_HINT)),
    ("a/b/", ('invalid repository name "a/b/" in "a/b/"', REPO_HINT)),
    ("localhost:5000/", ('missing repository name in "localhost:5000/"',
                         "give an image such as docker.io/library/debian:12")),
    ("bad_host.io/x", ('invalid registry "bad_host.io" in "bad_host.io/x"', REGISTRY_HINT)),
    ("host.io:99999/x", ('invalid registry "host.io:99999" in "host.io:99999/x"', REGISTRY_HINT)),
    ("host.io:/x", ('invalid registry "host.io:" in "host.io:/x"', REGISTRY_HINT)),
    ("debian@sha256:abc", ('invalid digest "sha256:abc" in "debian@sha256:abc"', DIGEST_HINT)),
    (f"debian@{D1.upper()}", (f'invalid digest "{D1.upper()}" in "debian@{D1.upper()}"', DIGEST_HINT)),
    ("debian@", ('invalid digest "" in "debian@"', DIGEST_HINT)),
    ("debian@sha512:" + "a" * 128, ('unsupported digest algorithm "sha512" in "debian@sha512:' + "a" * 128 + '"',
                                    "uctr verifies sha256 digests only")),
    ("https://registry.io/x", ('unknown transport "https://" in "https://registry.io/x"',
                               ("use docker://, oci:, oci-archive:, docker-archive: or squashfs:, or write "
                                "the image without a transport, e.g. docker.io/library/debian:12"))),
    ("docker://", ('empty image reference in "docker://"', "give an image such as docker.io/library/debian:12")),
    ("oci:", ('missing path in "oci:"', "write oci:PATH[:TAG]")),
    ("oci::v1", ('missing path in "oci::v1"', "write oci:PATH[:TAG]")),
    ("oci:/x:", ('empty tag in "oci:/x:"', f"drop the trailing ':' or name a tag: {TAG_HINT}")),
    ("oci-archive:/x.tar:a b", ('invalid tag "a b" in "oci-archive:/x.tar:a b"', TAG_HINT)),
    ("docker-archive:", ('missing path in "docker-archive:"', "write docker-archive:PATH[:TAG]")),
    (f"docker-archive:f.tar:a@{D1}", (f'digest not allowed in a docker-archive reference: "docker-archive:f.tar:a@{D1}"',
                                      "name the image inside the archive by REPOSITORY[:TAG]")),
    ("r.io/" + "a" * 251, (f'image name too long (256 > 255 characters): "r.io/{"a" * 251}"',
                           "registry and repository together may have at most 255 characters")),
]


@pytest.mark.parametrize("text,expected", ERRORS)
def test_bad_reference_errors(text, expected):
    with pytest.raises(ReferenceError_) as info:
        parse(text)
    assert (info.value.message, info.value.hint) == expected
    assert info.value.exit_code == 1
