/*
 * Entry points: route each SPANK callback to the file that owns its context, nothing else.
 *
 *   srun (local), sbatch/salloc (allocator)  -> uctr_client.c
 *   slurmstepd (remote)                      -> uctr_remote.c
 *
 * Container errors are reported from task_init only: a failing user_init or job_prolog
 * drains the node (SchedMD bug 7573), a failing task_init fails just the step.
 */
#include <slurm/slurm_errno.h>
#include <slurm/slurm_version.h>

#include "uctr.h"

SPANK_PLUGIN(uctr, 1);

#if SLURM_VERSION_NUMBER >= SLURM_VERSION_NUM(25, 5, 0)
/* Slurm >= 25.05 lets a plugin choose what a failing slurm_spank_init does; the default
 * drains the node. Ours fails only on a bad plugstack.conf argument or an option Slurm
 * refuses, which every job on every node would hit: fail the job, keep the node. */
int slurm_spank_init_failure_mode = ESPANK_JOB_FAILURE;
#endif

static struct uctr_config config;

int slurm_spank_init(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();
    if (ctx != S_CTX_LOCAL && ctx != S_CTX_ALLOCATOR && ctx != S_CTX_REMOTE)
        return 0;
    if (uctr_config_parse(ac, av, &config))
        return -1;
    if (ctx == S_CTX_ALLOCATOR && !config.sbatch_support)
        return 0;
    return uctr_args_register(sp);
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
    (void)ac;
    (void)av;
    spank_context_t ctx = spank_context();
    if (ctx == S_CTX_LOCAL || (ctx == S_CTX_ALLOCATOR && config.sbatch_support))
        return uctr_client_post_opt(sp, &config);
    return 0;
}

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
    (void)ac;
    (void)av;
    if (!spank_remote(sp))
        return 0;
    return uctr_remote_mark_named(sp, &config);
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
    (void)ac;
    (void)av;
    if (!spank_remote(sp))
        return 0;
    return uctr_remote_task_init(sp, &config);
}
