"""F1: fakechroot. The host's libfakechroot.so is LD_PRELOADed into the container's own
dynamic loader, which runs the payload with the container's libraries:

    FAKECHROOT_BASE=ROOTFS LD_PRELOAD=libfakechroot.so LD_LIBRARY_PATH=<container lib dirs>
    FAKECHROOT_ELFLOADER=ROOTFS/<ld.so> FAKECHROOT_EXCLUDE_PATH=/proc:/sys:/dev:<bind srcs>
    ROOTFS/<ld.so> [--argv0 CMD] ROOTFS/<cmd> ARGS

libfakechroot rewrites the paths of every libc call; for child processes its execve()
wrapper starts them through FAKECHROOT_ELFLOADER again. It can only work where
  * the program is dynamically linked (a static binary never loads the preload and would
    silently see the host's files),
  * the C library is glibc (no musl build of libfakechroot here), and
  * the container's glibc is at least what the host's libfakechroot.so needs (its
    .gnu.version_r GLIBC_x.y requirements),
so probe(spec) checks all three and says which one fails.

Debian's fakechroot has no FAKECHROOT_DIR_MAP: a bind whose source and destination differ
becomes a symlink DST -> SRC in the rootfs with SRC excluded from translation. There are no
read-only binds (refused when the caller could write the source), no uid 0, and /dev is the
host's. The synthetic /etc/passwd and /etc/group are written into the rootfs (paths lead
there), never to the host's /etc.
"""

import os
import stat

from uctr_batch.errors import UctrError
from uctr_batch.modes import inroot
from uctr_batch.modes.base import (
    Mode, PayloadNotFound, ProbeResult, container_to_host, execve, register_mode,
    resolve_command, writable_ro_sources,
)

LIBFAKECHROOT_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/fakechroot/libfakechroot.so",
    "/usr/lib/aarch64-linux-gnu/fakechroot/libfakechroot.so",
    "/usr/lib/powerpc64le-linux-gnu/fakechroot/libfakechroot.so",
    "/usr/lib64/fakechroot/libfakechroot.so",
    "/usr/lib/fakechroot/libfakechroot.so",
)
# Where a glibc image keeps its libraries when ld.so.conf says nothing more.
DEFAULT_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                    "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                    "/lib64", "/usr/lib64", "/lib", "/usr/lib")
EXCLUDED = ("/proc", "/sys", "/dev")
ARGV0_GLIBC = (2, 33)  # ld.so --argv0 appeared in glibc 2.33


def find_libfakechroot():
    env = os.environ.get("UCTR_LIBFAKECHROOT")
    for path in ((env,) if env else ()) + LIBFAKECHROOT_CANDIDATES:
        if os.path.isfile(path):
            return path
    return None


@register_mode("F1")
class FakeChroot(Mode):
    summary = "fakechroot (LD_PRELOAD path translation, container's own loader)"

    def probe(self, spec=None) -> ProbeResult:
        lib = find_libfakechroot()
        if not lib:
            return ProbeResult(False, "libfakechroot.so not found (install fakechroot)")
        if spec is None:
            return ProbeResult(True, "fakechroot", _lib_version(lib))
        try:
            plan = Plan(spec, lib)
        except UctrError as e:
            return ProbeResult(False, e.message)
        return ProbeResult(True, "fakechroot, container glibc %s" % plan.glibc_text)

    def unusable_hint(self) -> str:
        return "use --mode P1 (proot works with static, musl and old-glibc images)"

    def exec(self, spec):
        self.require(spec)
        plan = Plan(spec, find_libfakechroot())
        plan.prepare_rootfs()
        try:  # through a bind: binds are symlinks to host paths here, re-rooting would miss them
            os.chdir(container_to_host(spec, spec.cwd))
        except OSError as e:
            raise UctrError("cannot change to working directory %s in the container: %s"
                            % (spec.cwd, e.strerror),
                            "give an existing directory with -w, or bind one there with -v") from e
        execve(plan.loader, plan.argv(), plan.env())


