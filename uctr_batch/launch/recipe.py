"""The container recipe: everything about a container that is neither per rank nor per step.

Building it is the slow part of a start: run.build_spec (binds, working directory,
synthetic /etc/passwd) and the image part of the host injection (host MPI ABI checks, GPU
devices and driver libraries), with their imports. Its inputs change rarely between runs
on a node, so the rank that builds it caches it, and the next rank that sets up a
container from the same inputs reads it back (marshal, stdlib only):

    <local dir>/launch/ctr-<hash>.rcp

What the recipe depends on (image_inputs(), plus the command's name and whether the rootfs
is read-only: recipe_key()): the image and its rootfs, the options that shape the container
(-v, UCTR_MOUNTS, -w, --writable, $HOME, --mpi, --gpu), the caller's ids, the policy's
fingerprint, the job id (whether there is one; its value only where a policy path names
the job: names_the_job) and the GPU allocation the planners read, and a stamp of the host
state they look at (the ld cache, GPU device nodes and driver version, the policy's bind
sources). An entry older than MAX_AGE is rebuilt anyway.

The PMI part is per step (the PMIx server's and Slurm's per-step directories): the rank
that sets a step's container up adds it to the recipe (launch.injection.plan_step). The
namespace key (inputs()) covers both, so ranks whose containers would differ in any way
never share one.
"""

import os
import sys
import time
import zlib

from uctr_batch.launch.nodelock import read_marshal, write_marshal

FORMAT = 2
MAX_AGE = 3600.0

# Launcher variables the image part reads (inject.gpu: allocation, in or out of a job;
# policy paths: ${JOB_ID}; run.build_spec: $HOME, $USER; gpu tools: $PATH).
IMAGE_ENV = ("SLURM_JOB_ID", "PBS_JOBID", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "HOME", "USER",
             "PATH")
