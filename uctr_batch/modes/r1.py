"""R1: crun (preferred) or runc, rootless, from a generated OCI config.json.

The config: user + mount namespaces only (host network, hostname, PID and IPC namespaces),
no cgroups, the caller's uid/gid mapped to itself (or to 0 with --root), the host's /proc
and /sys rbound, a private /dev like N1's, the same binds, env and cwd, terminal false.

Nothing is left behind: the config lives in a memfd passed as /proc/self/fd/N (crun
--config; for runc a reusable per-fd-number bundle directory whose config.json is a symlink
to it), the container id is unique, and the runtime deletes its state when the payload
exits. Inherited fds (PMI_FD) are handed on with --preserve-fds. The runtime stays as the
payload's parent: it forwards signals and exits with the payload's status (128+N for a
signal), unlike udocker's R1, which always exits 1 behind a pty relay.

Host quirks handled here:
  * crun 1.8 refuses rootless containers on a hybrid cgroup v1/v2 host ("cgroups in hybrid
    mode not supported"), even with --cgroup-manager=disabled. R1 then runs crun in a user
    + mount namespace of its own in which an empty tmpfs covers /sys/fs/cgroup, so crun
    sees no cgroup hierarchy at all. The host's mounts are untouched.
  * runc rootless needs a mapping for container uid 0, so it can only run the payload as
    root; it is used for --root, and otherwise only when crun is absent (probe says so).
"""

import json
import os

from uctr_batch.errors import ModeError
from uctr_batch.modes import inroot, nsutil
from uctr_batch.modes.base import (
    STANDARD_DEVICES, Mode, ProbeResult, dev_entries, execve, find_program, inherited_fds,
    program_version, register_mode, state_subdir,
)

RUNTIMES = ("crun", "runc")
# What crun and runc create in /dev themselves (nodes bound from the host in a user namespace,
# /dev/ptmx as a link to pts/ptmx): binding them too fights the runtime (see oci_config).
RUNTIME_DEVICES = STANDARD_DEVICES

# What root gets inside with --root (N1 gives all capabilities of the user namespace; the
# OCI runtimes need a list). Without --root the payload has none, as in every mode.
ROOT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_SETFCAP", "CAP_AUDIT_WRITE", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SYS_PTRACE",
)


def cgroup_mode(mountinfo: str = "/proc/self/mountinfo") -> str:
    """'unified', 'hybrid', 'legacy' or 'none', as crun decides it (from the mount table)."""
    fstypes = {}
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                    sep = fields.index("-")
                    fstypes[fields[4]] = fields[sep + 1]
    except OSError:
        return "none"
    top = fstypes.get("/sys/fs/cgroup")
    if top == "cgroup2":
        return "unified"
    if top is None:
        return "none"
    return "hybrid" if fstypes.get("/sys/fs/cgroup/unified") == "cgroup2" else "legacy"


def find_runtime():
    """(name, path) of the runtime R1 uses for spec: crun, else runc; None if neither."""
    for name in RUNTIMES:
        path = find_program(name)
        if path:
            return name, path
    return None


@register_mode("R1")
class OciRuntime(Mode):
    summary = "crun or runc, rootless, from a generated OCI config"

    def probe(self, spec=None) -> ProbeResult:
        found = find_runtime()
        if not found:
            return ProbeResult(False, "neither crun nor runc found on PATH")
        name, path = found
        problem = nsutil.userns_sysctl_problem()
        if problem:
            return ProbeResult(False, "%s rootless needs user namespaces: %s" % (name, problem))
        if name == "runc" and spec is not None and spec.uid != 0:
            return ProbeResult(False, "runc rootless can run the payload only as uid 0 (it needs "
                               "a mapping for container root); install crun, or use --root")
        reason = "%s rootless" % name
        if name == "crun" and cgroup_mode() == "hybrid":
            reason += " (hybrid cgroup host: crun runs in a private mount namespace)"
        version = program_version([path, "--version"]) if spec is None else None
        return ProbeResult(True, reason, version)

    def exec(self, spec):
        self.require(spec)
        name, path = find_runtime()
        fds = inherited_fds()
        preserve = max(fds) - 2 if fds else 0
        config = oci_config(spec, destination=safe_destination(spec.rootfs))
        config_fd = config_memfd(config, above=max(fds) if fds else 2)
        container_id = "uctr-%d-%s" % (os.getpid(), os.urandom(4).hex())
        state = state_subdir(spec, name + "-root")
        if name == "crun":
            argv = [path, "--root", state, "--cgroup-manager=disabled", "run", "--no-new-keyring",
                    "--config", "/proc/self/fd/%d" % config_fd, "--bundle", state,
                    "--preserve-fds", str(preserve), container_id]
            if cgroup_mode() == "hybrid":
                hide_cgroups()
        else:
            argv = [path, "--root", state, "run", "--no-new-keyring",
                    "--bundle", runc_bundle(spec, config_fd),
                    "--preserve-fds", str(preserve), container_id]
        execve(path, argv, dict(os.environ))


