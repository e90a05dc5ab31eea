"""The ELF reader against real system libraries and libraries built here, cross-checked with
readelf (binutils) wherever it is installed."""

import os
import re
import shutil
import subprocess

import pytest

from uctr_batch.inject import elf

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
LIBMPI = "/usr/lib/x86_64-linux-gnu/libmpi.so.40"

needs_readelf = pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed")
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")


def _readelf_dynamic(path):
    out = subprocess.run(
        ["readelf", "-dW", path], capture_output=True, text=True, check=True
    ).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.*?)\]", out)
    soname = re.findall(r"\(SONAME\)\s+Library soname: \[(.*?)\]", out)
    runpath = re.findall(r"\(RUNPATH\)\s+Library runpath: \[(.*?)\]", out)
    return needed, (soname[0] if soname else None), runpath


def _readelf_verneed(path):
    """{file: [versions]} from readelf -V."""
    out = subprocess.run(
        ["readelf", "-VW", path], capture_output=True, text=True, check=True
    ).stdout
    section = out.split("Version needs section", 1)
    result = {}
    if len(section) < 2:
        return result
    current = None
    for line in section[1].splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            current = m.group(1)
            result[current] = []
            continue
        m = re.search(r"Name: (\S+)", line)
        if m and current:
            result[current].append(m.group(1))
    return result


@pytest.mark.skipif(not os.path.exists(LIBC), reason="no Debian multiarch libc")
def test_libc_defines_its_own_glibc_version():
    info = elf.read_elf(LIBC)
    running = os.confstr("CS_GNU_LIBC_VERSION").split()[1]  # e.g. "2.36" on Debian 12
    assert "GLIBC_" + running in info.verdef
    assert elf.version_text(info.glibc_defined()) == running
    assert info.soname == "libc.so.6"
    assert info.arch == os.uname().machine.replace("_", "-")
    assert "GLIBC_PRIVATE" in info.verdef  # defined, but never counted as a version
    assert info.glibc_defined() == max(
        elf.glibc_version(v) for v in info.verdef if elf.glibc_version(v)
    )


@needs_readelf
@pytest.mark.skipif(not os.path.exists(LIBMPI), reason="Open MPI not installed")
def test_libmpi_dynamic_section_matches_readelf():
    info = elf.read_elf(LIBMPI)
    needed, soname, runpath = _readelf_dynamic(LIBMPI)
    assert list(info.needed) == needed
    assert info.soname == soname == "libmpi.so.40"
    assert list(info.runpath) == [p for r in runpath for p in r.split(":")]
    verneed = _readelf_verneed(LIBMPI)
    assert {k: sorted(v) for k, v in info.verneed.items()} == {
        k: sorted(v) for k, v in verneed.items()
    }
    assert info.glibc_needed() == max(
        elf.glibc_version(v) for vs in verneed.values() for v in vs if elf.glibc_version(v)
    )


@needs_readelf
def test_python_interpreter_matches_readelf():
    path = os.path.realpath("/usr/bin/python3")
    info = elf.read_elf(path)
    needed, soname, _ = _readelf_dynamic(path)
    assert list(info.needed) == needed
    assert info.interp and info.interp.startswith("/lib")
    assert not info.is_static


@pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="busybox-static not installed")
def test_static_busybox_is_static():
    info = elf.read_elf("/bin/busybox")
    assert info.is_static
    assert info.needed == ()
    assert info.glibc_needed() is None


@needs_gcc
def test_built_library_soname_runpath_and_needed(tmp_path):
    src = tmp_path / "a.c"
    src.write_text("int uctr_answer(void) { return 42; }\n")
    lib = tmp_path / "libanswer.so.3.1.4"
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-o",
            str(lib),
            str(src),
            "-Wl,-soname,libanswer.so.3",
            "-Wl,-rpath,$ORIGIN/../lib:/opt/x",
            "-Wl,--enable-new-dtags",
            "-Wl,--no-as-needed",
            "-lm",
        ],
        check=True,
    )
    info = elf.read_elf(str(lib))
    assert info.soname == "libanswer.so.3"
    assert info.runpath == ("$ORIGIN/../lib", "/opt/x")
    assert info.rpath == ()
    assert "libm.so.6" in info.needed and "libc.so.6" in info.needed
    assert info.type == elf.ET_DYN


def test_not_elf_and_truncated(tmp_path):
    text = tmp_path / "script.sh"
    text.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(elf.ElfError):
        elf.read_elf(str(text))
    assert not elf.is_elf(str(text))
    truncated = tmp_path / "trunc.so"
    truncated.write_bytes(open(os.path.realpath("/usr/bin/python3"), "rb").read(40))
    with pytest.raises(elf.ElfError):
        elf.read_elf(str(truncated))
    with pytest.raises(elf.ElfError):
        elf.read_elf(str(tmp_path / "missing.so"))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("GLIBC_2.36", (2, 36)),
        ("GLIBC_2.2.5", (2, 2, 5)),
        ("GLIBC_PRIVATE", None),
        ("GLIBCXX_3.4.30", None),
        ("GLIBC_ABI_DT_RELR", None),
    ],
)
def test_glibc_version_names(name, expected):
    assert elf.glibc_version(name) == expected
