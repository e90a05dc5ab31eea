"""PMI/PMIx pass-through: what a rank inside the container needs to reach its launcher.

The launcher's environment is kept by the mode; here we list the variables that must survive,
the directories the PMIx server shares with its clients (bound read-write at the same path),
the PMIx MCA mapping pyxis and Sarus do, the inherited PMI_FD, the munge socket when the site
asks for it, and whether the host network is needed (PMIx and hydra talk TCP on loopback).
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import os
import posixpath
import stat
# collections.abc re-exports _collections_abc, which os has loaded already: importing
# collections.abc costs the step's creator ~1.3 ms (collections), for annotations alone
from _collections_abc import Mapping

from uctr_batch.inject import fsroot, policyview
from uctr_batch.inject.plan import INFO, REFUSE, InjectionPlan

C = "pmi"

# Variables the container must receive unchanged, by prefix.
PASSTHROUGH_PREFIXES = (
    "PMI_",
    "PMIX_",
    "SLURM_",
    "OMPI_",
    "ORTE_",
    "OPAL_",
    "PRTE_",
    "PALS_",
    "HYDRA_",
    "MPIR_",
    "MPI_LOCAL",
    "PBS_",
)

# pyxis and Sarus: the server's module choice becomes the client's MCA selection.
PMIX_MCA_MAP = (
    ("PMIX_PTL_MODULE", "PMIX_MCA_ptl"),
    ("PMIX_SECURITY_MODE", "PMIX_MCA_psec"),
    ("PMIX_GDS_MODULE", "PMIX_MCA_gds"),
)

# Variables naming directories the PMIx server (or Open MPI's mpirun) shares with clients:
# these, and PMIX_DSTORE_<[A-Z0-9_]*>BASE_PATH. String tests, not re: this module runs in
# every step's creator, and re (with enum) is ~3 ms of its start.
_SHARED_DIR_NAMES = frozenset(["PMIX_SERVER_TMPDIR", "OMPI_MCA_orte_top_session_dir",
                               "OMPI_MCA_prte_top_session_dir", "PRTE_MCA_prte_top_session_dir"])
_UPPER_DIGIT_UNDERSCORE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _names_shared_dir(key: str) -> bool:
    if key in _SHARED_DIR_NAMES:
        return True
    prefix, suffix = "PMIX_DSTORE_", "BASE_PATH"
    return (len(key) >= len(prefix) + len(suffix) and key.startswith(prefix)
            and key.endswith(suffix)
            and _UPPER_DIGIT_UNDERSCORE.issuperset(key[len(prefix):-len(suffix)]))


# Never bind these wholesale: only their job-specific subdirectories.
_TOO_BROAD = frozenset(
    ["/", "/tmp", "/var/tmp", "/dev/shm", "/run", "/var/run", "/var", "/var/spool", "/home"]
)


def _is_slurm_pmix_dir(name: str) -> bool:
    """pmix.JOB.STEP, both decimal (slurmstepd's directory under SlurmdSpoolDir)."""
    parts = name.split(".")
    return (len(parts) == 3 and parts[0] == "pmix"
            and all(p.isascii() and p.isdigit() for p in parts[1:]))


MUNGE_DIRS = ("/run/munge", "/var/run/munge")
# Any of these means a PMI/PMIx peer reachable over TCP (PMIx URI, hydra's PMI_PORT).
_NETWORK_VARS = (
    "PMIX_SERVER_URI",
    "PMIX_SERVER_URI2",
    "PMIX_SERVER_URI3",
    "PMIX_SERVER_URI4",
    "PMIX_SERVER_URI21",
    "PMIX_SERVER_URI41",
    "PMI_PORT",
    "OMPI_MCA_orte_hnp_uri",
    "PMIX_NAMESPACE",
)


def pmi_plan(env: Mapping[str, str], host_root: str = "/", policy=None,
             image_root: str | None = None) -> InjectionPlan:
    """Plan the PMI/PMIx wiring of one rank from its launcher environment. IMAGE_ROOT, the
    container's root filesystem, lets the PMIx module choice fit the image's PMIx."""
    plan = InjectionPlan()
    plan.passthrough_env = required_env(env)
    _keep_pmi_fd(plan, env)
    if policyview.get(policy, "pmix", True):
        _map_pmix_mca(plan, env, image_root)
        for path in shared_dirs(env, host_root, policy):
            plan.add_bind(
                C,
                fsroot.outside(host_root, fsroot.resolve(host_root, path)),
                path,
                ro=False,
                kind="dir",
                reason="PMIx server/session directory",
            )
    else:
        plan.record(C, INFO, "pmix", "PMIx directories not bound (policy pmix: false)")
    if policyview.get(policy, "munge", False):
        _bind_munge(plan, host_root, policyview.get(policy, "munge_socket", None))
    network = [k for k in _NETWORK_VARS if k in env]
    if network:
        plan.host_network = True
        plan.record(
            C, INFO, "host network", "the launcher is reached over TCP (%s)" % ", ".join(network)
        )
    plan.info[C] = {"flavour": flavour(env)}
    return plan


def flavour(env: Mapping[str, str]) -> str:
    """Which wire-up the launcher offers: pmix, pmi (PMI-1/2 over PMI_FD or PMI_PORT) or none."""
    if "PMIX_RANK" in env or "PMIX_NAMESPACE" in env:
        return "pmix"
    if "PMI_FD" in env or "PMI_PORT" in env or "PMI_RANK" in env:
        return "pmi"
    return "none"


def _map_pmix_mca(plan: InjectionPlan, env: Mapping[str, str],
                  image_root: str | None = None) -> None:
    for source, target in PMIX_MCA_MAP:
        if source in env and target not in env:
            value, why = env[source], "set from %s=%s" % (source, env[source])
            if target == "PMIX_MCA_gds" and image_root:
                value, why = _common_gds(value, image_root, why)
            plan.env[target] = value
            plan.record(C, INFO, target, why)
            if target not in plan.passthrough_env:
                plan.passthrough_env.append(target)


# -- the gds (data store) modules both PMIx sides have ------------------------------------------
# A newer server (PMIx 5: gds shmem2,hash) offers modules an older client lacks (PMIx 4.2:
# hash, ds12, ds21); an MCA selection naming a missing component makes the client print a
# "Component: shmem2 not found" block on every rank. The client's list comes from its
# library (built-in components are named by symbols) and from component DSOs beside it.
PMIX_LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu",
                 "usr/lib/powerpc64le-linux-gnu", "usr/lib64", "usr/lib", "usr/local/lib",
                 "usr/lib/x86_64-linux-gnu/pmix2/lib", "usr/lib/aarch64-linux-gnu/pmix2/lib")
