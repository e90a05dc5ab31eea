"""Debian roots with newer Slurm releases, and running commands inside them, isolated.

The Slurm version matrix (tests/slurm_matrix) runs tests/slurm and the demo inside Debian
trixie (Slurm 24.11, PMIx 5) and sid (Slurm 26.05, no mpi/pmix) besides the host's 22.05.

Build (once per recipe, cached like the test images of harness.debian): mmdebstrap makes the
root with the packages scripts/install.sh lists (so the root is set up as the README tells a
site to), then the project's own scripts/install.sh runs inside it for the venv and the test
user. The cache directory is named by a hash of the recipe (this module's RECIPE_VERSION, the
mmdebstrap command and the text of install.sh and pyproject.toml): a changed recipe builds a
new root, an unchanged one is reused; the root appears by an atomic rename, so a half-built
root is never used.

Run: `run_in_root(release, argv)` runs ARGV as root inside a copy-on-write view of the root
(overlayfs; the cached root itself is never written) in new mount, network, PID, UTS and IPC
namespaces. The new root is entered with pivot_root, not chroot: the kernel refuses new user
namespaces to a chrooted process, and the run modes need them. The checkout is bound at its
own path (so paths in test output read the same), and so is the test-image cache. Only `lo`
exists in the network namespace; the Slurm harness makes its bridge and nodes inside it, so a
cluster in a root never meets the host's cluster or another root's.

    from tests.harness import slurmroot
    result = slurmroot.run_in_root("trixie", ["sinfo", "--version"])
    result = slurmroot.run_in_root("sid", ["/opt/uctr-batch/venv/bin/python", "-m", "pytest",
                                           "-q", "tests/slurm"], timeout=1800)

Runs as root; needs mmdebstrap (to build), unshare, overlayfs. Nothing here imports uctr_batch.
"""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from .debian import cache_root, host_mirror

REPO = Path(__file__).resolve().parent.parent.parent
RECIPE_VERSION = "1"  # bump when the build below changes
VENV_PYTHON = "/opt/uctr-batch/venv/bin/python"  # scripts/install.sh's venv, inside the root
# What --variant=apt lacks and the harness or install.sh needs before install.sh runs.
BASE_PACKAGES = ("git", "ca-certificates", "python3", "python3-venv", "iproute2", "mount",
                 "procps", "curl", "passwd", "util-linux")
# Host files pip needs inside the root during the build (the host's CA bundle, pip's
# configuration and local package indexes, where this machine has them).
PIP_HOST_PATHS = ("/etc/pip.conf", "/opt/wheels", "/opt/pypi", "/opt/pypi-more")
PIP_ENV = ("PIP_CERT", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL",
           "PIP_DEFAULT_TIMEOUT", "PIP_DISABLE_PIP_VERSION_CHECK", "REQUESTS_CA_BUNDLE",
           "SSL_CERT_FILE", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
           "no_proxy", "NO_PROXY")
VERSION_PACKAGES = ("slurmd", "libpmix2t64", "openmpi-bin", "mpich", "libc6", "python3",
                    "crun", "apptainer")


@dataclass(frozen=True)
class Release:
    suite: str
    slurm: str  # the major.minor Debian ships in that suite
    apt_options: Sequence[str] = ()
    extra_packages: Sequence[str] = ()


RELEASES: Dict[str, Release] = {
    "trixie": Release("trixie", "24.11"),
    # sid's Release file may be past its Valid-Until date on the mirror; apptainer for mode S1
    "sid": Release("sid", "26.05", apt_options=('Acquire::Check-Valid-Until "false"',),
                   extra_packages=("apptainer",)),
}


class RootError(RuntimeError):
    pass


def selected_releases() -> List[str]:
    """The releases the matrix runs: UCTR_SLURM_MATRIX (comma-separated names, or "none"),
    else all of RELEASES."""
    wanted = os.environ.get("UCTR_SLURM_MATRIX", ",".join(RELEASES)).split(",")
    return [name for name in RELEASES if name in wanted]


