/*
 * Remote side (slurmstepd), per task, as the job user, just before execve: when the step
 * has an image (--container-image, a UCTR_CONTAINER_IMAGE default, or Slurm's own
 * --container=IMAGE seen as SLURM_CONTAINER), run the task through uctr-exec.
 *
 * Slurm 22.05 looks argv[0] up in PATH after task_init and execs job->argv, the array
 * S_JOB_ARGV returns, so replacing argv[0] in place is enough; the program the user asked
 * for travels in UCTR_ARGV0. Slurm >= 23.11 has spank_prepend_task_argv for this.
 *
 * If the prolog recorded a user error for this job's image (bad reference, auth, not
 * allowed), the task fails here with that message: failing task_init fails the step and
 * leaves the node alone.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <slurm/slurm.h>

#include "uctr.h"

#define IMAGE_MAX 4096
#define LINE_MAX_ 8192

static int remote_env(void *ctx, const char *name, char *buf, size_t len)
{
    return spank_getenv((spank_t)ctx, name, buf, (int)len) == ESPANK_SUCCESS;
}

static int set_env(spank_t sp, const char *name, const char *value)
{
    if (value == NULL)
        return 0;
    spank_err_t rc = spank_setenv(sp, name, value, 1);
    if (rc != ESPANK_SUCCESS) {
        slurm_error(UCTR_PREFIX "cannot set %s: %s", name, spank_strerror(rc));
        return -1;
    }
    return 0;
}

/* --container-image (or its env default) wins over Slurm's built-in --container; a step
 * with only --container-name runs in that existing container (image "") */
static int step_image(spank_t sp, char *image, size_t len)
{
    if (uctr_args.image) {
        snprintf(image, len, "%s", uctr_args.image);
        return 1;
    }
    if (remote_env(sp, "SLURM_CONTAINER", image, len) && image[0])
        return 1;
    image[0] = '\0';
    return uctr_args.name != NULL;
}

/* the digest the job was pinned to at submission, when IMAGE is the tag it pinned */
static void pinned_image(spank_t sp, char *image, size_t len)
{
    char pin[IMAGE_MAX], tag[IMAGE_MAX];
    if (remote_env(sp, "SLURM_SPANK_UCTR_IMAGE", pin, sizeof(pin))
        && remote_env(sp, "SLURM_SPANK_UCTR_IMAGE_TAG", tag, sizeof(tag))
        && uctr_pinned_for(image, pin, tag))
        snprintf(image, len, "%s", pin);
}

/*
 * Readiness record written by the prolog (uctr_batch/batch/readiness.py): KEY=VALUE lines.
 * Returns -1 (after printing the recorded message) when it holds a user error for IMAGE.
 */
static int check_readiness(const struct uctr_config *cfg, uint32_t job_id, const char *image)
{
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/readiness/%u", cfg->run_dir, job_id);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;  /* no prolog record: uctr-exec stages the image itself */
    char line[LINE_MAX_], message[LINE_MAX_] = "", hint[LINE_MAX_] = "";
    int is_error = 0, same_image = 0;
    while (fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\n")] = '\0';
        if (!strcmp(line, "status=error"))
            is_error = 1;
        else if (!strncmp(line, "image=", 6))
            same_image = !strcmp(line + 6, image);
        else if (!strncmp(line, "message=", 8))
            snprintf(message, sizeof(message), "%s", line + 8);
        else if (!strncmp(line, "hint=", 5))
            snprintf(hint, sizeof(hint), "%s", line + 5);
    }
    fclose(f);
    if (!is_error || !same_image)
        return 0;
    slurm_error(UCTR_PREFIX "%s", message[0] ? message : "the prolog could not stage the image");
    if (hint[0])
        slurm_spank_log(UCTR_PREFIX "hint: %s", hint);
    return -1;
}

static const char *flag(int value)
{
    return value == -1 ? NULL : value ? "1" : "0";
}

/* the batch script lives in slurmd's spool dir: bind it so the container can run it */
static char *mounts_with_script(const char *mounts, const char *script)
{
    size_t len = (mounts ? strlen(mounts) + 1 : 0) + 2 * strlen(script) + 5;
    char *joined = malloc(len);
    if (joined)
        snprintf(joined, len, "%s%s%s:%s:ro", mounts ? mounts : "", mounts ? "," : "",
                 script, script);
    return joined;
}