_GDS_SYMBOL = rb"pmix_mca_gds_([a-z0-9]+)_component\0"  # re patterns, compiled on use
_GDS_DSO = r"^(?:pmix_)?mca_gds_([a-z0-9]+)\.so$"
PMIX_LIB_MAX = 64 << 20  # a libpmix is a few MiB: never read an odd file whole


def image_gds_modules(image_root: str) -> list[str] | None:
    """The gds components of the image's PMIx (sorted), or None where it has no libpmix
    this can read (then nothing is changed)."""
    import re

    dso = re.compile(_GDS_DSO)
    found = set()
    seen_lib = False
    for sub in PMIX_LIB_DIRS:
        # the image's symlinks resolve inside the image, never to this machine's files
        directory = fsroot.outside(image_root, fsroot.resolve(image_root, "/" + sub))
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.startswith("libpmix.so"):
                modules = _gds_in_library(os.path.join(directory, name))
                if modules is not None:
                    seen_lib = True
                    found.update(modules)
        try:
            found.update(m.group(1) for m in map(dso.match, os.listdir(
                os.path.join(directory, "pmix"))) if m)
        except OSError:
            pass
    return sorted(found) if seen_lib and found else None


def _gds_in_library(path: str) -> list[str] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None  # a symlink: its target is listed too
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > PMIX_LIB_MAX:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(PMIX_LIB_MAX)
    except OSError:
        return None
    finally:
        os.close(fd)
    import re

    return [m.decode() for m in re.findall(_GDS_SYMBOL, data)]


def _common_gds(server: str, image_root: str, why: str):
    """(PMIX_MCA_gds value, reason): the server's modules the image's PMIx also has, in the
    server's order; the server's list unchanged where the image's modules are unknown or all
    there."""
    client = image_gds_modules(image_root)
    wanted = [m for m in (s.strip() for s in server.split(",")) if m]
    if client is None or all(m in client for m in wanted):
        return server, why
    common = [m for m in wanted if m in client] or (["hash"] if "hash" in client else client[:1])
    return ",".join(common), "%s, less what the image's PMIx lacks (it has %s)" % (
        why, ", ".join(client))


def _keep_pmi_fd(plan: InjectionPlan, env: Mapping[str, str]) -> None:
    value = env.get("PMI_FD")
    if value is None:
        return
    try:
        fd = int(value)
    except ValueError:
        plan.warn(C, "PMI_FD=%r is not a file descriptor number" % value)
        return
    plan.keep_fds.append(fd)
    plan.record(C, INFO, "fd %d" % fd, "PMI_FD: inherited from the launcher, must stay open")