def install_packages(repo: Path = REPO) -> List[str]:
    """The PACKAGES array of scripts/install.sh (what a site installs)."""
    text = (repo / "scripts" / "install.sh").read_text()
    start = text.index("PACKAGES=(") + len("PACKAGES=(")
    body = text[start:text.index("\n)", start)]
    words: List[str] = []
    for line in body.splitlines():
        words += line.split("#", 1)[0].split()
    return words


def mmdebstrap_argv(release: Release, output: Path, mirror: str, repo: Path = REPO) -> List[str]:
    packages = sorted(set(BASE_PACKAGES) | set(install_packages(repo)) |
                      set(release.extra_packages))
    argv = ["mmdebstrap", "--quiet", "--variant=apt", "--format=directory",
            "--include=" + ",".join(packages)]
    argv += [f"--aptopt={option}" for option in release.apt_options]
    return argv + [release.suite, str(output), mirror]


def recipe_key(release: Release, mirror: str, repo: Path = REPO) -> str:
    parts = [RECIPE_VERSION, " ".join(mmdebstrap_argv(release, Path("OUT"), mirror, repo)),
             (repo / "scripts" / "install.sh").read_text(),
             (repo / "pyproject.toml").read_text()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def roots_dir() -> Path:
    return cache_root() / "roots"


def missing_prerequisites(build: bool = True) -> Optional[str]:
    if os.geteuid() != 0:
        return "Debian release roots need root (mmdebstrap, namespaces, overlayfs)"
    tools = ("unshare", "pivot_root", "mount") + (("mmdebstrap",) if build else ())
    for tool in tools:
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (run scripts/install.sh)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    return None


def cached_root(name: str, repo: Path = REPO) -> Path:
    """The root of release NAME (trixie, sid), built first if missing."""
    release = RELEASES[name]
    mirror = host_mirror()
    base = roots_dir()
    base.mkdir(parents=True, exist_ok=True)
    root = base / f"{name}-{recipe_key(release, mirror, repo)}"
    if (root / "etc" / "uctr-root.json").exists():
        return root
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building the same root
        if not (root / "etc" / "uctr-root.json").exists():
            staging = Path(tempfile.mkdtemp(prefix=f".building-{name}-", dir=base))
            try:
                _build(release, staging / "root", mirror, repo)
                os.rename(staging / "root", root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        _prune_stale(base, name, root)
    return root


def _use_lock(root: Path) -> Path:
    return root.parent / f".{root.name}.use"


def _prune_stale(base: Path, name: str, current: Path) -> None:
    """Each change to install.sh or pyproject.toml makes a new root (1-2 GB): remove this
    release's older roots that no run holds (run_in_root keeps a shared lock on its root)."""
    for old in base.glob(f"{name}-*"):
        if old == current or not old.is_dir():
            continue
        with open(_use_lock(old), "w") as use:
            try:
                fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a run of another checkout still uses it
            shutil.rmtree(old, ignore_errors=True)
        _use_lock(old).unlink(missing_ok=True)


def root_info(root: Path) -> Dict:
    """What the build recorded: suite, mirror, build time and package versions."""
    return json.loads((root / "etc" / "uctr-root.json").read_text())


def _build(release: Release, root: Path, mirror: str, repo: Path) -> None:
    start = time.monotonic()
    result = subprocess.run(mmdebstrap_argv(release, root, mirror, repo), capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RootError(f"mmdebstrap {release.suite} failed ({result.returncode}):\n"
                        f"{result.stderr[-4000:]}")
    _prepare_files(release, root, repo)
    # the project's own setup script, with the host network (the mirror and pip's index)
    setup = ["bash", "/opt/uctr-src/scripts/install.sh"]
    done = _enter(root, setup, isolate_net=False, extra_binds=_pip_binds(),
                  env=_pip_env(), cwd="/", timeout=1800, overlay=False)
    if done.returncode != 0:
        raise RootError(f"scripts/install.sh failed in the {release.suite} root "
                        f"({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    info = {"suite": release.suite, "slurm": release.slurm, "mirror": mirror,
            "build_seconds": round(time.monotonic() - start, 1),
            "versions": _versions(root)}
    (root / "etc" / "uctr-root.json").write_text(json.dumps(info, indent=1, sort_keys=True))


def _prepare_files(release: Release, root: Path, repo: Path) -> None:
    hostname = f"uctr-{release.suite}"
    (root / "etc" / "hostname").write_text(hostname + "\n")
    (root / "etc" / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n"
                                        "::1 localhost ip6-localhost\n")
    shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if ca.exists():  # the host's bundle may hold a site proxy's CA that pip needs
        shutil.copyfile(ca, root / "etc" / "uctr-host-ca.pem")
    # what install.sh reads (its package list, the requirements, the package it may install)
    src = root / "opt" / "uctr-src"
    (src / "scripts").mkdir(parents=True, exist_ok=True)
    shutil.copy2(repo / "scripts" / "install.sh", src / "scripts" / "install.sh")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, src / name)
    shutil.copytree(repo / "uctr_batch", src / "uctr_batch",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in PIP_HOST_PATHS:
        if Path(path).is_dir():
            (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)


def _pip_binds() -> List[str]:
    return [p for p in PIP_HOST_PATHS if Path(p).exists()]


def _pip_env() -> Dict[str, str]:
    env = {k: os.environ[k] for k in PIP_ENV if k in os.environ}
    if Path("/etc/ssl/certs/ca-certificates.crt").exists():
        env["PIP_CERT"] = "/etc/uctr-host-ca.pem"
        env["REQUESTS_CA_BUNDLE"] = env["SSL_CERT_FILE"] = "/etc/uctr-host-ca.pem"
    return env


def _versions(root: Path) -> Dict[str, str]:
    out = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W",
                          "-f=${Package} ${Version} ${Status}\n", *VERSION_PACKAGES],
                         capture_output=True, text=True).stdout
    versions = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 3 and line.endswith("install ok installed"):
            versions[words[0]] = words[1]
    return versions


# -- running inside a root ----------------------------------------------------------------------
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8", "HOME": "/root", "PYTHONDONTWRITEBYTECODE": "1"}

# Runs in the new namespaces, before the switch of root. $1: the root (lower), $2: the
# scratch dir (upper/work/mount point), $3: 1 for overlay, $4: binds (newline-separated
# SRC=DEST); then the command. A failure here stops the run before the command starts.
_ENTER = r'''
set -eu
lower=$1 scratch=$2 overlay=$3 binds=$4 isolate_net=$5 host=$6 cwd=$7
shift 7
new=$scratch/mnt
mkdir -p "$new"
mount --make-rprivate /
if [ "$overlay" = 1 ]; then
    mkdir -p "$scratch/upper" "$scratch/work"
    mount -t overlay overlay \
        -o "lowerdir=$lower,upperdir=$scratch/upper,workdir=$scratch/work" "$new"
else
    mount --bind "$lower" "$new"
fi
mount -t proc proc "$new/proc"
if [ "$isolate_net" = 1 ]; then
    mount -t sysfs sysfs "$new/sys"  # this network namespace's view of /sys/class/net
    [ -d /sys/fs/cgroup ] && mount --rbind /sys/fs/cgroup "$new/sys/fs/cgroup"
    ip link set lo up
    hostname "$host"
else
    mount --rbind /sys "$new/sys"
fi
mount --rbind /dev "$new/dev"
mount -t tmpfs -o mode=1777 tmpfs "$new/dev/shm"
mount -t tmpfs -o mode=0755 tmpfs "$new/run"
mount -t tmpfs -o mode=1777 tmpfs "$new/tmp"
# A node gives users /dev/fuse (0666, Debian's default: apptainer mounts SIF images with
# squashfuse); the host's may be root-only. A node of the run's own, bound over it in this
# mount namespace only: the host's device is not touched.
if [ -c /dev/fuse ]; then
    mknod -m 666 "$new/run/uctr-fuse" c 10 229
    mount --bind "$new/run/uctr-fuse" "$new/dev/fuse"
fi
printf '%s\n' "$binds" | while IFS= read -r pair; do
    [ -n "$pair" ] || continue
    src=${pair%%=*} dest=$new${pair#*=}
    if [ -d "$src" ]; then mkdir -p "$dest"; else mkdir -p "$(dirname "$dest")"; touch "$dest"; fi
    mount --bind "$src" "$dest"
done
mkdir -p "$new/.old-root"
cd "$new"
pivot_root . .old-root
# chroot to the new root (which is now the namespace's root: not "chrooted" for the kernel)
exec /usr/sbin/chroot . /bin/sh -c \
    'umount -l /.old-root && rmdir /.old-root && cd "$0" && exec "$@"' "$cwd" "$@"
'''


def _enter(root: Path, argv: Sequence[str], isolate_net: bool = True,
           extra_binds: Sequence[str] = (), binds: Mapping[str, str] = (),
           env: Optional[Mapping[str, str]] = None, cwd: str = "/", timeout: float = 3600,
           overlay: bool = True, input: Optional[str] = None) -> subprocess.CompletedProcess:
    pairs = [f"{p}={p}" for p in extra_binds] + [f"{s}={d}" for s, d in dict(binds).items()]
    # --kill-child: a run that times out (subprocess kills unshare) takes its whole PID
    # namespace along, so no daemon of the root's cluster outlives it
    flags = ["--mount", "--pid", "--fork", "--kill-child", "--uts", "--ipc"]
    flags += ["--net"] if isolate_net else []
    scratch = Path(tempfile.mkdtemp(prefix="uctr-root-run-", dir="/var/tmp"))
    full_env = dict(BASE_ENV, **(env or {}))
    name = (root_info(root)["suite"] if (root / "etc" / "uctr-root.json").exists()
            else root.name.split("-")[0])
    try:
        return subprocess.run(
            ["unshare", *flags, "sh", "-c", _ENTER, "enter", str(root), str(scratch),
             "1" if overlay else "0", "\n".join(pairs), "1" if isolate_net else "0",
             f"uctr-{name}", cwd, "/usr/bin/env", "-i",
             *[f"{k}={v}" for k, v in full_env.items()], *argv],
            capture_output=True, text=True, timeout=timeout, input=input)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(scratch)], check=False)


