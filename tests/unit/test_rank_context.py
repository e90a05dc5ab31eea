"""Rank context from each launcher's environment (table-driven)."""

import pytest

from uctr_batch.launch import rank

CASES = [
    ("srun --mpi=pmix", {
        "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "42", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "PMIX_RANK": "3", "PMIX_NAMESPACE": "slurm.pmix.42.0",
    }, ("slurm", 3, 4, 1, 2, "42.0")),
    ("srun uneven nodes", {
        "SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "2", "SLURM_STEP_ID": "1",
        "SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
    }, ("slurm", 4, 5, 0, 1, "7.1")),
    ("mpirun (Open MPI) inside a Slurm job", {
        "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "SLURM_JOB_ID": "9", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0",
    }, ("ompi", 2, 4, 0, 2, "9.0")),
    ("MPICH hydra", {
        "PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4",
    }, ("hydra", 1, 4, 1, 4, None)),
    ("srun --mpi=pmi2 (PMI_FD)", {
        "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "2", "SLURM_JOB_ID": "5",
        "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "PMI_FD": "7",
        "PMI_RANK": "1", "PMI_SIZE": "2",
    }, ("slurm", 1, 2, 1, 2, "5.2")),
    ("bare PMIx server", {"PMIX_RANK": "0", "PMIX_NAMESPACE": "prterun-x-1"},
     ("pmix", 0, 1, 0, None, None)),
    ("PALS", {"PALS_RANKID": "5", "PALS_LOCAL_RANKID": "1", "PALS_NODEID": "2", "PMI_SIZE": "8",
              "PBS_JOBID": "12.pbs"}, ("pals", 5, 8, 1, None, "12.pbs.x")),
    ("PBS task", {"PBS_JOBID": "13.srv", "PBS_TASKNUM": "2"}, ("pbs", 1, 1, 0, None, "13.srv.2")),
    ("plain shell", {}, ("single", 0, 1, 0, 1, None)),
]


@pytest.mark.parametrize("name,env,expected", CASES, ids=[c[0] for c in CASES])
def test_detect(name, env, expected):
    launcher, rk, size, local_rank, local_size, step_key = expected
    ctx = rank.detect(env)
    assert (ctx.launcher, ctx.rank, ctx.size, ctx.local_rank, ctx.local_size) == (
        launcher, rk, size, local_rank, local_size)
    if step_key is not None:
        assert ctx.step_key == step_key
    assert ctx.hostname


def test_ranks_of_one_step_share_a_key_and_other_steps_do_not():
    base = {"SLURM_JOB_ID": "1", "SLURM_STEP_TASKS_PER_NODE": "2"}
    a = rank.detect({**base, "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"})
    b = rank.detect({**base, "SLURM_PROCID": "1", "SLURM_STEP_ID": "0"})
    c = rank.detect({**base, "SLURM_PROCID": "0", "SLURM_STEP_ID": "1"})
    assert a.step_key == b.step_key != c.step_key
