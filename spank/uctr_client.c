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

/*
 * The image every node and step of this job uses: the job's own pin for an srun inside
 * sbatch/salloc (SLURM_SPANK_UCTR_IMAGE*), else IMAGE:tag resolved now (uctr_pin.c). The
 * pin also goes into this client's environment, which srun passes to its tasks and salloc
 * to its shell (sbatch's batch script gets SLURM_SPANK_* from the job control env).
 */
static int pin(const struct uctr_config *cfg, const char *image, char *pinned, size_t len)
{
    const char *job_pin = getenv("SLURM_SPANK_UCTR_IMAGE");
    if (uctr_pinned_for(image, job_pin, getenv("SLURM_SPANK_UCTR_IMAGE_TAG"))) {
        snprintf(pinned, len, "%s", job_pin);
        return 0;
    }
    if (uctr_pin_image(cfg, image, pinned, len))
        return -1;
    if (strcmp(pinned, image)) {
        setenv("SLURM_SPANK_UCTR_IMAGE", pinned, 1);
        setenv("SLURM_SPANK_UCTR_IMAGE_TAG", image, 1);
    }
    return 0;
}

int uctr_client_post_opt(spank_t sp, const struct uctr_config *cfg)
{
    uctr_args_env_defaults(client_env, NULL);
    if (uctr_args_validate())
        return -1;
    const struct uctr_args *a = &uctr_args;
    char pinned[UCTR_IMAGE_MAX] = "";
    if (a->image && pin(cfg, a->image, pinned, sizeof(pinned)))
        return -1;
    /* the tag stays for display; the prolog and the steps use the digest */
    if (a->image && strcmp(pinned, a->image) && hand_over(sp, "UCTR_IMAGE_TAG", a->image))
        return -1;
    /* names match uctr-exec's environment contract, so the prolog sees SPANK_UCTR_IMAGE... */
    char absolute[PATH_MAX + 4096];
    if (hand_over(sp, "UCTR_IMAGE",
                  a->image ? for_prolog(pinned, absolute, sizeof(absolute)) : NULL)
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
    /* Slurm's --container is in the job record only, so without this the prolog of every
     * node of every job asks the controller for it (one RPC per node per job). The client
     * sees the option as SLURM_CONTAINER (set from --container before this callback). */
    const char *container = getenv("SLURM_CONTAINER");
    if (!a->image && !(container && container[0]) && hand_over(sp, "UCTR_NO_IMAGE", "1"))
        return -1;
    return 0;
}