def run_in_root(name: str, argv: Sequence[str], checkout: Path = REPO,
                env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                timeout: float = 3600, binds: Mapping[str, str] = (),
                root: Optional[Path] = None, input: Optional[str] = None
                ) -> subprocess.CompletedProcess:
    """Run ARGV as root in release NAME's root (built first if missing), isolated, with
    CHECKOUT bound at its own path (the cwd unless CWD is given) and the test-image cache
    bound at its path. Writes go to a scratch overlay that is thrown away afterwards.
    ENV is added to a clean environment (PATH, LANG, HOME). Returns the CompletedProcess
    (text; stdout and stderr captured)."""
    root = root or cached_root(name)
    checkout = Path(checkout).resolve()
    # pip's local indexes too: scripts/install.sh (run by scripts/demo) may install the
    # package from the checkout, offline
    all_binds = {p: p for p in _pip_binds()}
    all_binds[str(checkout)] = str(checkout)
    images = cache_root()
    if images.is_dir():
        all_binds[str(images)] = str(images)
    all_binds.update(dict(binds))
    run_env = {"UCTR_TEST_DEBIAN_MIRROR": host_mirror(),  # the cached images' key
               "UCTR_TEST_DEBIAN_CACHE": str(images)}
    run_env.update({k: v for k, v in _pip_env().items() if k.startswith("PIP_")})
    run_env.update(env or {})
    with open(_use_lock(root), "w") as use:
        fcntl.flock(use, fcntl.LOCK_SH)  # not pruned while in use (_prune_stale)
        return _enter(root, argv, isolate_net=True, binds=all_binds, env=run_env,
                      cwd=cwd or str(checkout), timeout=timeout, input=input)