JOB_ENV = ("SLURM_JOB_ID", "PBS_JOBID")  # their values count only where the policy names the job
# Per-rank GPU visibility: only when the step's allocation is not known (no SLURM_*_GPUS),
# they decide which devices the container gets.
RANK_GPU_VARS = ("CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES",
                 "HIP_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
# What the step part reads (inject.pmi).
STEP_ENV = (
    "PMIX_SERVER_TMPDIR", "PMIX_PTL_MODULE", "PMIX_SECURITY_MODE", "PMIX_GDS_MODULE",
    "PMIX_MCA_ptl", "PMIX_MCA_psec", "PMIX_MCA_gds", "OMPI_MCA_orte_top_session_dir",
    "OMPI_MCA_prte_top_session_dir", "PRTE_MCA_prte_top_session_dir", "SLURM_JOBID",
    "SLURM_STEP_ID", "SLURM_JOB_UID", "SLURM_PMIX_TMPDIR", "SLURM_CONF", "SLURMD_NODENAME",
    "PMIX_HOSTNAME",
)
# Only what is the same for every rank of a step on a node: a variable that differs between
# them would give each rank its own container, and shared memory between ranks fails. So
# not TMPDIR, which Slurm 22.05 exports to some tasks of a step and not to others.
STEP_ENV_PREFIXES = ("PMIX_DSTORE_",)
HOST_PATHS = ("/etc/ld.so.cache", "/dev/nvidiactl", "/dev/kfd", "/proc/driver/nvidia/version")


def image_inputs(opts, env, image, policy: dict, host_cwd, policy_bind_sources=()) -> tuple:
    """What shapes the container apart from the step's PMI wiring (see the docstring)."""
    names = IMAGE_ENV
    if not (env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS")):
        names = names + RANK_GPU_VARS
    relative = any(not v.startswith("/") for v in opts.volumes)
    job_scoped = names_the_job(policy)
    return (
        FORMAT, tuple(sys.version_info[:2]), image.rootfs, image.manifest_digest,
        tuple(opts.volumes), host_cwd if relative else None, opts.workdir, opts.writable,
        opts.mount_home,
        opts.mpi, opts.gpu, os.getuid(), os.getgid(), policy.get("fingerprint"),
        tuple((k, env.get(k) if job_scoped or k not in JOB_ENV else bool(env.get(k)))
              for k in names),
        host_state(policy_bind_sources),
    )


def names_the_job(policy: dict) -> bool:
    """Does the policy put the job id into a path (${JOB_ID}, ${SLURM_JOB_ID}, ${PBS_JOBID})?
    Only then is a recipe one job's: otherwise the planners read only whether there is a
    job (inject.gpu), and the first step of every later job on the node reads the recipe
    instead of building it (the policy model and the planners, ~60 ms of its creator). The
    namespace key still names the step (STEP_ENV): containers are never shared by jobs."""
    text = repr(policy)
    return any("${%s}" % name in text for name in ("JOB_ID",) + JOB_ENV)


def inputs(image_part: tuple, env) -> tuple:
    """The namespace key's inputs: the image part plus the step's PMI variables."""
    step = tuple((k, env.get(k)) for k in STEP_ENV)
    step += tuple(sorted((k, v) for k, v in env.items() if k.startswith(STEP_ENV_PREFIXES)))
    return image_part + (step,)


def recipe_key(image_part: tuple, more) -> tuple:
    """The recipe also depends on the command (its DT_NEEDED tells the MPI planner which of
    the image's MPIs the application uses) and on whether the mode can keep the rootfs
    read-only. Not the namespace: ranks of one step running different programs still
    share one container, the first rank's."""
    return image_part + (more,)


def host_state(extra_paths=()) -> tuple:
    """(path, mtime, size, inode) of what the planners look at on the host."""
    rows = []
    for path in HOST_PATHS + tuple(extra_paths):
        try:
            st = os.stat(path)
            rows.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            rows.append((path,))
    return tuple(rows)


def digest(key: tuple) -> str:
    return digest_bytes(repr(key).encode())


def digest_bytes(data: bytes) -> str:
    """crc32 and adler32 in hex (launchers/c/fastctr.c fc_digest computes the same)."""
    return "%08x%08x" % (zlib.crc32(data), zlib.adler32(data))


def load(dir_fd: int, key: tuple):
    """The cached recipe for KEY, or None."""
    entry = read_marshal(dir_fd, "ctr-%s.rcp" % digest(key))
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    if time.time() - entry.get("created", 0) > MAX_AGE:
        return None
    passwd = entry["spec"].get("passwd")
    if passwd and not os.path.exists(passwd):  # state dir cleaned: rebuild
        return None
    return entry


def store(dir_fd: int, key: tuple, entry: dict) -> None:
    entry = dict(entry, key=key, created=time.time())
    write_marshal(dir_fd, "ctr-%s.rcp" % digest(key), entry)
    remove_expired(dir_fd)


def remove_expired(dir_fd: int) -> None:
    """Drop recipes nobody can use any more (older than MAX_AGE); a rebuild is their cost."""
    now = time.time()
    for name in os.listdir(dir_fd):
        if name.startswith("ctr-") and name.endswith(".rcp"):
            try:
                if now - os.stat(name, dir_fd=dir_fd).st_mtime > MAX_AGE:
                    os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass


# RunSpec fields that belong to the container (the rest, argv, env and cwd, are per rank).
SPEC_FIELDS = ("rootfs", "binds", "devices", "uid", "gid", "readonly", "passwd", "group",
               "state_dir")


def container_fields(spec) -> dict:
    d = spec.to_dict()
    return {name: d[name] for name in SPEC_FIELDS}


def policy_bind_sources(policy: dict, env) -> tuple:
    """The host paths of the policy's binds (their existence decides optional binds)."""
    binds = policy.get("binds") or ()
    if not binds:
        return ()
    from uctr_batch.launch.policy_cache import expand, path_variables

    variables = None
    out = []
    for b in binds:
        src = b.get("src") or ""
        if "${" in src:
            variables = variables or path_variables(env)
            src = expand(src, variables)
        out.append(src)
    return tuple(out)
