/*
 * Command-line options (pyxis-compatible names plus uctr's own), their UCTR_CONTAINER_*
 * environment defaults and their syntax checks. Only syntax is checked here: whether a
 * mode, an image or a mount is allowed is the site policy's call (prolog / uctr-exec).
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "uctr.h"

struct uctr_args uctr_args = { .writable = -1, .mount_home = -1 };

enum opt_id {
    OPT_IMAGE = 1, OPT_MOUNTS, OPT_WORKDIR, OPT_ENV, OPT_WRITABLE, OPT_READONLY,
    OPT_MOUNT_HOME, OPT_NO_MOUNT_HOME, OPT_MODE, OPT_MPI, OPT_GPU,
};

static void replace(char **slot, const char *value)
{
    /* the callback runs twice in slurmstepd for srun steps: keep it idempotent */
    free(*slot);
    *slot = value ? strdup(value) : NULL;
}

static int on_option(int val, const char *optarg, int remote)
{
    (void)remote;
    switch (val) {
    case OPT_IMAGE: replace(&uctr_args.image, optarg); break;
    case OPT_MOUNTS: replace(&uctr_args.mounts, optarg); break;
    case OPT_WORKDIR: replace(&uctr_args.workdir, optarg); break;
    case OPT_ENV: replace(&uctr_args.env_names, optarg); break;
    case OPT_MODE: replace(&uctr_args.mode, optarg); break;
    case OPT_MPI: replace(&uctr_args.mpi, optarg); break;
    case OPT_GPU: replace(&uctr_args.gpu, optarg); break;
    case OPT_WRITABLE: uctr_args.writable = 1; break;
    case OPT_READONLY: uctr_args.writable = 0; break;
    case OPT_MOUNT_HOME: uctr_args.mount_home = 1; break;
    case OPT_NO_MOUNT_HOME: uctr_args.mount_home = 0; break;
    default: return -1;
    }
    return 0;
}

static struct spank_option options[] = {
    { "container-image", "[REGISTRY/]IMAGE[:TAG|@DIGEST]",
      "[uctr] run each task in this OCI/Docker image (env UCTR_CONTAINER_IMAGE)",
      1, OPT_IMAGE, on_option },
    { "container-mounts", "SRC:DST[:ro|rw],...",
      "[uctr] bind mounts into the container (env UCTR_CONTAINER_MOUNTS)",
      1, OPT_MOUNTS, on_option },
    { "container-workdir", "PATH",
      "[uctr] working directory inside the container (env UCTR_CONTAINER_WORKDIR)",
      1, OPT_WORKDIR, on_option },
    { "container-env", "NAME[,NAME...]",
      "[uctr] host variables that override the image's (env UCTR_CONTAINER_ENV)",
      1, OPT_ENV, on_option },
    { "container-writable", NULL,
      "[uctr] make the container root filesystem writable (env UCTR_CONTAINER_WRITABLE=1)",
      0, OPT_WRITABLE, on_option },
    { "container-readonly", NULL,
      "[uctr] keep the container root filesystem read-only (default)",
      0, OPT_READONLY, on_option },
    { "container-mount-home", NULL,
      "[uctr] bind the home directory into the container (env UCTR_CONTAINER_MOUNT_HOME=1)",
      0, OPT_MOUNT_HOME, on_option },
    { "no-container-mount-home", NULL,
      "[uctr] do not bind the home directory (env UCTR_CONTAINER_MOUNT_HOME=0)",
      0, OPT_NO_MOUNT_HOME, on_option },
    { "container-mode", "MODE",
      "[uctr] execution mode, if the site policy allows it (env UCTR_CONTAINER_MODE)",
      1, OPT_MODE, on_option },
    { "container-mpi", "PROFILE|auto|none",
      "[uctr] host MPI injection profile (env UCTR_CONTAINER_MPI)",
      1, OPT_MPI, on_option },
    { "container-gpu", "auto|nvidia|amd|none",
      "[uctr] GPU injection (env UCTR_CONTAINER_GPU)",
      1, OPT_GPU, on_option },
    SPANK_OPTIONS_TABLE_END
};

int uctr_args_register(spank_t sp)
{
    for (struct spank_option *opt = options; opt->name; opt++) {
        spank_err_t rc = spank_option_register(sp, opt);
        if (rc != ESPANK_SUCCESS) {
            slurm_error(UCTR_PREFIX "cannot register --%s: %s", opt->name, spank_strerror(rc));
            return -1;
        }
    }
    return 0;
}

static void default_string(char **slot, const char *name,
                           int (*get)(void *, const char *, char *, size_t), void *ctx)
{
    char buf[8192];
    if (*slot == NULL && get(ctx, name, buf, sizeof(buf)) && buf[0])
        *slot = strdup(buf);
}

static void default_flag(int *slot, const char *name,
                         int (*get)(void *, const char *, char *, size_t), void *ctx)
{
    char buf[16];
    if (*slot == -1 && get(ctx, name, buf, sizeof(buf)) && buf[0])
        *slot = strcmp(buf, "0") != 0;
}

