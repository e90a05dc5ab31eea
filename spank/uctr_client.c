/*
 * Client side (srun = local context, sbatch/salloc = allocator context): fill in the
 * UCTR_CONTAINER_* defaults, check the syntax of every option, and hand the values to the
 * job. spank_job_control_setenv(NAME) reaches the Prolog/Epilog as SPANK_NAME and the batch
 * script as SLURM_SPANK_NAME; the option values themselves reach slurmstepd on their own.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "uctr.h"

static int client_env(void *ctx, const char *name, char *buf, size_t len)
{
    (void)ctx;
    const char *value = getenv(name);
    if (value == NULL)
        return 0;
    snprintf(buf, len, "%s", value);
    return 1;
}

static int hand_over(spank_t sp, const char *name, const char *value)
{
    if (value == NULL)
        return 0;
    spank_err_t rc = spank_job_control_setenv(sp, name, value, 1);
    if (rc != ESPANK_SUCCESS) {
        slurm_error(UCTR_PREFIX "cannot pass %s to the job: %s", name, spank_strerror(rc));
        return -1;
    }
    return 0;
}

static const char *flag(int value)
{
    return value == -1 ? NULL : value ? "1" : "0";
}

/*
 * A relative squashfs path (pyxis: an image starting with '.') means the submitter's
 * directory; the prolog, which stages SPANK_UCTR_IMAGE, runs elsewhere: give it the
 * absolute path. The tasks resolve the option itself from their own working directory.
 */
static const char *for_prolog(const char *image, char *buf, size_t len)
{
    char cwd[PATH_MAX];
    if (image == NULL || image[0] != '.' || getcwd(cwd, sizeof(cwd)) == NULL)
        return image;
    if ((size_t)snprintf(buf, len, "%s/%s", cwd, image) >= len)
        return image;
    return buf;
}

int uctr_client_post_opt(spank_t sp, const struct uctr_config *cfg)
{
    (void)cfg;
    uctr_args_env_defaults(client_env, NULL);
    if (uctr_args_validate())
        return -1;
    const struct uctr_args *a = &uctr_args;
    /* names match uctr-exec's environment contract, so the prolog sees SPANK_UCTR_IMAGE... */
    char absolute[PATH_MAX + 4096];
    if (hand_over(sp, "UCTR_IMAGE", for_prolog(a->image, absolute, sizeof(absolute)))
        || hand_over(sp, "UCTR_MODE", a->mode)
        || hand_over(sp, "UCTR_MPI", a->mpi) || hand_over(sp, "UCTR_GPU", a->gpu)
        || hand_over(sp, "UCTR_MOUNTS", a->mounts) || hand_over(sp, "UCTR_WORKDIR", a->workdir)
        || hand_over(sp, "UCTR_ENV_NAMES", a->env_names)
        || hand_over(sp, "UCTR_WRITABLE", flag(a->writable))
        || hand_over(sp, "UCTR_MOUNT_HOME", flag(a->mount_home))
        || hand_over(sp, "UCTR_NAME", a->name) || hand_over(sp, "UCTR_SAVE", a->save)
        || hand_over(sp, "UCTR_REMAP_ROOT", flag(a->remap_root))
        || hand_over(sp, "UCTR_ENTRYPOINT", flag(a->entrypoint)))
        return -1;
    return 0;
}
