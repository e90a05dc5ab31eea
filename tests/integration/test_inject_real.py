"""Host MPI injection with this host's real Open MPI and MPICH, checked by running programs
in the resulting container: the plan is applied with bubblewrap (binds, devices, environment
exactly as listed) and the dynamic loader of the image decides what really gets loaded."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import hostabi
from tests.unit.inject_util import (GCC, build_lib, ldconfig, libdir, make_root, needs_toolchain,
                                     run_in)
from uctr_batch.inject import LIB_DIR, mpi_plan
from uctr_batch.inject.libroot import LibRoot

BWRAP = shutil.which("bwrap")
HOST = LibRoot("/")


def _host_lib(name):
    lib = HOST.find(name)
    if lib is None:
        pytest.skip("%s is not installed on this host" % name)
    return lib


def _bwrap_works():
    if BWRAP is None:
        return False
    return (
        subprocess.run([BWRAP, "--ro-bind", "/", "/", "true"], capture_output=True).returncode == 0
    )


needs_bwrap = pytest.mark.skipif(
    not _bwrap_works(), reason="bubblewrap missing or no user namespaces"
)


def _copy_closure(lib, dest: Path, skip=()):
    """Copy the host library and everything it needs (ldd) into dest, keeping file names."""
    out = subprocess.run(["ldd", lib], capture_output=True, text=True, check=True).stdout
    paths = [lib] + [line.split("=>")[1].split()[0] for line in out.splitlines() if "=> /" in line]
    for path in paths:
        real = os.path.realpath(path)
        name = os.path.basename(real)
        if any(name.startswith(s) for s in skip) or (dest / name).exists():
            continue
        shutil.copy(real, dest / name)


APP_C = r"""
#include <stdio.h>
int MPI_Get_library_version(char *version, int *len);
int main(void) {
    char v[8192];
    int n = 0;
    MPI_Get_library_version(v, &n);
    printf("%.60s\n", v);
    return 0;
}
"""
FAKE_MPI = (
    "#include <string.h>\nint MPI_Get_library_version(char *v, int *n) "
    '{ strcpy(v, "FAKE image MPI"); *n = 14; return 0; }\n'
)


def _image_with_fake_mpi(tmp_path, soname, version, closure_of=None, skip=()):
    """An image whose MPI is a stand-in answering "FAKE image MPI", plus an app linked to it;
    with closure_of, the host library's dependencies are copied in too (as a distro would
    have installed them)."""
    root = make_root(tmp_path / "image")
    lib = root / libdir().lstrip("/")
    if closure_of:
        _copy_closure(closure_of, lib, skip=skip)
    fake = build_lib(lib, soname, version, symbols=FAKE_MPI)
    src = tmp_path / "app.c"
    src.write_text(APP_C)
    subprocess.run([GCC, "-o", str(root / "usr/bin/app"), str(src), str(fake)], check=True)
    ldconfig(root)
    return root


@needs_toolchain
@needs_bwrap
def test_openmpi_full_swap_really_runs_the_host_mpi(tmp_path):
    host_mpi = _host_lib("libmpi.so.40")
    image = _image_with_fake_mpi(
        tmp_path, "libmpi.so.40", "20.0", closure_of=host_mpi.real, skip=("libmpi.so",)
    )
    before = run_in(image, mpi_plan(str(image), "none"), ["/usr/bin/app"])
    assert before.stdout.strip() == "FAKE image MPI", before.stderr
    plan = mpi_plan(str(image), "auto", app=["/usr/bin/app"])
    assert plan.mpi_level == "full", plan.summary_lines()
    binds = {b.dst: b.src for b in plan.binds}
    assert binds[libdir() + "/libmpi.so.40.20.0"] == os.path.realpath(host_mpi.real)
    pal = os.path.realpath(HOST.find(hostabi.openmpi_pal_soname()).real)  # .40 or .80
    assert binds[libdir() + "/" + os.path.basename(pal)] == pal  # the copy is bound over too
    after = run_in(image, plan, ["/usr/bin/app"])
    assert after.returncode == 0, after.stderr
    assert after.stdout.startswith("Open MPI v"), after.stdout


@needs_toolchain
def test_image_with_the_hosts_own_openmpi_copies(tmp_path):
    """(a) The image holds byte-identical copies of the host's Open MPI: every one of them
    gets the host file bound over it."""
    host_mpi = _host_lib("libmpi.so.40")
    image = make_root(tmp_path / "image")
    lib = image / libdir().lstrip("/")
    _copy_closure(host_mpi.real, lib)
    ldconfig(image)
    plan = mpi_plan(str(image), "auto")
    assert plan.mpi_level == "full"
    copied_core = {
        libdir() + "/" + n
        for n in os.listdir(lib)
        if n.startswith(("libmpi.so.", "libopen-")) and not os.path.islink(lib / n)
    }
    over = {b.dst for b in plan.binds if not b.dst.startswith(LIB_DIR)}
    assert copied_core <= over
    assert all(
        os.path.basename(b.src) == os.path.basename(b.dst)
        for b in plan.binds
        if b.dst in copied_core
    )


@needs_toolchain
@needs_bwrap
def test_mpich_abi_swap_pairs_libmpich_with_libmpi(tmp_path):
    host_mpich = _host_lib("libmpich.so.12")
    image = _image_with_fake_mpi(tmp_path, "libmpi.so.12", "1.0")
    plan = mpi_plan(str(image), "auto", app=["/usr/bin/app"])
    assert plan.mpi_level == "full", plan.summary_lines()
    assert {b.dst: b.src for b in plan.binds}[libdir() + "/libmpi.so.12.1.0"] == os.path.realpath(
        host_mpich.real
    )
    result = run_in(image, plan, ["/usr/bin/app"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("MPICH Version"), result.stdout


@needs_toolchain
def test_family_mismatch_with_an_openmpi_profile(tmp_path):
    _host_lib("libmpi.so.40")
    image = _image_with_fake_mpi(tmp_path, "libmpi.so.12", "1.0")
    policy = {
        "mpi_profiles": {
            "host-ompi": {"family": "openmpi", "libs": [HOST.find("libmpi.so.40").path]}
        }
    }
    plan = mpi_plan(str(image), "host-ompi", policy, app=["/usr/bin/app"])
    assert plan.mpi_level == "none"
    refused = [m.reason for m in plan.manifest if m.subject == "full swap refused"]
    assert refused == [
        "host MPI family openmpi (profile host-ompi) does not match the image's "
        "mpich-abi (libmpi.so.12)"
    ]
    assert plan.binds == []


@pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="busybox-static not installed")
def test_busybox_static_image_gets_nothing(tmp_path):
    root = tmp_path / "bb"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    plan = mpi_plan(str(root), "auto")
    assert plan.no_injection and "no glibc" in plan.no_injection
    assert plan.binds == [] and plan.mpi_level == "none"
    assert any("all host libraries" == m.subject for m in plan.manifest)


# -- the Debian MPI test images -----------------------------------------------------------


def _unpack(flavour, dest):
    if shutil.which("umoci") is None:
        pytest.skip("umoci not installed")
    from tests.harness.mpi_images import cached_mpi_layout
    from tests.harness.oci import TAG

    layout = cached_mpi_layout(flavour)
    subprocess.run(
        ["umoci", "raw", "unpack", "--rootless", "--image", "%s:%s" % (layout, TAG), str(dest)],
        check=True,
        capture_output=True,
    )
    return dest


@pytest.fixture(scope="module")
def openmpi_rootfs(tmp_path_factory):
    return _unpack("debian-openmpi", tmp_path_factory.mktemp("ompi") / "rootfs")


@pytest.fixture(scope="module")
def mpich_rootfs(tmp_path_factory):
    return _unpack("debian-mpich", tmp_path_factory.mktemp("mpich") / "rootfs")


@pytest.mark.slow
@needs_bwrap
def test_debian_openmpi_image_full_swap_and_singleton(openmpi_rootfs):
    _host_lib("libmpi.so.40")
    plan = mpi_plan(str(openmpi_rootfs), "auto")
    hostabi.expect_full_swap(plan.mpi_level, plan.summary_lines())
    assert plan.info["mpi"]["image_family"] == "openmpi"
    dirs = {b.dst for b in plan.binds if b.kind == "dir"}
    assert any("/openmpi" in d for d in dirs)  # the MCA components travel with libopen-pal
    hello = run_in(openmpi_rootfs, plan, ["/usr/local/bin/mpi_hello"])
    assert "hello rank=0 size=1" in hello.stdout, hello.stderr
    py = run_in(
        openmpi_rootfs,
        plan,
        ["python3", "-c", "from mpi4py import MPI; print(MPI.Get_library_version()[:8])"],
    )
    assert py.stdout.strip() == "Open MPI", py.stderr


@pytest.mark.slow
@needs_bwrap
def test_debian_mpich_image(mpich_rootfs):
    _host_lib("libmpich.so.12")
    plan = mpi_plan(str(mpich_rootfs), "auto")
    hostabi.expect_full_swap(plan.mpi_level, plan.summary_lines())
    assert plan.info["mpi"]["image_family"] == plan.info["mpi"]["host_family"] == "mpich-abi"
    hello = run_in(mpich_rootfs, plan, ["/usr/local/bin/mpi_hello"])
    assert "hello rank=0 size=1" in hello.stdout, hello.stderr
    # The host's Open MPI cannot replace it; the ladder falls back to its fabric libraries.
    policy = {
        "mpi_profiles": {
            "host-ompi": {"family": "openmpi", "libs": [HOST.find("libmpi.so.40").path]}
        }
    }
    fabric = mpi_plan(str(mpich_rootfs), "host-ompi", policy)
    assert fabric.mpi_level == "fabric", fabric.summary_lines()
    assert any(
        b.dst.endswith(os.path.basename(os.path.realpath(HOST.find("libucp.so.0").real)))
        for b in fabric.binds
    )
    again = run_in(mpich_rootfs, fabric, ["/usr/local/bin/mpi_hello"])
    assert "hello rank=0 size=1" in again.stdout, again.stderr
