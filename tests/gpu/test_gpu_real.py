"""GPU injection on a node with a real NVIDIA GPU: nvidia-smi and a CUDA driver-API program
run inside a container made of a minimal glibc root plus exactly what gpu_plan lists.
Skipped where there is no /dev/nvidiactl and nvidia-smi (no GPU on this machine)."""

import os
import re
import shutil
import subprocess

import pytest

from tests.unit.inject_util import GCC, ldconfig, make_root, needs_toolchain, run_in
from uctr_batch.inject import gpu_plan

NVIDIA_SMI = shutil.which("nvidia-smi")
BWRAP = shutil.which("bwrap")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (os.path.exists("/dev/nvidiactl") and NVIDIA_SMI),
        reason="no NVIDIA GPU here (needs /dev/nvidiactl and nvidia-smi)",
    ),
    pytest.mark.skipif(BWRAP is None, reason="bubblewrap not installed"),
]

# The CUDA driver API through dlopen: no CUDA toolkit needed to build it.
CUDA_SAMPLE = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
typedef int (*fn)();
int main(void) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW);
    if (!h) { printf("dlopen: %s\n", dlerror()); return 2; }
    fn cuInit = (fn)dlsym(h, "cuInit"), count = (fn)dlsym(h, "cuDeviceGetCount");
    fn get = (fn)dlsym(h, "cuDeviceGet"), name = (fn)dlsym(h, "cuDeviceGetName");
    fn ctx = (fn)dlsym(h, "cuCtxCreate_v2"), alloc = (fn)dlsym(h, "cuMemAlloc_v2");
    fn htod = (fn)dlsym(h, "cuMemcpyHtoD_v2"), dtoh = (fn)dlsym(h, "cuMemcpyDtoH_v2");
    int n = 0, dev = 0, rc;
    if ((rc = cuInit(0))) { printf("cuInit %d\n", rc); return 3; }
    count(&n);
    printf("devices=%d\n", n);
    for (int i = 0; i < n; i++) {
        char s[256];
        get(&dev, i);
        name(s, (int)sizeof s, dev);
        printf("name=%s\n", s);
    }
    void *c; unsigned long long p; char in[64] = "uctr round trip", out[64] = {0};
    get(&dev, 0);
    if ((rc = ctx(&c, 0, dev)) || (rc = alloc(&p, sizeof in)) || (rc = htod(p, in, sizeof in))
        || (rc = dtoh(out, p, sizeof out))) { printf("cuda error %d\n", rc); return 4; }
    printf("copy=%s\n", strcmp(in, out) ? "bad" : "ok");
    return 0;
}
"""


def _gpus_on_host():
    out = subprocess.run([NVIDIA_SMI, "-L"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.startswith("GPU ")]


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    if GCC is None:
        pytest.skip("gcc not installed")
    root = make_root(tmp_path_factory.mktemp("gpu") / "rootfs")
    src = root.parent / "sample.c"
    src.write_text(CUDA_SAMPLE)
    subprocess.run([GCC, "-o", str(root / "usr/bin/cuda_sample"), str(src), "-ldl"], check=True)
    ldconfig(root)
    return root


@needs_toolchain
def test_nvidia_smi_inside_sees_only_the_allocated_gpu(rootfs):
    host_gpus = _gpus_on_host()
    env = {"CUDA_VISIBLE_DEVICES": str(len(host_gpus) - 1), "PATH": os.environ.get("PATH", "")}
    plan = gpu_plan(env, str(rootfs), "nvidia")
    assert plan.errors == [], plan.errors
    smi_driver = subprocess.run(
        [NVIDIA_SMI, "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    assert plan.info["gpu"]["driver"] == smi_driver
    result = run_in(rootfs, plan, ["nvidia-smi", "-L"])
    assert result.returncode == 0, result.stderr
    inside = [line for line in result.stdout.splitlines() if line.startswith("GPU ")]
    assert len(inside) == 1
    # The one GPU inside is the host's last one (same UUID).
    uuid = re.search(r"UUID: (\S+)\)", inside[0]).group(1)
    assert uuid in host_gpus[-1]


@needs_toolchain
def test_cuda_sample_runs_on_the_injected_driver(rootfs):
    plan = gpu_plan({"CUDA_VISIBLE_DEVICES": "0"}, str(rootfs), "nvidia")
    result = run_in(rootfs, plan, ["/usr/bin/cuda_sample"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "devices=1" in result.stdout and "copy=ok" in result.stdout
    # Without the plan's devices and libraries the same program cannot reach the GPU.
    bare = run_in(rootfs, type(plan)(), ["/usr/bin/cuda_sample"])
    assert bare.returncode != 0
