"""Build small real roots for the injection tests: directories with ELF libraries compiled
here by gcc, a copy of this host's glibc, and an ld.so.cache written by ldconfig -r."""

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Optional, Sequence

import pytest

GCC = shutil.which("gcc")
LDCONFIG = shutil.which("ldconfig") or (
    "/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None
)
needs_toolchain = pytest.mark.skipif(
    GCC is None or LDCONFIG is None, reason="needs gcc and ldconfig"
)


def triplet() -> str:
    return subprocess.run(
        [GCC, "-dumpmachine"], capture_output=True, text=True, check=True
    ).stdout.strip()


def libdir() -> str:
    """The multiarch library directory inside a Debian-like root, e.g. /usr/lib/x86_64-linux-gnu."""
    return "/usr/lib/" + triplet()


def make_root(path: Path, glibc: bool = True) -> Path:
    """A merged-/usr root (lib -> usr/lib) with the multiarch dir listed in ld.so.conf and,
    with glibc, a copy of this host's libc.so.6 and dynamic loader."""
    lib = path / libdir().lstrip("/")
    lib.mkdir(parents=True)
    (path / "usr/lib64").mkdir(parents=True)
    (path / "usr/bin").mkdir(parents=True)
    (path / "etc").mkdir(parents=True)
    (path / "lib").symlink_to("usr/lib")
    (path / "lib64").symlink_to("usr/lib64")
    (path / "bin").symlink_to("usr/bin")
    (path / "etc/ld.so.conf").write_text(libdir() + "\n")
    if glibc:
        for name in ("libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1"):
            _copy_real(host_lib(name), lib / name)
        loader = host_loader()
        if loader:
            _copy_real(loader, path / "usr/lib64" / os.path.basename(loader))
    return path


def _copy_real(src: str, dst: Path) -> None:
    try:
        os.link(os.path.realpath(src), dst)  # cheap when /tmp and /usr share a filesystem
    except OSError:
        shutil.copy(os.path.realpath(src), dst)


def host_lib(name: str) -> str:
    for d in (libdir(), "/lib/" + triplet(), "/lib64", "/usr/lib64"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise FileNotFoundError(name)


def host_loader() -> Optional[str]:
    out = (
        subprocess.run(
            ["readelf", "-lW", os.path.realpath("/usr/bin/python3")], capture_output=True, text=True
        ).stdout
        if shutil.which("readelf")
        else ""
    )
    m = re.search(r"interpreter: (\S+?)\]", out)
    return m.group(1) if m else None


def ldconfig(root: Path) -> None:
    subprocess.run([LDCONFIG, "-r", str(root)], check=True, capture_output=True)


def build_lib(
    directory: Path,
    soname: str,
    version: str,
    label: str = "x",
    link: Sequence[str] = (),
    extra: Iterable[str] = (),
    symbols: str = "",
    real_name: Optional[str] = None,
) -> Path:
    """Compile directory/<soname>.<version> (libmpi.so.40 + 30.4 -> libmpi.so.40.30.4) with
    that soname, plus a symlink named soname; link: library files to put in DT_NEEDED.
    Returns the real file."""
    directory.mkdir(parents=True, exist_ok=True)
    linker = soname[: soname.index(".so") + 3]
    real = directory / (real_name or ("%s.%s" % (soname, version) if version else soname))
    ident = re.sub(r"\W", "_", linker)
    src = directory / (".%s.c" % ident)
    src.write_text('const char *uctr_id_%s(void) { return "%s"; }\n%s\n' % (ident, label, symbols))
    argv = (
        [
            GCC,
            "-shared",
            "-fPIC",
            "-o",
            str(real),
            str(src),
            "-Wl,-soname," + soname,
            "-Wl,--no-as-needed",
        ]
        + [str(x) for x in link]
        + list(extra)
    )
    subprocess.run(argv, check=True, capture_output=True)
    src.unlink()
    link_path = directory / soname
    if soname != real.name:
        if link_path.is_symlink() or link_path.exists():
            link_path.unlink()
        link_path.symlink_to(real.name)
    return real


def stub_libc(directory: Path, version: str = "GLIBC_2.99") -> Path:
    """A link-time stand-in for libc.so.6 defining `uctr_future@@version`, so a library linked
    against it records a need for `version` from libc.so.6, as if built on a newer glibc."""
    directory.mkdir(parents=True, exist_ok=True)
    src = directory / "stub.c"
    src.write_text("void uctr_future(void) {}\n")
    vmap = directory / "stub.map"
    vmap.write_text("%s { global: uctr_future; local: *; };\n" % version)
    out = directory / "libc.so.6"
    subprocess.run(
        [
            GCC,
            "-shared",
            "-fPIC",
            "-nostdlib",
            "-Wl,--version-script=" + str(vmap),
            "-Wl,-soname,libc.so.6",
            "-o",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    return out


NEEDS_FUTURE = "void uctr_future(void);\nvoid uctr_call_future(void) { uctr_future(); }\n"


def run_in(rootfs, plan, argv, timeout=120, path="/usr/local/bin:/usr/bin:/bin"):
    """Run argv in rootfs with the plan applied by bubblewrap, as a launcher would."""
    args = [
        shutil.which("bwrap") or "bwrap",
        "--bind",
        str(rootfs),
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--ro-bind",
        "/sys",
        "/sys",
        "--tmpfs",
        "/tmp",
        "--die-with-parent",
    ]
    for b in plan.binds:
        args += ["--ro-bind" if b.ro else "--bind", b.src, b.dst]
    for d in plan.devices:
        args += ["--dev-bind", d.src, d.dst]
    env = plan.apply_env({"PATH": path, "HOME": "/tmp", "LC_ALL": "C"})
    return subprocess.run(
        args + list(argv), env=env, capture_output=True, text=True, timeout=timeout
    )