def shared_dirs(env: Mapping[str, str], host_root: str = "/", policy=None) -> list[str]:
    """Existing host directories the PMIx server shares with this rank, outermost first and
    without nested duplicates: PMIX_SERVER_TMPDIR and friends, Slurm's
    <SlurmdSpoolDir>/pmix.J.S and <TmpFS>/spmix_appdir_[uid_]J.S."""
    wanted: list[str] = []
    for key in sorted(env):
        if _names_shared_dir(key):
            wanted.extend(p for p in env[key].split(":") if p)
    job, step = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"), env.get("SLURM_STEP_ID")
    if job and step:
        wanted.extend(_slurm_pmix_dirs(env, policy, job, step, host_root))
    out: list[str] = []
    for path in sorted({posixpath.normpath(p) for p in wanted if p.startswith("/")}, key=len):
        if path in _TOO_BROAD or not fsroot.isdir(host_root, path):
            continue
        if any(path == o or path.startswith(o + "/") for o in out):
            continue
        out.append(path)
    return out


def _slurm_pmix_dirs(
    env: Mapping[str, str], policy, job: str, step: str, host_root: str = "/"
) -> list[str]:
    spool_dirs = [d for d in [policyview.get(policy, "slurmd_spool_dir")] if d]
    server = env.get("PMIX_SERVER_TMPDIR", "")
    if _is_slurm_pmix_dir(posixpath.basename(server.rstrip("/"))):
        spool_dirs.append(posixpath.dirname(server.rstrip("/")))
    # Where slurmstepd makes the appdir: SLURM_PMIX_TMPDIR, else mpi.conf's PMIxCliTmpDirBase,
    # else TmpFS. Not TMPDIR: Slurm sets it to /tmp, and in some tasks of a step only, so it
    # says nothing about TmpFS and would split the step's ranks into several containers.
    tmpfs_dirs = [
        d
        for d in [policyview.get(policy, "slurm_tmpfs"), env.get("SLURM_PMIX_TMPDIR")]
        + slurm_tmp_dirs(env, host_root)
        + ["/tmp"]
        if d
    ]
    uid = env.get("SLURM_JOB_UID")
    out = ["%s/pmix.%s.%s" % (d, job, step) for d in spool_dirs]
    for d in tmpfs_dirs:
        if uid:
            out.append("%s/spmix_appdir_%s_%s.%s" % (d, uid, job, step))
        out.append("%s/spmix_appdir_%s.%s" % (d, job, step))
    return out


SLURM_CONF_PATHS = ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf")


def slurm_tmp_dirs(env: Mapping[str, str], host_root: str = "/") -> list[str]:
    """Where this node's slurmstepd puts the PMIx client directories, as the site's Slurm
    configuration says (the job environment does not): PMIxCliTmpDirBase from mpi.conf
    beside slurm.conf, then TmpFS from slurm.conf, with %n (node name) and %h (host name)
    expanded. Empty when no slurm.conf is readable."""
    conf = env.get("SLURM_CONF")
    for path in ([conf] if conf else []) + list(SLURM_CONF_PATHS):
        settings = _read_slurm_conf(host_root, path)
        if settings is not None:
            break
    else:
        return []
    mpi = _read_slurm_conf(host_root, posixpath.join(posixpath.dirname(path), "mpi.conf"))
    found = [(mpi or {}).get("pmixclitmpdirbase"), settings.get("tmpfs")]
    node = env.get("SLURMD_NODENAME") or env.get("PMIX_HOSTNAME") or ""
    host = os.uname().nodename
    return [d.replace("%n", node).replace("%h", host) for d in found if d]


def _read_slurm_conf(host_root: str, path: str) -> dict[str, str] | None:
    """KEY=VALUE settings of a Slurm configuration file (keys lower-cased, first wins;
    Include lines are not followed), or None when it cannot be read."""
    try:
        with open(fsroot.outside(host_root, path), encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return None
    settings: dict[str, str] = {}
    for line in text.splitlines():
        for word in line.split("#", 1)[0].split():
            key, sep, value = word.partition("=")
            if sep and value:
                settings.setdefault(key.lower(), value)
    return settings


def _bind_munge(plan: InjectionPlan, host_root: str, socket: str | None) -> None:
    """Bind the directory of the munge socket (policy munge_socket, else the usual places)."""
    candidates = [posixpath.dirname(socket)] if socket else []
    for d in candidates + [d for d in MUNGE_DIRS if d not in candidates]:
        if fsroot.isdir(host_root, d):
            real = fsroot.resolve(host_root, d)
            plan.add_bind(
                C,
                fsroot.outside(host_root, real),
                real,
                ro=True,
                kind="dir",
                reason="munge socket directory (policy munge: true)",
            )
            return
    plan.record(
        C,
        REFUSE,
        "munge",
        "policy asks for munge but none of %s exists on this node"
        % ", ".join(candidates + list(MUNGE_DIRS)),
    )


def required_env(env: Mapping[str, str]) -> list[str]:
    """Names of the launcher variables the mode must pass through (for callers that do not
    need the whole plan)."""
    return sorted(k for k in env if k.startswith(PASSTHROUGH_PREFIXES))


def pmi_fd(env: Mapping[str, str]) -> int | None:
    try:
        return int(env["PMI_FD"])
    except (KeyError, ValueError):
        return None
