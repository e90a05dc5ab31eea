"""GPU injection: devices, driver libraries and tools of the host GPU driver.

NVIDIA: /dev/nvidiactl, nvidia-uvm, nvidia-uvm-tools, nvidia-modeset and only the allocated
/dev/nvidiaN (plus /dev/nvidia-caps/* for MIG); the driver's user-space libraries from the host
ld cache, keeping only files whose version suffix equals the loaded kernel module's version and
whose ELF machine matches; nvidia-smi and friends; the persistenced/fabricmanager sockets; the
allocation's CUDA_VISIBLE_DEVICES renumbered for the inside; the image's CUDA runtime checked
against the driver. AMD: /dev/kfd plus cardN/renderD* of the allocated GPUs, and only libdrm,
libdrm_amdgpu and libnuma (the ROCm user space comes from the image: apptainer#1621).

Device numbering assumption (documented in docs/injection.md): host GPU index N is
/dev/nvidiaN, i.e. PCI bus order, which is what nvidia-smi, NVML and Slurm's gres use. Inside,
only the allocated GPUs exist and CUDA enumerates them in that same order, so the inner index
of a GPU is its rank among the allocated ones. CUDA_DEVICE_ORDER=PCI_BUS_ID is set by default
so CUDA's enumeration follows PCI order too.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import glob
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from uctr_batch.errors import ConfigError
from uctr_batch.inject import fsroot, policyview
from uctr_batch.inject.libroot import Lib, LibRoot, so_version, version_problems
from uctr_batch.inject.plan import BIN_DIR, INFO, LIB_DIR, REFUSE, InjectionPlan

C = "gpu"

NVIDIA_CONTROL_DEVICES = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)
NVIDIA_LIBS = (
    "libcuda.so",
    "libcudadebugger.so",
    "libnvidia-ml.so",
    "libnvidia-cfg.so",
    "libnvidia-nscq.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-gpucomp.so",
    "libnvidia-nvvm.so",
    "libnvidia-opencl.so",
    "libnvidia-allocator.so",
    "libnvidia-pkcs11.so",
    "libnvidia-pkcs11-openssl3.so",
    "libnvidia-tileiras.so",
    "libnvidia-fatbinaryloader.so",  # old drivers
    "libnvidia-compiler.so",  # old drivers
)
NVIDIA_BINS = (
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
)
NVIDIA_SOCKETS = (
    "/run/nvidia-persistenced/socket",
    "/var/run/nvidia-persistenced/socket",
    "/run/nvidia-fabricmanager/socket",
    "/var/run/nvidia-fabricmanager/socket",
)
AMD_LIBS = ("libdrm.so", "libdrm_amdgpu.so", "libnuma.so")
AMD_BINS = ("rocm-smi", "rocminfo")
AMD_VENDOR = "0x1002"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Minimum Linux driver per CUDA toolkit release (CUDA release notes, "CUDA Toolkit and
# Corresponding Driver Versions", GA releases).
CUDA_MIN_DRIVER: tuple[tuple[tuple[int, int], str], ...] = (
    ((13, 0), "580.65.06"),
    ((12, 9), "575.51.03"),
    ((12, 8), "570.26"),
    ((12, 6), "560.28.03"),
    ((12, 5), "555.42.02"),
    ((12, 4), "550.54.14"),
    ((12, 3), "545.23.06"),
    ((12, 2), "535.54.03"),
    ((12, 1), "530.30.02"),
    ((12, 0), "525.60.13"),
    ((11, 8), "520.61.05"),
    ((11, 7), "515.43.04"),
    ((11, 6), "510.39.01"),
    ((11, 5), "495.29.05"),
    ((11, 4), "470.42.01"),
    ((11, 3), "465.19.01"),
    ((11, 2), "460.27.03"),
    ((11, 1), "455.23"),
    ((11, 0), "450.36.06"),
    ((10, 2), "440.33"),
    ((10, 1), "418.39"),
    ((10, 0), "410.48"),
    ((9, 2), "396.26"),
    ((9, 1), "390.46"),
    ((9, 0), "384.81"),
)
# CUDA minor version compatibility: any 11.x (12.x, 13.x) runtime runs on at least this driver,
# without PTX JIT of newer PTX.
CUDA_MINOR_COMPAT: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}

_NVRM = re.compile(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)")
_INT_LIST = re.compile(r"^\d+(,\d+)*$")
_NO_DEVICES = ("", "none", "NoDevFiles", "void", "-1")


def _read(host_root: str, inside: str) -> str | None:
    try:
        with open(fsroot.outside(host_root, inside)) as f:
            return f.read()
    except OSError:
        return None


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


# -- allocation -----------------------------------------------------------------------------


@dataclass
class Allocation:
    source: str  # the variable the device list came from, or a sentence
    devices: list[int]  # host GPU indices to expose
    env: dict[str, str] = field(default_factory=dict)  # renumbered variables for the inside
    all_gpus: bool = False
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _parse_ids(value: str) -> list[str] | None:
    value = value.strip()
    if value in _NO_DEVICES:
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def allocation(
    env: Mapping[str, str],
    visible_vars: Sequence[str],
    host_gpus: Sequence[int],
    uuids: Mapping[str, int],
) -> Allocation:
    """Which host GPUs this rank owns, and the inner values of its visibility variables.

    The device list comes from SLURM_STEP_GPUS (SLURM_JOB_GPUS) when set, since those name
    host GPUs even when the cgroup-relative CUDA_VISIBLE_DEVICES does not; otherwise from the
    first of visible_vars present. UUIDs are mapped through the driver's /proc information;
    an unmappable one (MIG, or no /proc) exposes all GPUs with a warning and leaves the
    variable as it is (UUIDs stay valid inside)."""
    step_var = next((v for v in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS") if env.get(v)), None)
    step = None
    if step_var and _INT_LIST.match(env[step_var].strip()):
        step = [int(x) for x in env[step_var].split(",")]
    first = next((v for v in visible_vars if v in env), None)
    if step is not None:
        alloc = Allocation(step_var, sorted(set(step)))
    elif first is not None:
        alloc = _from_visible(first, env[first], host_gpus, uuids)
    elif env.get("SLURM_JOB_ID") or env.get("PBS_JOBID"):
        alloc = Allocation("no GPU allocated to this job step", [])
    else:
        alloc = Allocation(
            "no allocation variable outside a batch job: all GPUs", list(host_gpus), all_gpus=True
        )
    for var in visible_vars:
        if var in env:
            _renumber(alloc, var, env[var], step is not None)
    return alloc


def _from_visible(
    var: str, value: str, host_gpus: Sequence[int], uuids: Mapping[str, int]
) -> Allocation:
    ids = _parse_ids(value)
    if ids is None or ids == []:
        return Allocation("%s=%s" % (var, value), [])
    devices: list[int] = []
    for item in ids:
        if item.isdigit():
            devices.append(int(item))
        elif item in uuids:
            devices.append(uuids[item])
        else:
            alloc = Allocation("%s=%s" % (var, value), list(host_gpus), all_gpus=True)
            alloc.warnings.append(
                "%s names %s, which cannot be mapped to a device node here; all %d GPUs of the "
                "node are exposed and %s still restricts what CUDA uses"
                % (var, item, len(host_gpus), var)
            )
            return alloc
    return Allocation(var, sorted(set(devices)))


def _renumber(alloc: Allocation, var: str, value: str, from_step: bool) -> None:
    """Inner value of var: a host index becomes its rank among the exposed GPUs (order kept:
    host "3,1" -> "1,0"); relative (cgroup) indices and UUIDs are kept."""
    ids = _parse_ids(value)
    if not ids or not all(i.isdigit() for i in ids) or alloc.all_gpus:
        return
    values = [int(i) for i in ids]
    exposed = sorted(alloc.devices)
    host_ids = set(values) <= set(exposed)
    relative = all(v < len(exposed) for v in values)
    if from_step and relative and set(values) != set(exposed):
        return  # cgroup-relative numbering: already right inside
    if host_ids:
        inner = ",".join(str(exposed.index(v)) for v in values)
        if inner != value:
            alloc.env[var] = inner
            alloc.notes.append("%s=%s renumbered to %s inside" % (var, value, inner))
        return
    if not relative:
        alloc.warnings.append(
            "%s=%s does not match the allocated GPUs %s; left as is"
            % (var, value, ",".join(map(str, exposed)))
        )


# -- NVIDIA ---------------------------------------------------------------------------------


def nvidia_driver_version(host_root: str = "/") -> str | None:
    """The loaded kernel module's version, e.g. '550.54.15'."""
    text = _read(host_root, "/proc/driver/nvidia/version")
    if text:
        m = _NVRM.search(text)
        if m:
            return m.group(1)
    text = _read(host_root, "/sys/module/nvidia/version")
    if text and text.strip():
        return text.strip()
    return None


