"""The container's host injection: PMI/PMIx always, host MPI per --mpi, GPUs per --gpu.

Two parts, because they change at different rates (planners: uctr_batch.inject):
  * the image part, part of the cached container recipe (launch.recipe), recomputed when
    the image, the host, the policy or the GPU allocation changes:
      - mpi_plan depends only on the image, the host and the policy; it is also cached
        beside the rootfs in <bundle>/injection/mpi-<key>.json (slow: ELF and ld caches);
      - gpu_plan: the step's devices and driver libraries; its visibility variables are
        per rank, so every rank computes only those (gpu_env);
  * the step part, pmi_plan, from the launcher's environment: the PMIx server's and
    Slurm's per-step directories change with every step, so the rank that sets up a step's
    container computes it (cheap) and merges it in front of the image part.
The merged plan is the injection manifest, written beside the rootfs
(<bundle>/rootfs.injection.json) and printed with --verbose.
"""

import os
import sys
import zlib

from uctr_batch.errors import UctrError
from uctr_batch.launch import procspec

LDCACHE = "/etc/ld.so.cache"


def plan_image(staged, policy: dict, env, *, mpi=None, gpu=None, app=()):
    """(mpi+gpu plan, gpu plan). Raises UctrError when the plan has errors (a refused swap
    with mpi.fallback false, a CUDA runtime the driver cannot run with cuda_check error)."""
    from uctr_batch.envspec import parse_image_env
    from uctr_batch.inject import gpu_plan

    plan = cached_mpi_plan(staged, policy, mpi, app)
    image_env = parse_image_env(staged.config.get("Env") or [])
    gplan = gpu_plan(env, staged.rootfs, gpu, "/", image_env, policy)
    plan.merge(gplan)
    _check(plan, staged)
    return plan, gplan


def gpu_vendor(gplan):
    """The vendor a GPU plan injected devices or libraries for, else None."""
    if not (gplan.devices or gplan.binds):
        return None
    return (gplan.info.get("gpu") or {}).get("vendor")


def plan_step(staged, image_plan: dict, policy: dict, env):
    """(the whole plan of a step, its PMI part): pmi_plan for this launcher environment,
    then the image part (image_plan: InjectionPlan.to_dict()), merged in the order of
    inject.build_plan."""
    from uctr_batch.inject import InjectionPlan, pmi_plan

    pmi = pmi_plan(env, "/", policy, image_root=staged.rootfs)
    plan = InjectionPlan.from_dict(pmi.to_dict()).merge(InjectionPlan.from_dict(image_plan))
    _check(plan, staged)
    return plan, pmi


def _check(plan, staged) -> None:
    if plan.errors:
        raise UctrError("cannot inject into %s: %s" % (staged.image, "; ".join(plan.errors)),
                        "see the injection manifest: %s" % manifest_path(staged))


def plan_binds(plan):
    """(src, dst, ro) to bind; a device wanted at another path is a bind too."""
    out = plan.bind_tuples()
    out += [(d.src, d.dst, False) for d in plan.devices if d.src != d.dst]
    return out


def plan_devices(plan):
    return [d.src for d in plan.devices if d.src == d.dst]


def extras(plan, gpu_env_keys, vendor) -> dict:
    """What every rank of the step applies to its environment (the step record): the
    plan's environment without the GPU visibility variables, which each rank computes for
    itself (gpu_env), the launcher variables to keep, and the GPU vendor."""
    from uctr_batch.inject.pmi import PASSTHROUGH_PREFIXES

    ops = procspec.ops_of(plan)
    for key in gpu_env_keys:
        ops["env"].pop(key, None)
    return {"ops": ops, "passthrough_prefixes": list(PASSTHROUGH_PREFIXES),
            "passthrough_names": list(plan.passthrough_env), "gpu_vendor": vendor}


def gpu_env(env, vendor, policy) -> dict:
    """A joining rank's own GPU visibility variables (renumbered inside)."""
    if not vendor:
        return {}
    from uctr_batch.inject import gpu_plan

    return dict(gpu_plan(env, None, vendor, "/", None, policy).env)


# -- the MPI plan cache ---------------------------------------------------------------------

def mpi_profile(policy: dict, requested):
    return requested or (policy.get("mpi") or {}).get("profile") or "none"


def cached_mpi_plan(staged, policy: dict, requested, app):
    """mpi_plan for this image, from <bundle>/injection/ when the inputs are unchanged."""
    from uctr_batch.inject import InjectionPlan, mpi_plan

    profile = mpi_profile(policy, requested)
    if profile == "none":
        return mpi_plan(staged.rootfs, "none", policy, "/", app)
    path = os.path.join(staged.bundle, "injection", "mpi-%s.json" % _mpi_key(policy, profile, app))
    try:
        return InjectionPlan.read(path)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    plan = mpi_plan(staged.rootfs, profile, policy, "/", app)
    try:
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        plan.write(path)
    except OSError:
        pass  # only a cache
    return plan


def _mpi_key(policy: dict, profile: str, app) -> str:
    try:
        st = os.stat(LDCACHE)
        ldcache = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        ldcache = None
    data = repr((profile, policy.get("fingerprint"), policy.get("mpi_profiles"),
                 tuple(app), ldcache, sys.version_info[:2])).encode()
    return "%08x%08x" % (zlib.crc32(data), zlib.adler32(data))


# -- the manifest -----------------------------------------------------------------------------

def manifest_path(staged) -> str:
    from uctr_batch.inject import default_plan_path

    return default_plan_path(staged.rootfs)


def write_manifest(staged, plan) -> str:
    path = manifest_path(staged)
    plan.write(path)
    return path


def app_inside(rootfs: str, argv0: str, image_env) -> tuple:
    """The container path of the command's executable, if it is a file in the image (its
    DT_NEEDED tells which MPI the application links)."""
    from uctr_batch.modes.base import resolve_command

    try:
        host = resolve_command(argv0, image_env, rootfs)
    except UctrError:
        return ()
    real = os.path.realpath(host)
    root = os.path.realpath(rootfs)
    if not real.startswith(root + "/") or not os.path.isfile(real):
        return ()
    return (real[len(root):],)
