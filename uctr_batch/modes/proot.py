"""P1/P2: proot (ptrace path translation). P2 sets PROOT_NO_SECCOMP=1 (pure ptrace).

    proot -r ROOTFS -w CWD -b /proc -b /sys -b /dev/null ... -b PASSWD:/etc/passwd
          -b SRC:DST ... [-0] CMD ARGS

Never `-k`: with Debian's proot 5.1 on recent kernels any -k makes stat/open of dynamic
binaries fail with EINVAL (udocker passes it always; see research/peer-facts.md).
Debian's proot has no --kill-on-exit.

What proot cannot do, and what this mode therefore does about it:
  * read-only binds or rootfs: proot binds are always writable. A read-only request is
    refused when the caller could write the source (permissions enforce it otherwise).
  * signals: proot ignores SIGTERM/SIGINT sent to its own pid (only the process group, as
    Slurm, mpirun and a terminal send them, reaches the payload), and it exits 255 when the
    payload is killed by a signal. Documented in docs/modes.md; the conformance suite marks
    both as known deviations of P1/P2.
"""

import os

from uctr_batch.errors import UctrError
from uctr_batch.modes import inroot
from uctr_batch.modes.base import (
    Mode, ProbeResult, dev_entries, execve, find_program, program_version, register_mode,
    writable_ro_sources,
)


class _Proot(Mode):
    no_seccomp = False

    def probe(self, spec=None) -> ProbeResult:
        path = find_program("proot")
        if not path:
            return ProbeResult(False, "proot not found on PATH")
        if _ptrace_scope() == "3":
            return ProbeResult(False, "ptrace is disabled (kernel.yama.ptrace_scope=3)")
        if spec is not None:
            if not os.path.isdir(spec.rootfs):
                return ProbeResult(False, "rootfs is not a directory: %s" % spec.rootfs)
            writable = writable_ro_sources(spec)
            if writable:
                return ProbeResult(False, "proot cannot make binds read-only, and you could "
                                   "write %s" % ", ".join(writable))
        version = program_version([path, "--version"], first_line_only=False) if spec is None else None
        return ProbeResult(True, "proot%s" % (" without seccomp" if self.no_seccomp else ""),
                           _version_line(version))

    def unusable_hint(self) -> str:
        return "use a namespace mode (N1, R1) for read-only binds, or drop :ro / --read-only"

    def exec(self, spec):
        self.require(spec)
        path = find_program("proot")
        root = os.path.realpath(spec.rootfs)
        try:  # proot binds /dev/null etc. into the image's /dev: a link there would hide them
            inroot.system_dirs(root)
        except UctrError:
            pass  # not ours to change: proot only ever translates paths, it writes nothing there
        argv = proot_argv(spec, path, destination=lambda p, d: inroot.resolved(root, p, d))
        execve(path, argv, proot_env(spec, self.no_seccomp))


@register_mode("P1")
class Proot(_Proot):
    summary = "proot (ptrace, seccomp-accelerated)"


@register_mode("P2")
class ProotNoSeccomp(_Proot):
    summary = "proot with PROOT_NO_SECCOMP=1 (pure ptrace)"
    no_seccomp = True


def proot_argv(spec, proot="proot", host_uid=None, dev=None, destination=None):
    """The proot command line; dev: (host path, is_dir) of /dev entries (default: this host's);
    destination(path, is_dir): the guest path of a bind, its links resolved inside the rootfs (exec
    passes inroot.resolved: proot never sees the image's links for a path it binds onto)."""
    host_uid = os.getuid() if host_uid is None else host_uid
    destination = destination or (lambda path, _is_dir: path)
    argv = [proot, "-r", os.path.realpath(spec.rootfs), "-w", spec.cwd,
            "-b", "/proc", "-b", "/sys"]
    for host, _is_dir in dev_entries(spec) if dev is None else dev:
        argv += ["-b", host]
    for host, path in ((spec.passwd, "/etc/passwd"), (spec.group, "/etc/group")):
        if host:
            argv += ["-b", "%s:%s" % (host, destination(path, False))]
    for src, dst, _ro in spec.binds:
        argv += ["-b", "%s:%s" % (src, destination(dst, os.path.isdir(src)))]
    if spec.uid == 0 and host_uid != 0:
        argv.append("-0")
    return argv + list(spec.argv)


def proot_env(spec, no_seccomp: bool) -> dict:
    env = dict(spec.env)
    if no_seccomp:
        env["PROOT_NO_SECCOMP"] = "1"
    return env


def _ptrace_scope():
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return f.read().strip()
    except OSError:
        return None


def _version_line(text):
    """'5.1.0 (built-in accelerators: process_vm = yes, seccomp_filter = no)' from proot's
    ASCII-art banner; the accelerators matter: without seccomp_filter P1 is as slow as P2."""
    if not text:
        return None
    version = accel = None
    for line in text.splitlines():
        token = line.split()[-1] if line.split() else ""
        if version is None and token[:1].isdigit() and "." in token:
            version = token
        if line.startswith("built-in accelerators"):
            accel = line.strip()
    if version and accel:
        return "%s (%s)" % (version, accel)
    return version