def safe_destination(rootfs: str):
    """destination(path, is_dir) for oci_config: every path the runtime will touch, made safe
    first (inroot): /dev, /proc and /sys real directories of the rootfs (crun opens "dev" by
    name and creates its nodes in whatever it is), and each bind target created and resolved
    inside the rootfs, so the runtime only ever sees link-free paths under the rootfs."""
    root = os.path.realpath(rootfs)
    inroot.system_dirs(root)

    def destination(path: str, is_dir: bool) -> str:
        return inroot.container_path(root, inroot.ensure_mountpoint(root, path, is_dir))
    return destination


def oci_config(spec, host_uid=None, host_gid=None, dev=None, destination=None) -> dict:
    """The OCI runtime config for spec (plain data; golden-tested). dev: (host path, is_dir)
    of the /dev entries (default: this host's, see base.dev_entries); destination(path,
    is_dir): the container path to mount a bind on (exec passes safe_destination's).

    /dev is a fresh tmpfs mounted first, so the /dev entries and what the runtime adds itself
    land in it. The standard nodes are not bound here: crun and runc create them themselves
    (null, zero, full, random, urandom, tty bound from the host; /dev/ptmx a link to
    pts/ptmx), and a bind of ours under theirs breaks them: crun unmounts what is on /dev/ptmx
    to make its link, which fails ("creating symlink for /dev/ptmx: File exists") once an
    rbind whose source contains the rootfs (/tmp, holding the default node-local directory)
    has copied the container's /dev tmpfs with our ptmx bind on it: the same dentry stays a
    mount point in the copy, so after crun's umount2 the unlink is still EBUSY (strace); runc opens its /dev/tty target, which is
    the host's tty after our bind and ENXIO without a controlling terminal (batch jobs)."""
    host_uid = os.getuid() if host_uid is None else host_uid
    host_gid = os.getgid() if host_gid is None else host_gid
    destination = destination or (lambda path, _is_dir: path)
    mounts = [
        {"destination": "/proc", "type": "bind", "source": "/proc", "options": ["rbind"]},
        {"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "noexec", "mode=755", "size=256k"]},
    ]
    for host, _is_dir in dev_entries(spec) if dev is None else dev:
        if host in RUNTIME_DEVICES:
            continue
        mounts.append({"destination": host, "type": "bind", "source": host, "options": ["rbind"]})
    for host, path in ((spec.passwd, "/etc/passwd"), (spec.group, "/etc/group")):
        if host:
            mounts.append({"destination": destination(path, False), "type": "bind",
                           "source": host, "options": ["bind", "ro"]})
    for src, dst, ro in spec.binds:
        mounts.append({"destination": destination(dst, os.path.isdir(src)), "type": "bind",
                       "source": src, "options": ["rbind", "ro" if ro else "rw"]})
    process = {
        "terminal": False,
        "user": {"uid": spec.uid, "gid": spec.gid},
        "args": list(spec.argv),
        "env": ["%s=%s" % kv for kv in spec.env.items()],
        "cwd": spec.cwd,
    }
    if spec.uid == 0:
        caps = list(ROOT_CAPABILITIES)
        process["capabilities"] = {"bounding": caps, "effective": caps, "permitted": caps}
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": os.path.realpath(spec.rootfs), "readonly": spec.readonly},
        "mounts": mounts,
        "linux": {
            "uidMappings": [{"containerID": spec.uid, "hostID": host_uid, "size": 1}],
            "gidMappings": [{"containerID": spec.gid, "hostID": host_gid, "size": 1}],
            "namespaces": [{"type": "user"}, {"type": "mount"}],
        },
    }


def config_memfd(config: dict, above: int) -> int:
    """An inheritable memfd holding config, numbered above every inherited fd (so
    --preserve-fds does not hand it to the payload)."""
    import fcntl

    fd = os.memfd_create("uctr-oci-config", 0)
    os.write(fd, json.dumps(config).encode())
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, above + 1)
    os.close(fd)
    os.lseek(high, 0, os.SEEK_SET)
    return high


def runc_bundle(spec, config_fd: int) -> str:
    """A bundle dir whose config.json links to /proc/self/fd/N (runc has no --config).

    The directory depends only on N, so it is reused by every later run."""
    bundle = state_subdir(spec, "runc-bundles/fd%d" % config_fd)
    link = os.path.join(bundle, "config.json")
    target = "/proc/self/fd/%d" % config_fd
    try:
        if os.readlink(link) == target:
            return bundle
        os.unlink(link)
    except OSError:
        pass
    os.symlink(target, link)
    return bundle


def hide_cgroups() -> None:
    """Enter a user+mount namespace (caller mapped to itself) with /sys/fs/cgroup covered by
    an empty tmpfs: crun's hybrid-mode check then sees no cgroups (see module docstring)."""
    nsutil.enter_user_mount_ns(os.getuid(), os.getgid())
    try:
        nsutil.mount("tmpfs", "/sys/fs/cgroup", "tmpfs", 0, "mode=0755,size=4k",
                     step="cannot hide /sys/fs/cgroup from crun")
    except ModeError as e:
        raise ModeError(e.message, "use --mode N1, or install runc") from e