class Plan:
    """Everything F1 decides for one spec; raises UctrError naming an incompatibility."""

    def __init__(self, spec, lib: str):
        from uctr_batch.inject import elf

        self.spec, self.lib = spec, lib
        self.rootfs = os.path.realpath(spec.rootfs)
        if spec.uid == 0 and os.getuid() != 0:
            raise UctrError("fakechroot cannot run the payload as root (--root)",
                            "choose another mode, e.g. --mode P1 (`uctr doctor` lists them)")
        writable = writable_ro_sources(spec)
        if writable:
            raise UctrError("fakechroot cannot make binds read-only, and you could write "
                            + ", ".join(writable), None)
        _check_no_host_links(self.rootfs, spec)
        self.program = resolve_command(spec.argv[0], spec.env, self.rootfs)
        self.script = _shebang(self.program)
        binary = self.program
        if self.script:
            binary = resolve_command(self.script[0], spec.env, self.rootfs)
        info = _read_elf(elf, binary, spec.argv[0])
        if info.is_static:
            raise UctrError("%s is statically linked: fakechroot's LD_PRELOAD cannot translate "
                            "its paths" % _container_path(self.rootfs, binary), None)
        if info.interp and "musl" in info.interp:
            raise UctrError("the image uses musl libc (%s); fakechroot needs glibc" % info.interp,
                            None)
        self.loader = inroot.resolve(self.rootfs, info.interp or "/lib64/ld-linux-x86-64.so.2")
        if not os.path.isfile(self.loader):
            raise UctrError("the image has no dynamic loader %s" % info.interp, None)
        self.binary = binary
        self.lib_dirs = library_dirs(self.rootfs)
        self.glibc = container_glibc(elf, self.lib_dirs, self.rootfs)
        needed = _read_elf(elf, lib, lib).glibc_needed()
        if self.glibc is None:
            raise UctrError("cannot find the image's glibc (libc.so.6)",
                            "choose another mode, e.g. --mode P1 (`uctr doctor` lists them)")
        if needed and self.glibc < needed:
            raise UctrError("the image's glibc %s is older than the %s the host's %s needs"
                            % (elf.version_text(self.glibc), elf.version_text(needed), lib), None)
        self.glibc_text = elf.version_text(self.glibc)

    def argv(self):
        """Loader command line: [ld.so, (--argv0 NAME), program, args...]."""
        argv = [self.loader]
        if self.glibc >= ARGV0_GLIBC:
            argv += ["--argv0", self.spec.argv[0]]
        if self.script:
            # ld.so cannot run a script: run its interpreter with the script's container path.
            argv += [self.binary] + self.script[1:] + [_container_path(self.rootfs, self.program)]
        else:
            argv.append(self.program)
        return argv + list(self.spec.argv[1:])

    def env(self) -> dict:
        env = dict(self.spec.env)
        image_ld = [inroot.resolve(self.rootfs, d) for d in env.get("LD_LIBRARY_PATH", "").split(":")
                    if d.startswith("/")]
        env["LD_LIBRARY_PATH"] = ":".join(image_ld + self.lib_dirs)
        env["LD_PRELOAD"] = self.lib
        env["FAKECHROOT_BASE"] = self.rootfs
        env["FAKECHROOT_ELFLOADER"] = self.loader
        if self.glibc >= ARGV0_GLIBC:
            env["FAKECHROOT_ELFLOADER_OPT_ARGV0"] = "--argv0"
        env["FAKECHROOT_EXCLUDE_PATH"] = ":".join(self.excluded())
        # A cwd inside a bind is a host path (excluded from translation): getcwd() would show
        # it, so tell shells the container path (they keep $PWD when it is the same dir).
        env.setdefault("PWD", self.spec.cwd)
        return env

    def excluded(self):
        out = list(EXCLUDED)
        for src, _dst, _ro in self.spec.binds:
            if src not in out:
                out.append(src)
        return out

    def prepare_rootfs(self) -> None:
        """Binds as symlinks and the synthetic passwd/group, written into the rootfs."""
        for src, dst, _ro in self.spec.binds:
            if src != dst:
                _bind_link(self.rootfs, src, dst)
        for host, path in ((self.spec.passwd, "/etc/passwd"), (self.spec.group, "/etc/group")):
            if host:
                _copy_into(self.rootfs, host, path)


def _check_no_host_links(rootfs: str, spec) -> None:
    """Refuse an image whose links would lead libfakechroot out of the rootfs on the paths F1
    writes or the payload must find there (/etc, which gets
    /etc/passwd and /etc/group, and the parents of the binds).

    libfakechroot prefixes a path with the rootfs and lets the kernel follow the links in it:
    an absolute or ../ link in a parent (/etc -> /shared/etc) is followed on the host. F1's
    own writes are resolved inside the rootfs (inroot), but the payload would look for them
    on the host, so such an image is refused here (the ladder goes on to the next mode)."""
    paths = ["/etc"] if spec.passwd or spec.group else []
    paths += [os.path.dirname(dst.rstrip("/")) or "/" for _src, dst, _ro in spec.binds]
    for path in paths:
        inside = inroot.resolve(rootfs, path)
        on_host = os.path.realpath(os.path.join(rootfs, path.lstrip("/")))
        if inside != on_host:
            raise UctrError("the image's links lead %s out of the rootfs (to %s on the host); "
                            "fakechroot would follow them there" % (path, on_host), None)


