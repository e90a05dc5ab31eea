"""MPI test images: Debian bookworm minbase plus an MPI, made by mmdebstrap, cached like
the "debian" image (same cache root, recipe-hash names, lock, atomic rename).

debian-openmpi  python3-mpi4py on Debian's Open MPI 4.1 (PMIx): `srun --mpi=pmix`
debian-mpich    Debian's MPICH 4.0 (ch4:ucx, simple PMI, no PMIx): `srun --mpi=pmi2`;
                Debian's mpi4py is built on Open MPI only, so this image carries a small C
                program, /usr/local/bin/mpi_hello, compiled here with mpicc.mpich.

Both carry /usr/local/bin/mpi_hello, and /etc/uctr-test-image naming the flavour: the host
is Debian 12 too, so /etc/os-release alone cannot tell the image from the host. It prints one line per rank:
    hello rank=R size=S host=H sum=N
where N is an allreduce of the ranks (a PMI mismatch shows up as size=1, never as an error).
"""

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

from .debian import (FIXED_MTIME, SUITE, _make_world_readable, _repack_without_dev, cache_root,
                     host_mirror)
from .oci import TAG, ImageConfig, Layer, LayerBuilder, LayoutWriter, MT_LAYER_GZIP

RECIPE_VERSION = "2"
MARKER = "/etc/uctr-test-image"

MPI_HELLO_C = r"""
#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {
    int rank, size, sum, len;
    char host[MPI_MAX_PROCESSOR_NAME];
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(host, &len);
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("hello rank=%d size=%d host=%s sum=%d\n", rank, size, host, sum);
    MPI_Finalize();
    return 0;
}
"""

# flavour -> (Debian packages, host mpicc that matches the image's MPI)
FLAVOURS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "debian-openmpi": (("python3-mpi4py", "openmpi-bin"), "mpicc.openmpi"),
    "debian-mpich": (("mpich", "libmpich12"), "mpicc.mpich"),
}
# Documentation and translations are dead weight in a test image.
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*",
                 "/usr/share/info/*")


def mmdebstrap_argv(output: Path, mirror: str, packages: Tuple[str, ...]) -> List[str]:
    argv = ["mmdebstrap", "--quiet", "--variant=minbase", "--format=tar",
            "--include=" + ",".join(packages)]
    argv += [f"--dpkgopt=path-exclude={pattern}" for pattern in DPKG_EXCLUDES]
    return argv + [SUITE, str(output), mirror]


def recipe_key(flavour: str, mirror: str) -> str:
    packages, mpicc = FLAVOURS[flavour]
    recipe = "\n".join([RECIPE_VERSION, " ".join(mmdebstrap_argv(Path("OUT"), mirror, packages)),
                        mpicc, MPI_HELLO_C, TAG])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def cached_mpi_layout(flavour: str) -> Path:
    """The cached layout of FLAVOUR, built first if missing (minutes: it downloads packages)."""
    if flavour not in FLAVOURS:
        raise KeyError(flavour)
    mirror = host_mirror()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    layout = root / f"{flavour}-{SUITE}-{recipe_key(flavour, mirror)}"
    if (layout / "index.json").exists():
        return layout
    with open(root / f"{flavour}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (layout / "index.json").exists():
            staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
            try:
                build_mpi_layout(flavour, staging / "layout", mirror)
                _make_world_readable(staging / "layout")
                os.rename(staging / "layout", layout)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return layout


def compile_mpi_hello(mpicc: str, dest: Path) -> bytes:
    source = dest.with_suffix(".c")
    source.write_text(MPI_HELLO_C)
    result = subprocess.run([mpicc, "-O2", "-o", str(dest), str(source)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{mpicc} failed:\n{result.stderr}")
    return dest.read_bytes()


def build_mpi_layout(flavour: str, layout: Path, mirror: str = "") -> None:
    packages, mpicc = FLAVOURS[flavour]
    mirror = mirror or host_mirror()
    with tempfile.TemporaryDirectory(prefix="uctr-mmdebstrap-") as tmp:
        rootfs_tar = Path(tmp) / "rootfs.tar"
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(FIXED_MTIME))
        result = subprocess.run(mmdebstrap_argv(rootfs_tar, mirror, packages), env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed ({result.returncode}):\n{result.stderr[-4000:]}")
        layer_file = Path(tmp) / "layer.tar.gz"
        diff_id = _repack_without_dev(rootfs_tar, layer_file)
        base = Layer(layer_file.read_bytes(), MT_LAYER_GZIP, diff_id)
        hello = compile_mpi_hello(mpicc, Path(tmp) / "mpi_hello")
    tools = LayerBuilder().dir("usr/local/bin").file("usr/local/bin/mpi_hello", hello, 0o755)
    tools.file(MARKER.lstrip("/"), f"{flavour}\n".encode())
    writer = LayoutWriter(layout)
    config = ImageConfig(cmd=["bash"], labels={"org.uctr.test": flavour})
    writer.tag(writer.add_image(config, [base, Layer.build(tools)]), TAG)
