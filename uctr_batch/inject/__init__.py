"""Host library, device and PMI injection: (host root, image rootfs, env, policy) -> plan.

Everything here is pure computation over files; nothing is mounted or executed. The launcher
applies the resulting InjectionPlan through its mode's binds and environment. Standard
library only, so the per-rank path stays lean.

    pmi_plan(env, host_root="/", policy=None)                          per rank/step
    mpi_plan(rootfs, profile=None, policy=None, host_root="/", app=())  per node+image (cacheable)
    gpu_plan(env, rootfs=None, vendor=None, host_root="/", image_env=None, policy=None)
    build_plan(...)                                                      all three, merged
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see plan.py)

from _collections_abc import Mapping, Sequence  # not collections.abc: see plan.py

from uctr_batch.inject.plan import (
    BIN_DIR,
    LIB_DIR,
    Bind,
    Device,
    InjectionPlan,
    ManifestEntry,
    default_plan_path,
)

# The planners load on first use: a rank that only reads a cached plan imports plan.py alone.
_LAZY = {
    "pmi_plan": "uctr_batch.inject.pmi",
    "mpi_plan": "uctr_batch.inject.mpi",
    "gpu_plan": "uctr_batch.inject.gpu",
}

__all__ = [
    "BIN_DIR",
    "LIB_DIR",
    "Bind",
    "Device",
    "InjectionPlan",
    "ManifestEntry",
    "build_plan",
    "default_plan_path",
    "gpu_plan",
    "mpi_plan",
    "pmi_plan",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(__import__(_LAZY[name], fromlist=[name]), name)  # not importlib: 1 ms
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def build_plan(
    rootfs: str,
    env: Mapping[str, str],
    policy=None,
    host_root: str = "/",
    mpi: str | None = None,
    gpu: str | None = None,
    app: Sequence[str] = (),
    image_env: Mapping[str, str] | None = None,
    mpi_cached: InjectionPlan | None = None,
) -> InjectionPlan:
    """PMI + MPI + GPU plans for one rank, merged in that order. mpi/gpu: the --mpi/--gpu
    values, None for the policy's (mpi.profile, gpu.vendor). mpi_cached: a plan from mpi_plan
    computed earlier for this node and image (staging), used instead of recomputing."""
    from uctr_batch.inject.gpu import gpu_plan
    from uctr_batch.inject.mpi import mpi_plan
    from uctr_batch.inject.pmi import pmi_plan

    plan = pmi_plan(env, host_root, policy)
    plan.merge(
        mpi_cached if mpi_cached is not None else mpi_plan(rootfs, mpi, policy, host_root, app)
    )
    plan.merge(gpu_plan(env, rootfs, gpu, host_root, image_env, policy))
    return plan