static int export_settings(spank_t sp, const struct uctr_config *cfg, const char *image,
                           const char *mounts)
{
    const struct uctr_args *a = &uctr_args;
    if (set_env(sp, "UCTR_IMAGE", image[0] ? image : NULL) || set_env(sp, "UCTR_MODE", a->mode)
        || set_env(sp, "UCTR_MPI", a->mpi) || set_env(sp, "UCTR_GPU", a->gpu)
        || set_env(sp, "UCTR_MOUNTS", mounts) || set_env(sp, "UCTR_WORKDIR", a->workdir)
        || set_env(sp, "UCTR_ENV_NAMES", a->env_names)
        || set_env(sp, "UCTR_WRITABLE", flag(a->writable))
        || set_env(sp, "UCTR_MOUNT_HOME", flag(a->mount_home))
        || set_env(sp, "UCTR_RUN_DIR", cfg->run_dir))
        return -1;
    /* pyxis's options; the entrypoint default is plugstack.conf's execute_entrypoint (0) */
    int entrypoint = a->entrypoint != -1 ? a->entrypoint : cfg->execute_entrypoint;
    if (set_env(sp, "UCTR_NAME", a->name) || set_env(sp, "UCTR_SAVE", a->save)
        || set_env(sp, "UCTR_NAME_SCOPE", cfg->container_scope)
        || set_env(sp, "UCTR_REMAP_ROOT", flag(a->remap_root))
        || set_env(sp, "UCTR_ENTRYPOINT", flag(entrypoint))
        || set_env(sp, "UCTR_ENTRYPOINT_LOG", flag(a->entrypoint_log)))
        return -1;
    if (cfg->policy[0] && set_env(sp, "UCTR_POLICY", cfg->policy))
        return -1;
    return 0;
}

int uctr_exec_prefix(const struct uctr_config *cfg, const char *image,
                     const char *prefix[UCTR_PREFIX_MAX])
{
    /* no image (a --container-name step): uctr-exec takes the named container */
    prefix[0] = cfg->uctr_exec;
    prefix[1] = image[0] ? image : "--";
    prefix[2] = "--";
    return image[0] ? 3 : 2;
}

static int wrap_argv(spank_t sp, const struct uctr_config *cfg, const char *image)
{
#if SLURM_VERSION_NUMBER >= SLURM_VERSION_NUM(23, 11, 0)
    const char *prefix[UCTR_PREFIX_MAX];
    spank_err_t rc = spank_prepend_task_argv(sp, uctr_exec_prefix(cfg, image, prefix), prefix);
    if (rc != ESPANK_SUCCESS) {
        slurm_error(UCTR_PREFIX "cannot prepend uctr-exec: %s", spank_strerror(rc));
        return -1;
    }
    return 0;
#else
    (void)image;
    int argc = 0;
    char **argv = NULL;
    spank_err_t rc = spank_get_item(sp, S_JOB_ARGV, &argc, &argv);
    if (rc != ESPANK_SUCCESS || argc < 1 || argv == NULL) {
        slurm_error(UCTR_PREFIX "cannot read the task's command line: %s", spank_strerror(rc));
        return -1;
    }
    if (set_env(sp, "UCTR_ARGV0", argv[0]))
        return -1;
    char *launcher = strdup(cfg->uctr_exec);  /* lives until execve */
    if (launcher == NULL)
        return -1;
    argv[0] = launcher;
    return 0;
#endif
}

static int batch_script(spank_t sp, char *path, size_t len)
{
    int argc = 0;
    char **argv = NULL;
    if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1)
        return 0;
    snprintf(path, len, "%s", argv[0]);
    return 1;
}

int uctr_remote_task_init(spank_t sp, const struct uctr_config *cfg)
{
    uint32_t job_id = 0, step_id = 0;
    if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS
        || spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS)
        return 0;
    if (step_id == SLURM_EXTERN_CONT)
        return 0;
    uctr_args_env_defaults(remote_env, sp);
    char image[IMAGE_MAX];
    if (!step_image(sp, image, sizeof(image)))
        return 0;
    /* defaults taken from the job environment have not been checked on the client */
    if (uctr_args_validate())
        return -1;
    pinned_image(sp, image, sizeof(image));
    if (check_readiness(cfg, job_id, image))
        return -1;
    int is_batch = step_id == SLURM_BATCH_SCRIPT;
    if (is_batch && !cfg->batch_in_container)
        return 0;  /* the script runs on the host so that srun works in it */
    char *mounts = uctr_args.mounts;
    char script[PATH_MAX];
    if (is_batch && batch_script(sp, script, sizeof(script)))
        mounts = mounts_with_script(uctr_args.mounts, script);
    if (export_settings(sp, cfg, image, mounts))
        return -1;
    if (!is_batch && uctr_join_task(sp, cfg, image) == 0)
        return 0;  /* joined the step's container from C: slurmstepd execs the payload */
    return wrap_argv(sp, cfg, image);
}

/*
 * As root, before the task drops privileges: a step with --container-name or
 * --container-save leaves <run_dir>/containers/<job id>, so that the epilog knows to remove
 * the job's named containers even when the job itself asked for no image (srun-only
 * containers). Never fails the step: without the marker a container is only left behind.
 */
int uctr_remote_mark_named(spank_t sp, const struct uctr_config *cfg)
{
    uint32_t job_id = 0, step_id = 0;
    if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS
        || spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS
        || step_id == SLURM_EXTERN_CONT)
        return 0;
    uctr_args_env_defaults(remote_env, sp);
    if (uctr_args.name == NULL && uctr_args.save == NULL)
        return 0;
    char path[PATH_MAX + 64];
    if (mkdir(cfg->run_dir, 0755) && errno != EEXIST)
        return 0;
    snprintf(path, sizeof(path), "%s/containers", cfg->run_dir);
    if (mkdir(path, 0755) && errno != EEXIST)
        return 0;
    snprintf(path, sizeof(path), "%s/containers/%u", cfg->run_dir, job_id);
    int fd = open(path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd >= 0)
        close(fd);
    return 0;
}