void uctr_args_env_defaults(int (*get)(void *, const char *, char *, size_t), void *ctx)
{
    default_string(&uctr_args.image, "UCTR_CONTAINER_IMAGE", get, ctx);
    default_string(&uctr_args.mounts, "UCTR_CONTAINER_MOUNTS", get, ctx);
    default_string(&uctr_args.workdir, "UCTR_CONTAINER_WORKDIR", get, ctx);
    default_string(&uctr_args.env_names, "UCTR_CONTAINER_ENV", get, ctx);
    default_string(&uctr_args.mode, "UCTR_CONTAINER_MODE", get, ctx);
    default_string(&uctr_args.mpi, "UCTR_CONTAINER_MPI", get, ctx);
    default_string(&uctr_args.gpu, "UCTR_CONTAINER_GPU", get, ctx);
    default_flag(&uctr_args.writable, "UCTR_CONTAINER_WRITABLE", get, ctx);
    default_flag(&uctr_args.mount_home, "UCTR_CONTAINER_MOUNT_HOME", get, ctx);
}

int uctr_args_any_set(void)
{
    return uctr_args.mounts || uctr_args.workdir || uctr_args.env_names || uctr_args.mode
           || uctr_args.mpi || uctr_args.gpu || uctr_args.writable != -1
           || uctr_args.mount_home != -1;
}

/* ---- syntax checks: each prints one "uctr: --option: why" line and returns -1 ---------- */

static int invalid(const char *opt, const char *value, const char *why)
{
    slurm_error(UCTR_PREFIX "--%s=%s: %s", opt, value, why);
    return -1;
}

static int is_name(const char *s, const char *extra)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && !strchr(extra, *s))
            return 0;
    return 1;
}

static int check_image(const char *v)
{
    if (!*v)
        return invalid("container-image", v, "empty image reference");
    if (v[0] == '-')
        return invalid("container-image", v, "an image reference cannot start with '-'");
    if (strlen(v) > 4096)
        return invalid("container-image", "...", "image reference too long");
    for (const char *p = v; *p; p++)
        if (isspace((unsigned char)*p) || iscntrl((unsigned char)*p))
            return invalid("container-image", v, "image reference contains white space");
    return 0;
}

static int check_mount(const char *entry, const char *whole)
{
    char *copy = strdup(entry);
    char *fields[4] = { NULL };
    int n = 0;
    for (char *tok = strtok(copy, ":"); tok && n < 4; tok = strtok(NULL, ":"))
        fields[n++] = tok;
    int rc = 0;
    if (n == 0 || n > 3)
        rc = invalid("container-mounts", whole, "each mount is SRC:DST[:ro|rw] or PATH");
    else if (fields[0][0] != '/')
        rc = invalid("container-mounts", whole, "mount source must be an absolute path");
    else if (n >= 2 && fields[1][0] != '/')
        rc = invalid("container-mounts", whole, "mount destination must be an absolute path");
    else if (n == 3 && strcmp(fields[2], "ro") && strcmp(fields[2], "rw"))
        rc = invalid("container-mounts", whole, "mount flags must be ro or rw");
    free(copy);
    return rc;
}

static int check_mounts(const char *v)
{
    char *copy = strdup(v);
    int rc = 0;
    char *save = NULL;
    if (!*v)
        rc = invalid("container-mounts", v, "empty mount list");
    for (char *entry = strtok_r(copy, ",", &save); entry && !rc;
         entry = strtok_r(NULL, ",", &save))
        rc = check_mount(entry, v);
    free(copy);
    return rc;
}

static int check_env_names(const char *v)
{
    char *copy = strdup(v);
    int rc = 0;
    char *save = NULL;
    for (char *name = strtok_r(copy, ",", &save); name && !rc; name = strtok_r(NULL, ",", &save))
        if (!is_name(name, "_") || isdigit((unsigned char)name[0]))
            rc = invalid("container-env", v, "expected variable names separated by commas");
    free(copy);
    return rc;
}

int uctr_args_validate(void)
{
    struct uctr_args *a = &uctr_args;
    if (a->image && check_image(a->image))
        return -1;
    if (a->mounts && check_mounts(a->mounts))
        return -1;
    if (a->workdir && a->workdir[0] != '/')
        return invalid("container-workdir", a->workdir, "must be an absolute path");
    if (a->env_names && check_env_names(a->env_names))
        return -1;
    if (a->mode && !is_name(a->mode, "_-"))
        return invalid("container-mode", a->mode, "expected a mode name such as N1 or R1");
    if (a->mpi && !is_name(a->mpi, "_-."))
        return invalid("container-mpi", a->mpi, "expected auto, none or a profile name");
    if (a->gpu && strcmp(a->gpu, "auto") && strcmp(a->gpu, "nvidia") && strcmp(a->gpu, "amd")
        && strcmp(a->gpu, "none"))
        return invalid("container-gpu", a->gpu, "expected auto, nvidia, amd or none");
    return 0;
}
