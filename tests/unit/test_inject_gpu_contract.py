"""GPU injection logic against a fabricated host tree: device nodes as plain files, the NVIDIA
/proc text, versioned driver libraries compiled here, an ld.so.cache written by ldconfig -r.
A contract test: no GPU can run here, so the host is built to the documented layout (kernel
module /proc files, libnvidia-container's library list, /dev/dri/by-path)."""

import os
from pathlib import Path

import pytest

from tests.unit.inject_util import (
    NEEDS_FUTURE,
    build_lib,
    ldconfig,
    libdir,
    make_root,
    needs_toolchain,
    stub_libc,
)
from uctr_batch.inject import BIN_DIR, LIB_DIR, gpu_plan
from uctr_batch.inject.gpu import (
    allocation,
    amd_gpus,
    cuda_check,
    cuda_supported_by,
    nvidia_driver_version,
)
from uctr_batch.inject.plan import REFUSE

pytestmark = pytest.mark.contract

DRIVER = "550.54.15"
STALE = "535.104.05"
NVRM = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  %s  Tue Mar  5 22:23:56 UTC 2024\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)
NVRM_OPEN = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  %s  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Tue Mar  5 22:23:56 UTC 2024\n"
)


def _touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _uuid(n: int) -> str:
    return "GPU-0000000%d-1111-2222-3333-444444444444" % n


def nvidia_host(tmp_path: Path, libc_stub: bool = False) -> Path:
    root = make_root(tmp_path / "host", glibc=False)
    for name in ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"] + [
        "nvidia%d" % n for n in range(4)
    ]:
        _touch(root / "dev" / name)
    for cap in ("nvidia-cap1", "nvidia-cap2"):
        _touch(root / "dev/nvidia-caps" / cap)
    _touch(root / "proc/driver/nvidia/version", NVRM % DRIVER)
    for n in range(4):
        _touch(
            root / ("proc/driver/nvidia/gpus/0000:%d1:00.0/information" % n),
            "Model: \t\t NVIDIA H100\nIRQ:   \t\t 42\nGPU UUID: \t %s\nDevice Minor: \t %d\n"
            % (_uuid(n), n),
        )
    lib = root / libdir().lstrip("/")
    link = [stub_libc(tmp_path / "stub")] if libc_stub else []
    build_lib(
        lib,
        "libcuda.so.1",
        "",
        "host",
        real_name="libcuda.so.%s" % DRIVER,
        link=link,
        symbols=NEEDS_FUTURE if libc_stub else "",
    )
    (lib / "libcuda.so").symlink_to("libcuda.so.1")
    build_lib(lib, "libnvidia-ml.so.1", "", "host", real_name="libnvidia-ml.so.%s" % DRIVER)
    build_lib(lib, "libnvidia-gpucomp.so.%s" % DRIVER, "", "host")
    build_lib(
        lib, "libcudart.so.12", "", "host", real_name="libcudart.so.12.4.127"
    )  # not a driver lib
    # Leftovers of an older driver in another directory the cache also lists.
    stale_dir = root / "usr/lib64"
    build_lib(stale_dir, "libcuda.so.1", "", "stale", real_name="libcuda.so.%s" % STALE)
    with open(root / "etc/ld.so.conf", "a") as f:
        f.write("/usr/lib64\n")
    _touch(root / "usr/bin/nvidia-smi", "#!/bin/sh\n")
    _touch(root / "run/nvidia-persistenced/socket")
    ldconfig(root)
    return root


@pytest.fixture
def host(tmp_path):
    return nvidia_host(tmp_path)


def _image(tmp_path: Path, cudart: str = "") -> Path:
    root = make_root(tmp_path / "image")
    if cudart:
        build_lib(root / libdir().lstrip("/"), "libcudart.so.12", "", "image", real_name=cudart)
    ldconfig(root)
    return root


def _devices(plan):
    return sorted(d.dst for d in plan.devices)


