"""Correctness oracle: our rootfs against `umoci unpack --rootless` of the same image.

Both run as the unprivileged test user (what a cluster user gets; as root, umoci would also
chown). Every path is compared: type, link target, content (sha256), permission bits and
the hard-link count. Documented exceptions, each by design of uctr-batch:

  SETID    set-user/group-ID bits of non-directories are stripped (umoci keeps them).
  READABLE non-directories get u+r and directories u+rx: the owner must be able to read its
           rootfs in modes without a user-namespace root (proot, fakechroot); umoci keeps
           0000 as 0000.
  DEVICE   device nodes are skipped; umoci --rootless writes an empty regular file instead.

Everything else must be identical, including whiteouts, opaque directories, hard links,
0500 directories, FIFOs and absolute symlink targets (kept verbatim by both).
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

from tests.harness import users

# image name -> (our image, umoci's image, platform): umoci 0.4 cannot read zstd, so
# layers-zstd (same rootfs) is checked against umoci's unpack of "layers"
CASES = {
    "busybox": ("busybox", "busybox", None),
    "layers": ("layers", "layers", None),
    "layers-zstd": ("layers-zstd", "layers", None),
    "debian": ("debian", "debian", None),
    "multiarch-amd64": ("multiarch", "multiarch", "linux/amd64"),
    "multiarch-arm64": ("multiarch", "multiarch", "linux/arm64/v8"),
}


def _entry(path: str) -> tuple:
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISREG(kind):
        with open(path, "rb") as f:
            return ("file", mode, hashlib.sha256(f.read()).hexdigest(), st.st_nlink)
    if stat.S_ISLNK(kind):
        return ("symlink", None, os.readlink(path), st.st_nlink)
    if stat.S_ISDIR(kind):
        return ("dir", mode, None, None)
    if stat.S_ISFIFO(kind):
        return ("fifo", mode, None, st.st_nlink)
    return (f"other-{kind:o}", mode, None, st.st_nlink)


def tree(root: Path) -> Dict[str, tuple]:
    found = {".": _entry(str(root))}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = _entry(path)
    return found


def device_paths(layout: Path, manifest: dict) -> Set[str]:
    """Paths the image's layers declare as character or block devices."""
    found = set()
    for layer in manifest["layers"]:
        blob = layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
        with tarfile.open(blob) as archive:  # gzip and plain tar (umoci's images have no zstd)
            for member in archive:
                if member.ischr() or member.isblk():
                    found.add(os.path.normpath(member.name.lstrip("/")))
    return found


def expected_from_umoci(entry: tuple) -> tuple:
    """What uctr should produce where umoci produced ENTRY (exceptions SETID, READABLE)."""
    kind, mode, data, nlink = entry
    if kind == "dir":
        return (kind, mode | 0o500, data, nlink)
    if mode is not None:
        mode = (mode & ~0o6000) | 0o400
    return (kind, mode, data, nlink)


def compare(ours: Dict[str, tuple], umoci: Dict[str, tuple], devices: Set[str]) -> List[str]:
    problems = []
    for path in sorted(set(ours) | set(umoci)):
        mine, theirs = ours.get(path), umoci.get(path)
        if (
            mine is None
            and path in devices
            and theirs[:3] == ("file", 0o644, hashlib.sha256().hexdigest())
        ):
            continue  # DEVICE
        if theirs is None or mine is None:
            problems.append(
                f"{path}: only in {'uctr' if theirs is None else 'umoci'}: {mine or theirs}"
            )
        elif mine != expected_from_umoci(theirs):
            problems.append(f"{path}: uctr {mine} umoci {theirs}")
    return problems


def run_user(argv, **kwargs) -> subprocess.CompletedProcess:
    if users.can_switch_user():
        return users.run_as(users.TEST_USER, argv, **kwargs)
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def umoci_layout(image, platform: Optional[str], workdir: Path, name: str) -> str:
    """umoci's image argument. umoci 0.4 calls an index tag ambiguous: give it a copy of the
    layout whose tag names the platform's manifest."""
    if platform is None:
        return f"{image.layout}:{image.tag}"
    copy = workdir / f"layout-{name}"
    if not copy.exists():
        shutil.copytree(image.layout, copy)
        architecture = platform.split("/")[1]
        digest = image.manifest_digest(architecture)
        (copy / "index.json").write_text(
            json.dumps(
                {
                    "schemaVersion": 2,
                    "manifests": [
                        {
                            "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": digest,
                            "size": len(image.blob(digest)),
                            "annotations": {"org.opencontainers.image.ref.name": architecture},
                        }
                    ],
                }
            )
        )
        subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True)
    return f"{copy}:{platform.split('/')[1]}"


@pytest.mark.parametrize("case", list(CASES))
def test_rootfs_matches_umoci(case, test_images, uctr):
    ours_name, umoci_name, platform = CASES[case]
    ours_image, umoci_image = test_images[ours_name], test_images[umoci_name]
    user = users.TEST_USER if users.can_switch_user() else None
    workdir = uctr.dirs(user).base  # the user's own directory (pytest's tmp is root-only)

    umoci_bundle = workdir / f"umoci-{case}"
    result = run_user(
        [
            "umoci",
            "unpack",
            "--rootless",
            "--image",
            umoci_layout(umoci_image, platform, workdir, case),
            str(umoci_bundle),
        ]
    )
    assert result.returncode == 0, result.stderr

    our_bundle = workdir / f"uctr-{case}"
    argv = [
        "create",
        "--dest",
        our_bundle,
        *(["--platform", platform] if platform else []),
        ours_image.oci_ref,
    ]
    result = uctr(*argv, user=user)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(our_bundle / "rootfs")

    architecture = platform.split("/")[1] if platform else None
    devices = device_paths(umoci_image.layout, umoci_image.manifest(architecture))
    ours, theirs = tree(our_bundle / "rootfs"), tree(umoci_bundle / "rootfs")
    assert compare(ours, theirs, devices) == []
    assert len(ours) >= 2  # the root and at least one entry
    if ours_name.startswith("layers"):  # the exceptions are real, not vacuous
        assert theirs["bin/suid"][1] == 0o4755 and ours["bin/suid"][1] == 0o755
        assert theirs["secret"][1] == 0o000 and ours["secret"][1] == 0o400
        assert ours["locked"][1] == theirs["locked"][1] == 0o500


def test_compare_catches_differences():
    """The comparison itself must fail on a changed mode, content, link or a missing path."""
    umoci = {
        "f": ("file", 0o644, "aa", 1),
        "l": ("symlink", None, "/x", 1),
        "d": ("dir", 0o755, None, None),
        "dev/null": ("file", 0o644, hashlib.sha256().hexdigest(), 1),
    }
    same = {
        "f": ("file", 0o644, "aa", 1),
        "l": ("symlink", None, "/x", 1),
        "d": ("dir", 0o755, None, None),
    }
    assert compare(same, umoci, {"dev/null"}) == []
    assert compare(same, umoci, set()) != []  # an empty file is not a device unless declared
    for path, changed in (
        ("f", ("file", 0o600, "aa", 1)),
        ("f", ("file", 0o644, "bb", 1)),
        ("f", ("file", 0o644, "aa", 2)),
        ("l", ("symlink", None, "x", 1)),
        ("d", ("file", 0o755, None, 1)),
    ):
        assert compare(dict(same, **{path: changed}), umoci, {"dev/null"}) != [], (path, changed)
    missing = dict(same)
    del missing["f"]
    assert compare(missing, umoci, {"dev/null"}) != []