def library_dirs(rootfs: str):
    """Host paths of the image's library directories: ld.so.conf (with includes) first."""
    dirs = []
    for d in _ld_so_conf(rootfs, "/etc/ld.so.conf", 0) + list(DEFAULT_LIB_DIRS):
        host = inroot.resolve(rootfs, d)
        if os.path.isdir(host) and host not in dirs:
            dirs.append(host)
    return dirs


def _ld_so_conf(rootfs: str, path: str, depth: int):
    if depth > 4:
        return []
    data = inroot.read_file(rootfs, path)  # never blocks on a FIFO, bounded
    if data is None:
        return []
    lines = data.decode(errors="replace").splitlines()
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line.startswith("include "):
            import glob

            pattern = inroot.resolve(rootfs, os.path.dirname(line.split(None, 1)[1]))
            for conf in sorted(glob.glob(os.path.join(pattern, os.path.basename(line.split(None, 1)[1])))):
                out += _ld_so_conf(rootfs, _container_path(rootfs, conf), depth + 1)
        elif line.startswith("/"):
            out.append(line)
    return out


def container_glibc(elf, lib_dirs, rootfs=None):
    """The highest GLIBC_x.y the image's libc.so.6 defines, or None. Its link (libc.so.6 ->
    libc-2.31.so) is resolved inside rootfs, and only a regular file is read (not a FIFO)."""
    for d in lib_dirs:
        path = os.path.join(d, "libc.so.6")
        if rootfs:
            path = inroot.resolve(rootfs, _container_path(rootfs, path))
        if os.path.isfile(path):
            try:
                return elf.read_elf(path).glibc_defined()
            except elf.ElfError:
                continue
    return None


def _read_elf(elf, path: str, what: str):
    try:
        return elf.read_elf(path)
    except elf.ElfError as e:
        raise UctrError("cannot read %s as an ELF program: %s" % (what, e), None) from e


def _shebang(path: str):
    """['/bin/sh', '-e'] for a '#!/bin/sh -e' script, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError as e:
        raise PayloadNotFound("cannot read %s: %s" % (path, e.strerror),
                              "check the command's path in the image") from e
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode(errors="replace").strip()
    parts = line.split(None, 1)
    return parts or None


def _container_path(rootfs: str, host: str) -> str:
    return "/" + os.path.relpath(host, rootfs) if host.startswith(rootfs + "/") else host


def _bind_link(rootfs: str, src: str, dst: str) -> None:
    """DST -> SRC as a link in the rootfs; DST's parent resolved (and made) inside it."""
    parent = inroot.ensure_mountpoint(rootfs, os.path.dirname(dst.rstrip("/")) or "/", True)
    link = os.path.join(parent, os.path.basename(dst.rstrip("/")))
    try:
        if os.readlink(link) == src:
            return
    except FileNotFoundError:
        pass
    except OSError:  # exists and is not a link: fine only if it is an empty directory
        try:
            os.rmdir(link)  # e.g. a mount point another mode created
        except OSError:
            raise UctrError("fakechroot cannot bind %s onto %s: it exists in the image" % (src, dst),
                            "bind onto a path the image does not have, or use --mode P1") from None
    else:
        os.unlink(link)  # a link of an earlier run (or of the image) pointing elsewhere
    os.symlink(src, link)


def _copy_into(rootfs: str, host: str, path: str) -> None:
    """host's content as a regular file `path` of the rootfs: its parent resolved inside the
    rootfs, a link there replaced (write_atomic renames over it, never follows it)."""
    parent = inroot.ensure_mountpoint(rootfs, os.path.dirname(path), True)
    target = os.path.join(parent, os.path.basename(path))
    if os.path.islink(target):
        os.unlink(target)
    elif os.path.isdir(target):
        raise UctrError("%s is a directory in the image, where a file is needed" % path,
                        "fix the image, or use --mode P1")
    with open(host, "rb") as f:
        data = f.read()
    try:  # only a regular file of the same size is read: the image's may be a FIFO
        st = os.lstat(target)
        if stat.S_ISREG(st.st_mode) and st.st_size == len(data):
            with open(target, "rb") as f:
                if f.read() == data:
                    return
    except OSError:
        pass
    from uctr_batch import fsutil

    try:
        fsutil.write_atomic(target, data, 0o644)
    except OSError as e:
        raise UctrError("cannot write %s into the rootfs %s: %s" % (path, rootfs, e.strerror),
                        "fakechroot needs a rootfs you can write; use --mode P1") from e


def _lib_version(lib: str):
    from uctr_batch.inject import elf

    try:
        needed = elf.read_elf(lib).glibc_needed()
    except elf.ElfError:
        return None
    return "needs glibc >= %s" % elf.version_text(needed) if needed else None
