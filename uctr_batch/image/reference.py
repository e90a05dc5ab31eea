"""Image references: parse, print canonically, and name on disk.

Accepted forms (the transport prefix is optional for registry images)::

    [docker://][REGISTRY[:PORT]/]REPOSITORY[:TAG][@sha256:HEX]
    oci:DIR[:TAG]                      an OCI image layout directory
    oci-archive:FILE[:TAG]             a tar of an OCI image layout
    docker-archive:FILE[:REFERENCE]    `docker save` output
    [docker://][USER@][REGISTRY#]IMAGE[:TAG]   enroot's form (pyxis, NGC documentation)
    /PATH, ./PATH, squashfs:PATH       a squashfs image file (enroot import, --container-save)

Registry references follow Docker's rules (github.com/distribution/reference): the first
path component is a registry when it contains '.' or ':' or is 'localhost'; Docker Hub names
get 'docker.io' and single-component names get 'library/'; the tag defaults to 'latest'
unless a digest pins the image. Known transport prefixes win over a repository of the same
name: write ``docker://oci:1`` for an image called "oci".

enroot's form (as pyxis takes it): ``REGISTRY#IMAGE`` names the registry explicitly, so
``nvcr.io#nvidia/pytorch:24.01-py3`` is ``nvcr.io/nvidia/pytorch:24.01-py3``; a leading
``USER@`` names the account whose stored credentials (``uctr login``) must be used. As in
pyxis, a reference that starts with '/' or '.' is a squashfs file. enroot's ``dockerd://``
and ``podman://`` (import from a local daemon) are refused with the command to use instead.

This module does no I/O and imports nothing heavy: it sits on the per-rank path.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import re

from uctr_batch.errors import ReferenceError_
from uctr_batch.hashing import sha256
from uctr_batch.records import Frozen

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = ("index.docker.io",)  # Docker normalises this one to docker.io
MAX_NAME = 255  # registry + repository, as in distribution/reference
MAX_REFERENCE = 4096 + 512  # a path (PATH_MAX) plus a tag or an inner reference; checked first
_MAX_PATH_NAME = 200  # for_path() length, safely below NAME_MAX with room for suffixes

DOCKER = "docker"
OCI = "oci"
OCI_ARCHIVE = "oci-archive"
DOCKER_ARCHIVE = "docker-archive"
SQUASHFS = "squashfs"
PATH_TRANSPORTS = (OCI, OCI_ARCHIVE, DOCKER_ARCHIVE, SQUASHFS)
_PREFIXES = (("docker://", DOCKER), ("oci:", OCI), ("oci-archive:", OCI_ARCHIVE),
             ("docker-archive:", DOCKER_ARCHIVE), ("squashfs:", SQUASHFS))
# enroot imports from a local daemon; uctr never talks to one (it runs without root)
_DAEMON_PREFIXES = {
    "dockerd://": "docker save IMAGE -o image.tar, then use docker-archive:image.tar",
    "podman://": "podman save --format oci-archive IMAGE -o image.tar, then use "
                 "oci-archive:image.tar",
}
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
# what follows '@' in NAME@DIGEST (as opposed to USER@NAME): a sha* algorithm or a long hex
_LOOKS_LIKE_DIGEST = re.compile(r"(?i:sha[0-9]*:)|[a-z0-9]+(?:[+._-][a-z0-9]+)*:[0-9a-fA-F]{32,}")

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[\w][\w.-]{0,127}\Z", re.ASCII)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_HOST_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY = re.compile(rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?\Z")

_EXAMPLE = "docker.io/library/debian:12"
_TAG_HINT = "a tag is 1-128 letters, digits, '_', '.' or '-' and does not start with '.' or '-'"
_DIGEST_HINT = "a digest is 'sha256:' followed by 64 lowercase hex digits"
_EMPTY_TAG_HINT = f"drop the trailing ':' or name a tag: {_TAG_HINT}"
_EXAMPLE_HINT = f"give an image such as {_EXAMPLE}"
_COMPONENT_HINT = ("repository path components are lowercase letters and digits, separated by "
                   "'.', '_', '__' or '-', and joined by '/'")


class ImageRef(Frozen):
    """A parsed image reference.

    transport: 'docker' (a registry), 'oci', 'oci-archive' or 'docker-archive'.
    registry/repository: set for registry images and for a docker-archive with a reference.
    tag: None when only a digest pins a registry image, or when an oci/archive names none.
    path: the directory or file of the path transports, as written.
    user: enroot's USER@ (registry images only): use this account's stored credentials.
    """

    __slots__ = ("transport", "registry", "repository", "tag", "digest", "path", "user")
    _DEFAULTS = {"transport": DOCKER, "registry": None, "repository": None, "tag": None,
                 "digest": None, "path": None, "user": None}

    def __str__(self) -> str:
        if self.transport == DOCKER:
            # enroot's form is the only one that can carry a user or a dotless registry
            if self.user or not _docker_sees_registry(self.registry):
                user = f"{self.user}@" if self.user else ""
                return f"{user}{self.registry}#{self.name_with_version[len(self.registry) + 1:]}"
            return self.name_with_version
        text = f"{self.transport}:{self.path}"
        if self.transport == DOCKER_ARCHIVE and self.repository:
            return f"{text}:{self.name_with_version}"
        return f"{text}:{self.tag}" if self.tag else text

    @property
    def name(self) -> str:
        """registry/repository, e.g. 'docker.io/library/debian'."""
        return f"{self.registry}/{self.repository}"

    @property
    def name_with_version(self) -> str:
        text = self.name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text

    @property
    def manifest_reference(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def api_host(self) -> str:
        """host[:port] that serves the registry API (Docker Hub's differs from its name)."""
        return api_host(self.registry)

    @property
    def is_registry(self) -> bool:
        return self.transport == DOCKER

    def for_path(self) -> str:
        """A filesystem-safe, collision-free single path component naming this reference.

        Registry references map '/' to '%' and ':' to '+' (neither can occur in a reference),
        e.g. 'docker.io%library%debian+12'; over 200 characters, the tail becomes a hash.
        Path transports are named by a hash of the reference: a path may hold any character.
        """
        key = sha256(str(self).encode("utf-8", "surrogateescape")).hexdigest()[:16]
        if self.transport != DOCKER:
            return f"{self.transport}+{key}"
        name = (f"{self.user}@" if self.user else "") + self.name_with_version.replace("/", "%").replace(":", "+")
        if len(name) > _MAX_PATH_NAME:  # NAME_MAX is 255: keep a readable head, add a hash
            name = f"{name[:_MAX_PATH_NAME - 18]}++{key}"
        return name


def api_host(registry: str) -> str:
    """host[:port] serving the API of REGISTRY: Docker Hub's differs from its name."""
    return DOCKER_HUB_API if registry == DEFAULT_REGISTRY else registry


def parse(text: str) -> ImageRef:
    """Parse an image reference; raise ReferenceError_ naming the bad part."""
    if not isinstance(text, str) or not text:
        raise ReferenceError_("empty image reference", _EXAMPLE_HINT)
    if len(text) > MAX_REFERENCE:  # bounds the work of every check below
        raise ReferenceError_(f"image reference too long ({len(text)} > {MAX_REFERENCE} "
                              "characters)", _EXAMPLE_HINT)
    if "\0" in text:
        raise ReferenceError_("image reference contains a NUL character", _EXAMPLE_HINT)
    transport, rest = _split_transport(text)
    if transport == DOCKER:
        return _parse_enroot(rest, text)
    if transport == SQUASHFS:
        return _parse_squashfs(rest, text)
    return _parse_path(transport, rest, text)


def _split_transport(text: str) -> tuple[str, str]:
    if text.startswith(("/", ".")):  # pyxis: a path, never a registry image
        return SQUASHFS, text
    for prefix, instead in _DAEMON_PREFIXES.items():
        if text.startswith(prefix):
            raise ReferenceError_(
                f'"{prefix}" images come from a local container daemon, which uctr does not '
                f'use: "{text}"', f"export the image first: {instead}")
    for prefix, transport in _PREFIXES:
        if text.startswith(prefix):
            return transport, text[len(prefix):]
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ReferenceError_(
            f'unknown transport "{scheme}://" in "{text}"',
            "use docker://, oci:, oci-archive:, docker-archive: or squashfs:, or write the image "
            f"without a transport, e.g. {_EXAMPLE}",
        )
    return DOCKER, text


def _parse_path(transport: str, rest: str, text: str) -> ImageRef:
    if transport == DOCKER_ARCHIVE:
        # As in skopeo: the path ends at the first ':'; the rest is a docker reference.
        path, sep, inner = rest.partition(":")
    else:
        path, sep, inner = rest.rpartition(":")
        if not sep or "/" in inner:  # a ':' inside the directory name, no tag
            path, sep, inner = rest, "", ""
    if not path:
        raise ReferenceError_(f'missing path in "{text}"', f"write {transport}:PATH[:TAG]")
    if sep and not inner:
        raise ReferenceError_(f'empty tag in "{text}"', _EMPTY_TAG_HINT)
    if transport != DOCKER_ARCHIVE:
        if inner:
            _check_tag(inner, text)
        return ImageRef(transport=transport, tag=inner or None, path=path)
    if not inner:
        return ImageRef(transport=transport, path=path)
    named = _parse_docker(inner, text)
    if named.digest:
        raise ReferenceError_(f'digest not allowed in a docker-archive reference: "{text}"',
                              "name the image inside the archive by REPOSITORY[:TAG]")
    return ImageRef(transport=transport, registry=named.registry, repository=named.repository,
                    tag=named.tag, path=path)


def _parse_squashfs(rest: str, text: str) -> ImageRef:
    if not rest:
        raise ReferenceError_(f'missing path in "{text}"', "write squashfs:PATH or an absolute "
                              "path such as /shared/images/pytorch.sqsh")
    return ImageRef(transport=SQUASHFS, path=rest)


def _parse_enroot(rest: str, text: str) -> ImageRef:
    """enroot's [USER@][REGISTRY#]IMAGE[:TAG] on top of Docker's syntax."""
    user, rest = _split_user(rest, text)
    registry, sep, image = rest.partition("#")
    if not sep:
        ref = _parse_docker(rest, text)
    else:
        if not registry or not _REGISTRY.match(registry) or not _valid_port(registry):
            raise ReferenceError_(
                f'invalid registry "{registry}" before "#" in "{text}"',
                "enroot's form is [USER@][REGISTRY#]IMAGE[:TAG], e.g. "
                "nvcr.io#nvidia/pytorch:24.01-py3")
        if "#" in image:
            raise ReferenceError_(f'more than one "#" in "{text}"',
                                  "only the registry is followed by '#'")
        # the registry is explicit: IMAGE's first component is never taken for one
        ref = _parse_docker(image, text, registry=registry)
    if user is None:
        return ref
    return ImageRef(transport=DOCKER, registry=ref.registry, repository=ref.repository,
                    tag=ref.tag, digest=ref.digest, user=user)


def _split_user(rest: str, text: str) -> tuple[str | None, str]:
    """A leading USER@ (enroot) unless the '@' starts a digest (NAME@sha256:...)."""
    head, sep, tail = rest.partition("@")
    if not sep or not tail or _LOOKS_LIKE_DIGEST.match(tail) or "/" in head or ":" in head or "#" in head:
        return None, rest
    if not _USER.match(head):
        raise ReferenceError_(f'invalid user name "{head}" in "{text}"',
                              "enroot's form is [USER@][REGISTRY#]IMAGE[:TAG]; a user name is "
                              "letters, digits, '.', '_' or '-'")
    return head, tail


def _parse_docker(rest: str, text: str, registry: str | None = None) -> ImageRef:
    """Docker's syntax; REGISTRY given (enroot's REGISTRY#) means REST has none."""
    if not rest:
        raise ReferenceError_(f'empty image reference in "{text}"', _EXAMPLE_HINT)
    name, digest = _split_digest(rest, text)
    name, tag = _split_tag(name, text)
    if registry is None:
        registry, path = _split_registry(name, text)
    else:
        path = name
    _check_repository(path, text, len(text) - len(rest) + len(name))
    if registry in _HUB_ALIASES:
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = "library/" + path
    length = len(registry) + 1 + len(path)
    if length > MAX_NAME:
        raise ReferenceError_(
            f'image name too long ({length} > {MAX_NAME} characters): "{text}"',
            "registry and repository together may have at most 255 characters",
        )
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageRef(transport=DOCKER, registry=registry, repository=path, tag=tag, digest=digest)


def _split_digest(rest: str, text: str) -> tuple[str, str | None]:
    name, sep, digest = rest.partition("@")
    if not sep:
        return rest, None
    if not _DIGEST.match(digest):
        algo = digest.partition(":")[0]
        if ":" in digest and algo != "sha256" and re.match(r"[a-z0-9]+\Z", algo):
            raise ReferenceError_(f'unsupported digest algorithm "{algo}" in "{text}"',
                                  "uctr verifies sha256 digests only")
        raise ReferenceError_(f'invalid digest "{digest}" in "{text}"', _DIGEST_HINT)
    return name, digest


def _split_tag(name: str, text: str) -> tuple[str, str | None]:
    # A ':' after the last '/' starts the tag; before it, it belongs to registry:port.
    colon = name.rfind(":")
    if colon < 0 or "/" in name[colon:]:
        return name, None
    tag = name[colon + 1:]
    _check_tag(tag, text)
    return name[:colon], tag


def _check_tag(tag: str, text: str) -> None:
    if not tag:
        raise ReferenceError_(f'empty tag in "{text}"', _EMPTY_TAG_HINT)
    if not _TAG.match(tag):
        raise ReferenceError_(f'invalid tag "{tag}" in "{text}"', _TAG_HINT)


def _docker_sees_registry(first: str) -> bool:
    return "." in first or ":" in first or first == "localhost"


def _split_registry(name: str, text: str) -> tuple[str, str]:
    first, sep, remainder = name.partition("/")
    if not sep or not _docker_sees_registry(first):
        return DEFAULT_REGISTRY, name
    if not _REGISTRY.match(first) or not _valid_port(first):
        raise ReferenceError_(
            f'invalid registry "{first}" in "{text}"',
            "a registry is a host name or IP address with an optional :PORT, "
            "e.g. registry.example.org:5000",
        )
    return first, remainder


def _valid_port(host: str) -> bool:
    if host.endswith("]") or ":" not in host.rsplit("]", 1)[-1]:
        return True
    port = host.rsplit(":", 1)[1]
    return 0 < int(port) < 65536


def _check_repository(path: str, text: str, end: int) -> None:
    """Validate the repository path, which ends at offset `end` of `text`."""
    if not path:
        raise ReferenceError_(f'missing repository name in "{text}"', _EXAMPLE_HINT)
    if path != path.lower() and all(_COMPONENT.match(c) for c in path.lower().split("/")):
        suggestion = text[:end - len(path)] + path.lower() + text[end:]
        raise ReferenceError_(f'repository name must be lowercase: "{path}"',
                              f'did you mean "{suggestion}"?')
    for component in path.split("/"):
        if not _COMPONENT.match(component):
            raise ReferenceError_(f'invalid repository name "{path}" in "{text}"', _COMPONENT_HINT)