CONTROL = ["/dev/nvidia-modeset", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidiactl"]


@needs_toolchain
def test_cuda_visible_devices_selects_devices_libraries_and_tools(tmp_path, host):
    env = {"CUDA_VISIBLE_DEVICES": "1,3", "PATH": "/usr/bin:/bin"}
    plan = gpu_plan(env, str(_image(tmp_path)), "auto", str(host))
    assert plan.info["gpu"]["vendor"] == "nvidia" and plan.info["gpu"]["driver"] == DRIVER
    assert _devices(plan) == sorted(CONTROL + ["/dev/nvidia1", "/dev/nvidia3"])
    assert all(d.src == str(host) + d.dst for d in plan.devices)
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert plan.env_defaults["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    binds = {b.dst: b.src for b in plan.binds}
    lib = str(host) + libdir()
    assert binds[LIB_DIR + "/libcuda.so.1"] == lib + "/libcuda.so." + DRIVER
    assert binds[LIB_DIR + "/libcuda.so"] == lib + "/libcuda.so." + DRIVER
    assert binds[LIB_DIR + "/libnvidia-ml.so.1"] == lib + "/libnvidia-ml.so." + DRIVER
    assert (
        binds[LIB_DIR + "/libnvidia-gpucomp.so." + DRIVER]
        == lib + "/libnvidia-gpucomp.so." + DRIVER
    )
    assert not any("libcudart" in d for d in binds)  # CUDA runtime comes from the image
    assert STALE not in " ".join(binds.values())
    stale = [m for m in plan.manifest if m.action == REFUSE and STALE in m.subject]
    assert stale and "does not match the loaded driver %s" % DRIVER in stale[0].reason
    assert binds[BIN_DIR + "/nvidia-smi"] == str(host / "usr/bin/nvidia-smi")
    assert binds["/run/nvidia-persistenced/socket"] == str(host / "run/nvidia-persistenced/socket")
    assert plan.ld_library_path == [LIB_DIR] and plan.path_prefix == [BIN_DIR]
    assert plan.errors == []


@needs_toolchain
@pytest.mark.parametrize(
    "env, devices, inner",
    [
        ({"CUDA_VISIBLE_DEVICES": "3,1"}, [1, 3], "1,0"),  # order kept: app device 0 is host GPU 3
        ({"CUDA_VISIBLE_DEVICES": "2"}, [2], "0"),
        (
            {"SLURM_JOB_ID": "5", "SLURM_STEP_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "0,1"},
            [2, 3],
            None,
        ),
        (
            {"SLURM_JOB_ID": "5", "SLURM_STEP_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "2,3"},
            [2, 3],
            "0,1",
        ),
        ({"SLURM_JOB_ID": "5", "SLURM_STEP_GPUS": "1,3"}, [1, 3], None),
        ({"SLURM_JOB_ID": "5", "GPU_DEVICE_ORDINAL": "0,2"}, [0, 2], None),
        ({"CUDA_VISIBLE_DEVICES": _uuid(2)}, [2], None),  # UUIDs stay valid inside
        ({"CUDA_VISIBLE_DEVICES": ""}, [], None),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, [], None),
        ({"SLURM_JOB_ID": "5"}, [], None),  # a job step without GPUs
        ({}, [0, 1, 2, 3], None),  # outside any batch job: the whole node
    ],
)
def test_allocation_and_renumbering(tmp_path, host, env, devices, inner):
    plan = gpu_plan(env, None, "nvidia", str(host))
    assert _devices(plan) == sorted(CONTROL + ["/dev/nvidia%d" % n for n in devices])
    assert plan.env.get("CUDA_VISIBLE_DEVICES") == inner
    if "GPU_DEVICE_ORDINAL" in env:
        assert plan.env.get("GPU_DEVICE_ORDINAL") == "0,1"


@needs_toolchain
def test_mig_exposes_capabilities_and_warns(tmp_path, host):
    plan = gpu_plan({"CUDA_VISIBLE_DEVICES": "MIG-5c6d-aaaa"}, None, "nvidia", str(host))
    assert {
        "/dev/nvidia-caps/nvidia-cap1",
        "/dev/nvidia-caps/nvidia-cap2",
        "/dev/nvidia0",
        "/dev/nvidia3",
    } <= set(_devices(plan))
    assert any("cannot be mapped" in w for w in plan.warnings)
    assert "CUDA_VISIBLE_DEVICES" not in plan.env


def test_allocation_warns_on_foreign_indices():
    alloc = allocation(
        {"SLURM_STEP_GPUS": "4,5", "CUDA_VISIBLE_DEVICES": "7"},
        ("CUDA_VISIBLE_DEVICES",),
        list(range(8)),
        {},
    )
    assert alloc.devices == [4, 5] and alloc.env == {}
    assert alloc.warnings and "does not match" in alloc.warnings[0]


def test_driver_version_sources(tmp_path):
    _touch(tmp_path / "a/proc/driver/nvidia/version", NVRM_OPEN % "570.86.10")
    assert nvidia_driver_version(str(tmp_path / "a")) == "570.86.10"
    _touch(tmp_path / "b/sys/module/nvidia/version", "535.104.05\n")
    assert nvidia_driver_version(str(tmp_path / "b")) == "535.104.05"
    assert nvidia_driver_version(str(tmp_path / "c")) is None
    plan = gpu_plan({}, None, "nvidia", str(tmp_path / "c"))
    assert plan.errors and "no NVIDIA driver" in plan.errors[0]
    assert gpu_plan({}, None, "auto", str(tmp_path / "c")).devices == []


@pytest.mark.parametrize(
    "cuda, driver, verdict, words",
    [
        ((12, 4), "550.54.15", "ok", "runs on driver 550.54.15 (supports up to CUDA 12.4)"),
        ((12, 4), "550.54.14", "ok", "runs on driver"),
        ((11, 8), "550.54.15", "ok", "runs on driver"),
        ((12, 6), "550.54.15", "warning", "minor version compatibility"),
        ((12, 2), "525.60.13", "warning", "supports up to CUDA 12.0"),
        (
            (13, 0),
            "550.54.15",
            "error",
            "needs NVIDIA driver >= 580.65.06; this node's driver 550.54.15",
        ),
        ((12, 0), "470.42.01", "error", "supports up to CUDA 11.4"),
        ((8, 0), "550.54.15", "ok", "older than the driver's"),  # not in the table, older
    ],
)
def test_cuda_check_table(cuda, driver, verdict, words):
    got, message = cuda_check(cuda, driver)
    assert got == verdict and words in message


def test_cuda_supported_by():
    assert cuda_supported_by("535.104.05") == (12, 2)
    assert cuda_supported_by("580.65.06") == (13, 0)
    assert cuda_supported_by("300.1") is None


@needs_toolchain
def test_cuda_check_reads_the_image(tmp_path, host):
    plan = gpu_plan({}, str(_image(tmp_path, "libcudart.so.12.4.127")), "nvidia", str(host))
    assert plan.info["gpu"]["image_cuda"] == "12.4" and not plan.errors and not plan.warnings
    bare = _image(tmp_path / "b")
    newer = gpu_plan({}, str(bare), "nvidia", str(host), image_env={"CUDA_VERSION": "12.6.3"})
    assert newer.warnings and "CUDA_VERSION=12.6.3" in newer.warnings[0]
    strict = {"gpu": {"cuda_check": "error"}}
    too_new = gpu_plan(
        {},
        str(bare),
        "nvidia",
        str(host),
        policy=strict,
        image_env={"NVIDIA_REQUIRE_CUDA": "cuda>=13.0 brand=tesla,driver>=535"},
    )
    assert too_new.errors and "image CUDA 13.0 needs NVIDIA driver" in too_new.errors[0]
    relaxed = gpu_plan({}, str(bare), "nvidia", str(host), image_env={"CUDA_VERSION": "13.0"})
    assert not relaxed.errors and "needs NVIDIA driver" in relaxed.warnings[0]  # default: warn
    ignored = gpu_plan(
        {},
        str(bare),
        "nvidia",
        str(host),
        image_env={"CUDA_VERSION": "13.0"},
        policy={"gpu": {"cuda_check": "ignore"}},
    )
    assert not ignored.errors and not ignored.warnings


@needs_toolchain
def test_driver_library_needing_newer_glibc_is_refused(tmp_path):
    host = nvidia_host(tmp_path, libc_stub=True)
    plan = gpu_plan({"CUDA_VISIBLE_DEVICES": "0"}, str(_image(tmp_path)), "nvidia", str(host))
    assert not any(b.dst.startswith(LIB_DIR + "/libcuda.so") for b in plan.binds)
    assert any(
        "libcuda.so.1 cannot run in this image" in e and "GLIBC_2.99" in e for e in plan.errors
    )
    assert LIB_DIR + "/libnvidia-ml.so.1" in {b.dst for b in plan.binds}


@needs_toolchain
def test_non_glibc_image_gets_devices_only(tmp_path, host):
    image = make_root(tmp_path / "musl", glibc=False)
    plan = gpu_plan({"CUDA_VISIBLE_DEVICES": "0"}, str(image), "nvidia", str(host))
    assert "/dev/nvidia0" in _devices(plan)
    assert plan.binds == [b for b in plan.binds if not b.dst.startswith((LIB_DIR, BIN_DIR))]
    assert any("no glibc" in w for w in plan.warnings)


# -- AMD ----------------------------------------------------------------------------------------

# card -> (PCI address, vendor); card0 is the BMC's VGA, not an AMD GPU.
AMD_CARDS = {
    0: ("0000:03:00.0", "0x1a03"),
    1: ("0000:c1:00.0", "0x1002"),
    2: ("0000:41:00.0", "0x1002"),
    3: ("0000:81:00.0", "0x1002"),
    4: ("0000:01:00.0", "0x1002"),
}


def amd_host(tmp_path: Path, by_path: bool = True) -> Path:
    root = make_root(tmp_path / "amd", glibc=False)
    _touch(root / "dev/kfd")
    for card, (pci, vendor) in AMD_CARDS.items():
        _touch(root / ("dev/dri/card%d" % card))
        _touch(root / ("dev/dri/renderD%d" % (128 + card)))
        _touch(root / ("sys/class/drm/card%d/device/vendor" % card), vendor + "\n")
        if by_path:
            links = root / "dev/dri/by-path"
            links.mkdir(parents=True, exist_ok=True)
            (links / ("pci-%s-card" % pci)).symlink_to("../card%d" % card)
            (links / ("pci-%s-render" % pci)).symlink_to("../renderD%d" % (128 + card))
    lib = root / libdir().lstrip("/")
    build_lib(lib, "libdrm.so.2", "4.0", "host")
    build_lib(lib, "libdrm_amdgpu.so.1", "0.0", "host")
    build_lib(lib, "libnuma.so.1", "0.0", "host")
    build_lib(lib, "libhsa-runtime64.so.1", "12.0", "host")  # ROCm user space: never injected
    ldconfig(root)
    return root


@needs_toolchain
def test_amd_devices_in_pci_order(tmp_path):
    root = amd_host(tmp_path)
    # PCI order of the AMD GPUs: 01 (card4), 41 (card2), 81 (card3), c1 (card1).
    assert [c for c, _ in amd_gpus(str(root))] == [
        "/dev/dri/card4",
        "/dev/dri/card2",
        "/dev/dri/card3",
        "/dev/dri/card1",
    ]
    plan = gpu_plan(
        {"ROCR_VISIBLE_DEVICES": "1,2", "SLURM_JOB_ID": "3"},
        str(_image(tmp_path)),
        "auto",
        str(root),
    )
    assert plan.info["gpu"]["vendor"] == "amd"
    assert _devices(plan) == [
        "/dev/dri/card2",
        "/dev/dri/card3",
        "/dev/dri/renderD130",
        "/dev/dri/renderD131",
        "/dev/kfd",
    ]
    assert plan.env["ROCR_VISIBLE_DEVICES"] == "0,1"
    bound = {os.path.basename(b.dst) for b in plan.binds}
    assert bound == {"libdrm.so.2", "libdrm_amdgpu.so.1", "libnuma.so.1"}


@needs_toolchain
def test_amd_without_by_path_and_hip_variable(tmp_path):
    root = amd_host(tmp_path, by_path=False)
    # Without by-path, card numbers give the order; the BMC card0 is still filtered by vendor.
    assert [c for c, _ in amd_gpus(str(root))][:2] == ["/dev/dri/card1", "/dev/dri/card2"]
    plan = gpu_plan({"HIP_VISIBLE_DEVICES": "3"}, None, "amd", str(root))
    assert _devices(plan) == ["/dev/dri/card4", "/dev/dri/renderD132", "/dev/kfd"]
    assert plan.env["HIP_VISIBLE_DEVICES"] == "0"
    missing = gpu_plan({}, None, "amd", str(tmp_path / "none"))
    assert missing.errors and "/dev/kfd" in missing.errors[0]