def nvidia_gpus(host_root: str = "/") -> list[int]:
    out = []
    for path in glob.glob(fsroot.outside(host_root, "/dev/nvidia[0-9]*")):
        name = os.path.basename(path)[len("nvidia") :]
        if name.isdigit():
            out.append(int(name))
    return sorted(out)


def nvidia_uuids(host_root: str = "/") -> dict[str, int]:
    """GPU UUID -> device minor, from /proc/driver/nvidia/gpus/*/information."""
    out = {}
    for path in glob.glob(fsroot.outside(host_root, "/proc/driver/nvidia/gpus/*/information")):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        uuid = re.search(r"GPU UUID:\s*(\S+)", text)
        minor = re.search(r"Device Minor:\s*(\d+)", text)
        if uuid and minor:
            out[uuid.group(1)] = int(minor.group(1))
    return out


def cuda_supported_by(driver: str) -> tuple[int, int] | None:
    """The newest CUDA release whose minimum driver is <= driver ('550.54.15')."""
    have = _version_tuple(driver)
    for cuda, minimum in CUDA_MIN_DRIVER:
        if have >= _version_tuple(minimum):
            return cuda
    return None


def cuda_check(image_cuda: tuple[int, int], driver: str) -> tuple[str, str]:
    """('ok'|'warning'|'error', message) for an image CUDA runtime on a host driver."""
    have = _version_tuple(driver)
    supported = cuda_supported_by(driver)
    can = "supports up to CUDA %d.%d" % supported if supported else "supports no known CUDA release"
    need = dict(CUDA_MIN_DRIVER).get(tuple(image_cuda))
    ctext = "%d.%d" % tuple(image_cuda)
    if need is not None and have >= _version_tuple(need):
        return "ok", "image CUDA %s runs on driver %s (%s)" % (ctext, driver, can)
    if need is None and supported and tuple(image_cuda) <= supported:
        return "ok", "image CUDA %s is older than the driver's (%s)" % (ctext, can)
    compat = CUDA_MINOR_COMPAT.get(image_cuda[0])
    if compat and have >= _version_tuple(compat):
        return "warning", (
            "image CUDA %s is newer than driver %s (%s): it runs under CUDA minor version "
            "compatibility, but PTX built for the newer release will not JIT" % (ctext, driver, can)
        )
    return "error", (
        "image CUDA %s needs NVIDIA driver >= %s; this node's driver %s %s"
        % (ctext, need or "a newer one", driver, can)
    )


