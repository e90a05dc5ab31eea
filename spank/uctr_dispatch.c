/*
 * Entry points: route each SPANK callback to the file that owns its context, nothing else.
 *
 *   srun (local), sbatch/salloc (allocator)  -> uctr_client.c
 *   slurmstepd (remote)                      -> uctr_remote.c
 *
 * Container errors are reported from task_init only: a failing user_init or job_prolog
 * drains the node (SchedMD bug 7573), a failing task_init fails just the step.
 */
#include "uctr.h"

SPANK_PLUGIN(uctr, 1);

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
