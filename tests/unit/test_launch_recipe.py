"""The namespace key of a step's container (launch.recipe.inputs): the same for every rank
of one step on one node, different for another step."""

from uctr_batch.launch import recipe

# What srun --mpi=pmi2 gave the two ranks of one step on one node (Slurm 22.05): TMPDIR
# only for rank 0, and a PMI_FD, a rank and a local id of their own.
RANK0 = {"SLURM_JOB_ID": "218", "SLURM_JOBID": "218", "SLURM_STEP_ID": "0",
         "SLURM_JOB_UID": "1001", "SLURM_CONF": "/etc/slurm/slurm.conf",
         "SLURMD_NODENAME": "node1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
         "PMI_FD": "11", "PMI_RANK": "0", "PMI_SIZE": "2", "PMI_JOBID": "218.0",
         "TMPDIR": "/tmp", "HOME": "/home/u", "USER": "u", "PATH": "/usr/bin:/bin"}
RANK1 = dict(RANK0, SLURM_PROCID="1", SLURM_LOCALID="1", PMI_FD="13", PMI_RANK="1")
del RANK1["TMPDIR"]

IMAGE_PART = ("image part", "/rootfs", "sha256:abc")


def key(env):
    return recipe.digest(recipe.inputs(IMAGE_PART, env))


def test_ranks_of_one_step_get_one_namespace_key():
    assert key(RANK0) == key(RANK1)


def test_another_step_or_pmix_server_gets_another_key():
    assert key(RANK0) != key(dict(RANK0, SLURM_STEP_ID="1"))
    assert key(RANK0) != key(dict(RANK0, PMIX_SERVER_TMPDIR="/spool/node1/pmix.218.1"))


def test_the_key_reads_no_per_rank_variable():
    per_rank = {"TMPDIR", "PMI_FD", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "SLURM_LOCALID",
                "SLURM_TASK_PID", "OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID", "PBS_TASKNUM"}
    assert not per_rank & set(recipe.STEP_ENV + recipe.IMAGE_ENV)


class _Opts:
    volumes, workdir, writable, mount_home, mpi, gpu = (), None, False, True, None, None


class _Image:
    rootfs, manifest_digest = "/rootfs", "sha256:abc"


def image_part(env, policy):
    return recipe.image_inputs(_Opts(), env, _Image(), policy, "/")


def test_a_recipe_is_the_jobs_only_where_a_policy_path_names_the_job():
    """The job's steps still get containers of their own (the namespace key names the
    step); the recipe, the slow part to build, serves every job on the node unless the
    policy puts the job id into a path."""
    plain = {"fingerprint": "f", "binds": [{"src": "/scratch/${USER}", "dst": "/scratch"}]}
    assert image_part(RANK0, plain) == image_part(dict(RANK0, SLURM_JOB_ID="219"), plain)
    assert image_part(RANK0, plain) != image_part({k: v for k, v in RANK0.items()
                                                   if k != "SLURM_JOB_ID"}, plain)  # no job
    assert key(RANK0) != key(dict(RANK0, SLURM_JOBID="219"))
    for name in ("JOB_ID", "SLURM_JOB_ID", "PBS_JOBID"):
        scoped = {"fingerprint": "f", "binds": [{"src": "/scratch/${%s}" % name, "dst": "/s"}]}
        assert recipe.names_the_job(scoped)
        assert image_part(RANK0, scoped) != image_part(dict(RANK0, SLURM_JOB_ID="219"), scoped)
    local = {"fingerprint": "f", "storage": {"local_dir": "/tmp/${USER}-${JOB_ID}"}}
    assert recipe.names_the_job(local) and not recipe.names_the_job(plain)