def image_cuda_version(
    image: LibRoot, image_env: Mapping[str, str]
) -> tuple[tuple[int, int], str] | None:
    """The image's CUDA runtime (major, minor) and where it was read."""
    for lib in image.cached(lambda n: n.startswith("libcudart.so.")):
        v = so_version(posixpath.basename(lib.real))
        if len(v) >= 2:
            return (v[0], v[1]), lib.real
    for key in ("CUDA_VERSION", "NV_CUDA_CUDART_VERSION"):
        v = _version_tuple(image_env.get(key, ""))
        if len(v) >= 2:
            return (v[0], v[1]), "%s=%s" % (key, image_env[key])
    m = re.search(r"cuda>=(\d+)\.(\d+)", image_env.get("NVIDIA_REQUIRE_CUDA", ""))
    if m:
        return (int(m.group(1)), int(m.group(2))), "NVIDIA_REQUIRE_CUDA"
    return None


def _nvidia(plan: InjectionPlan, env, host_root, image, image_env, policy, libs: bool) -> None:
    driver = nvidia_driver_version(host_root)
    if driver is None:
        plan.error(C, "no NVIDIA driver is loaded on this node (no /proc/driver/nvidia/version)")
        return
    info = plan.info.setdefault(C, {})
    info.update(vendor="nvidia", driver=driver)
    for dev in NVIDIA_CONTROL_DEVICES:
        if fsroot.exists(host_root, dev):
            plan.add_device(C, fsroot.outside(host_root, dev), dev, "NVIDIA control device")
        elif dev == "/dev/nvidia-uvm":
            plan.warn(
                C,
                "/dev/nvidia-uvm is missing (nvidia_uvm not loaded): CUDA fails with "
                "CUDA_ERROR_UNKNOWN",
            )
    alloc = allocation(
        env,
        ("CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL"),
        nvidia_gpus(host_root),
        nvidia_uuids(host_root),
    )
    _apply_allocation(plan, alloc, ["/dev/nvidia%d" % n for n in alloc.devices], host_root)
    if any(v.startswith("MIG-") for v in (_parse_ids(env.get("CUDA_VISIBLE_DEVICES", "")) or [])):
        for cap in sorted(glob.glob(fsroot.outside(host_root, "/dev/nvidia-caps/*"))):
            inside = "/dev/nvidia-caps/" + os.path.basename(cap)
            plan.add_device(C, cap, inside, "MIG capability")
    if "CUDA_DEVICE_ORDER" not in env:
        plan.env_defaults["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if libs:
        _driver_libs(plan, LibRoot(host_root), image, NVIDIA_LIBS, driver, critical="libcuda.so")
        _tools(plan, host_root, env, NVIDIA_BINS)
    for sock in NVIDIA_SOCKETS:
        if fsroot.exists(host_root, sock):
            real = fsroot.resolve(host_root, sock)
            plan.add_bind(
                C,
                fsroot.outside(host_root, real),
                real,
                ro=False,
                kind="file",
                reason="NVIDIA daemon socket",
            )
    _cuda_check(plan, image, image_env, driver, policy)


def _cuda_check(plan, image, image_env, driver, policy) -> None:
    mode = policyview.setting(policy, "gpu", "cuda_check", "warn")  # warn | error | ignore
    if mode == "ignore" or image is None:
        return
    found = image_cuda_version(image, image_env or {})
    if found is None:
        plan.record(C, INFO, "cuda", "the image's CUDA runtime version is unknown; not checked")
        return
    (cuda, source) = found
    plan.info[C]["image_cuda"] = "%d.%d" % cuda
    verdict, message = cuda_check(cuda, driver)
    message += " [%s]" % source
    if verdict == "ok":
        plan.record(C, INFO, "cuda", message)
    elif verdict == "warning" or mode != "error":
        plan.warn(C, message)
    else:
        plan.error(C, message)


# -- AMD ------------------------------------------------------------------------------------


def amd_gpus(host_root: str = "/") -> list[tuple[str, str | None]]:
    """(card, render) inside paths of the AMD GPUs in ROCm order: by PCI address through
    /dev/dri/by-path when present, else by card number with renderD(128+N)."""
    by_path = fsroot.outside(host_root, "/dev/dri/by-path")
    out: list[tuple[str, str | None]] = []
    if os.path.isdir(by_path):
        for name in sorted(os.listdir(by_path)):
            if not name.endswith("-card"):
                continue
            card = os.path.basename(os.readlink(os.path.join(by_path, name)))
            render_link = os.path.join(by_path, name[: -len("card")] + "render")
            render = (
                os.path.basename(os.readlink(render_link)) if os.path.islink(render_link) else None
            )
            out.append(("/dev/dri/" + card, "/dev/dri/" + render if render else None))
    else:
        cards = []
        for path in glob.glob(fsroot.outside(host_root, "/dev/dri/card[0-9]*")):
            n = os.path.basename(path)[4:]
            if n.isdigit():
                cards.append(int(n))
        for n in sorted(cards):
            render = "/dev/dri/renderD%d" % (128 + n)
            out.append(
                ("/dev/dri/card%d" % n, render if fsroot.exists(host_root, render) else None)
            )
    return [(c, r) for c, r in out if _is_amd(host_root, c)]


def _is_amd(host_root: str, card: str) -> bool:
    vendor = _read(host_root, "/sys/class/drm/%s/device/vendor" % posixpath.basename(card))
    return vendor is None or vendor.strip() == AMD_VENDOR


def _amd(plan: InjectionPlan, env, host_root, image, libs: bool) -> None:
    if not fsroot.exists(host_root, "/dev/kfd"):
        plan.error(C, "no AMD GPU driver on this node (/dev/kfd missing)")
        return
    plan.info.setdefault(C, {})["vendor"] = "amd"
    plan.add_device(
        C, fsroot.outside(host_root, "/dev/kfd"), "/dev/kfd", "AMD kernel fusion driver"
    )
    gpus = amd_gpus(host_root)
    alloc = allocation(
        env,
        ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL"),
        list(range(len(gpus))),
        {},
    )
    nodes = []
    for index in alloc.devices:
        if index >= len(gpus):
            plan.warn(
                C, "GPU %d is allocated but the node has only %d AMD GPUs" % (index, len(gpus))
            )
            continue
        card, render = gpus[index]
        nodes.append(card)
        if render:
            nodes.append(render)
    _apply_allocation(plan, alloc, nodes, host_root)
    if libs:
        _driver_libs(plan, LibRoot(host_root), image, AMD_LIBS, None, critical=None)
        _tools(plan, host_root, env, AMD_BINS)


# -- shared -------------------------------------------------------------------------------


def _apply_allocation(
    plan: InjectionPlan, alloc: Allocation, nodes: list[str], host_root: str
) -> None:
    plan.info.setdefault(C, {})["allocation"] = {"source": alloc.source, "gpus": alloc.devices}
    plan.record(C, INFO, "allocation", "%s -> GPUs %s" % (alloc.source, alloc.devices or "none"))
    for node in nodes:
        if fsroot.exists(host_root, node):
            plan.add_device(C, fsroot.outside(host_root, node), node, "allocated GPU")
        else:
            plan.warn(C, "allocated GPU device %s does not exist on this node" % node)
    plan.env.update(alloc.env)
    for note in alloc.notes:
        plan.record(C, INFO, "env", note)
    for w in alloc.warnings:
        plan.warn(C, w)


def _driver_libs(
    plan: InjectionPlan,
    host: LibRoot,
    image: LibRoot | None,
    names: Sequence[str],
    driver: str | None,
    critical: str | None,
) -> None:
    """Bind host driver libraries into LIB_DIR under every ld-cache name they have."""
    glibc = image.glibc() if image is not None else None
    for base in names:
        for entry_name, lib, problem in _candidates(host, base, driver):
            if problem:
                plan.record(C, REFUSE, host.outside(lib.real), problem)
                continue
            if glibc is not None:
                problems = version_problems(host, lib, image, glibc)
                if problems:
                    reason = "; ".join(problems)
                    plan.record(C, REFUSE, host.outside(lib.real), reason)
                    if base == critical:
                        plan.error(C, "%s cannot run in this image: %s" % (entry_name, reason))
                    continue
            plan.prepend_library_dir(LIB_DIR)
            plan.add_bind(
                C,
                host.outside(lib.real),
                posixpath.join(LIB_DIR, entry_name),
                True,
                "file",
                "driver library" + (" %s" % driver if driver else ""),
            )


def _candidates(host: LibRoot, base: str, driver: str | None) -> list[tuple[str, Lib, str]]:
    """(cache name, library, refusal reason or '') for the cache entries of one library."""
    out = []
    for lib in host.cached(lambda n: n == base or n.startswith(base + ".")):
        real_name = posixpath.basename(lib.real)
        info = host.elf(lib.real)
        if info is None or info.arch != host.machine or info.elf_class != 64:
            out.append((lib.name, lib, "not a 64-bit %s ELF library" % host.machine))
        elif driver and not real_name.endswith("." + driver):
            out.append(
                (lib.name, lib, "%s does not match the loaded driver %s" % (real_name, driver))
            )
        else:
            out.append((lib.name, lib, ""))
    return out


def _tools(
    plan: InjectionPlan, host_root: str, env: Mapping[str, str], names: Sequence[str]
) -> None:
    dirs = [d for d in (env.get("PATH") or DEFAULT_PATH).split(":") if d.startswith("/")]
    for name in names:
        for d in dirs:
            inside = posixpath.join(d, name)
            real = fsroot.real_outside(host_root, inside)
            if real and os.path.isfile(real):
                plan.prepend_path_dir(BIN_DIR)
                plan.add_bind(C, real, posixpath.join(BIN_DIR, name), True, "file", "driver tool")
                break


def detect_vendor(host_root: str = "/") -> str:
    if fsroot.exists(host_root, "/dev/nvidiactl") or nvidia_driver_version(host_root):
        return "nvidia"
    if fsroot.exists(host_root, "/dev/kfd"):
        return "amd"
    return "none"


def gpu_plan(
    env: Mapping[str, str],
    rootfs: str | None = None,
    vendor: str | None = None,
    host_root: str = "/",
    image_env: Mapping[str, str] | None = None,
    policy=None,
) -> InjectionPlan:
    """Plan GPU injection for one rank. vendor: auto | nvidia | amd | none, or None for the
    policy's gpu.vendor. With rootfs the driver libraries are checked against the image's
    glibc and its CUDA runtime against the driver (policy gpu.cuda_check: warn | error |
    ignore, default warn); image_env is the image config's environment (CUDA_VERSION)."""
    plan = InjectionPlan()
    vendor = vendor or policyview.setting(policy, "gpu", "vendor", "auto")
    if vendor == "auto":
        vendor = detect_vendor(host_root)
        plan.record(C, INFO, "vendor", "detected: %s" % vendor)
    if vendor == "none":
        return plan
    if vendor not in ("nvidia", "amd"):
        raise ConfigError("unknown GPU vendor: %s" % vendor, hint="use auto, nvidia, amd or none")
    image = LibRoot(rootfs) if rootfs else None
    libs = True
    if image is not None and image.glibc() is None:
        plan.warn(
            C,
            "the image has no glibc: GPU driver libraries and tools are not injected, only devices",
        )
        libs = False
    if vendor == "nvidia":
        _nvidia(plan, env, host_root, image, image_env, policy, libs)
    else:
        _amd(plan, env, host_root, image, libs)
    return plan
