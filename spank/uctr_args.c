/*
 * Command-line options (pyxis-compatible names plus uctr's own), their UCTR_CONTAINER_*
 * environment defaults and their syntax checks. Only syntax is checked here: whether a
 * mode, an image or a mount is allowed is the site policy's call (prolog / uctr-exec).
 *
 * Every pyxis option exists with pyxis's meaning (docs/migration.md, checked against this
 * table by tests/unit/test_migration_doc.py). Defaults, first found wins: the option, then
 * UCTR_CONTAINER_<NAME>, then pyxis's PYXIS_CONTAINER_<NAME>. No option is called
 * "container" or "runtime": Slurm owns those names.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "uctr.h"

struct uctr_args uctr_args = { .writable = -1, .mount_home = -1, .remap_root = -1,
                               .entrypoint = -1, .entrypoint_log = -1 };

/* a malformed boolean environment default, reported by uctr_args_validate */
static char env_error[160];

enum opt_id {
    OPT_IMAGE = 1, OPT_MOUNTS, OPT_WORKDIR, OPT_ENV, OPT_WRITABLE, OPT_READONLY,
    OPT_MOUNT_HOME, OPT_NO_MOUNT_HOME, OPT_MODE, OPT_MPI, OPT_GPU,
    OPT_NAME, OPT_SAVE, OPT_REMAP_ROOT, OPT_NO_REMAP_ROOT, OPT_ENTRYPOINT, OPT_NO_ENTRYPOINT,
    OPT_ENTRYPOINT_LOG, OPT_UNSHARE,
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
    case OPT_NAME: replace(&uctr_args.name, optarg); break;
    case OPT_SAVE: replace(&uctr_args.save, optarg); break;
    case OPT_REMAP_ROOT: uctr_args.remap_root = 1; break;
    case OPT_NO_REMAP_ROOT: uctr_args.remap_root = 0; break;
    case OPT_ENTRYPOINT: uctr_args.entrypoint = 1; break;
    case OPT_NO_ENTRYPOINT: uctr_args.entrypoint = 0; break;
    case OPT_ENTRYPOINT_LOG: uctr_args.entrypoint_log = 1; break;
    case OPT_UNSHARE: replace(&uctr_args.unshare, optarg); break;
    default: return -1;
    }
    return 0;
}

static struct spank_option options[] = {
    { "container-image", "[USER@][REGISTRY#|REGISTRY/]IMAGE[:TAG|@DIGEST]|PATH.sqsh|PATH.sif",
      "[uctr] run each task in this OCI/Docker image, squashfs file or Apptainer image "
      "(.sif: mode S1) (env UCTR_CONTAINER_IMAGE)",
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
    { "container-name", "NAME[:auto|create|exec|no_create|no_exec]",
      "[uctr] named writable container reused by later steps (env UCTR_CONTAINER_NAME)",
      1, OPT_NAME, on_option },
    { "container-save", "PATH",
      "[uctr] save the container as a squashfs file when the step ends "
      "(env UCTR_CONTAINER_SAVE)",
      1, OPT_SAVE, on_option },
    { "container-remap-root", NULL,
      "[uctr] be uid 0 inside the container, mapped to you (env UCTR_CONTAINER_REMAP_ROOT=1)",
      0, OPT_REMAP_ROOT, on_option },
    { "no-container-remap-root", NULL,
      "[uctr] keep your own uid inside the container (default)",
      0, OPT_NO_REMAP_ROOT, on_option },
    { "container-entrypoint", NULL,
      "[uctr] run the image's entrypoint (env UCTR_CONTAINER_ENTRYPOINT=1)",
      0, OPT_ENTRYPOINT, on_option },
    { "no-container-entrypoint", NULL,
      "[uctr] do not run the image's entrypoint (default, as in pyxis)",
      0, OPT_NO_ENTRYPOINT, on_option },
    { "container-entrypoint-log", NULL,
      "[uctr] show the entrypoint's output (always: it is the task's own)",
      0, OPT_ENTRYPOINT_LOG, on_option },
    { "container-unshare", "net,ipc,uts",
      "[uctr] pyxis 0.24's option; refused: tasks share the host's network, IPC and UTS",
      1, OPT_UNSHARE, on_option },
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

/*
 * UCTR_CONTAINER_<suffix>, else pyxis's PYXIS_CONTAINER_<suffix>. The names, in full:
 * UCTR_CONTAINER_IMAGE MOUNTS WORKDIR ENV MODE MPI GPU NAME SAVE WRITABLE READONLY MOUNT_HOME
 * REMAP_ROOT ENTRYPOINT ENTRYPOINT_LOG, i.e. UCTR_CONTAINER_NAME, UCTR_CONTAINER_SAVE,
 * UCTR_CONTAINER_READONLY, UCTR_CONTAINER_REMAP_ROOT, UCTR_CONTAINER_ENTRYPOINT,
 * UCTR_CONTAINER_ENTRYPOINT_LOG, UCTR_CONTAINER_UNSHARE, and the same with PYXIS_.
 */
static int get_default(const char *suffix, char *buf, size_t len,
                       int (*get)(void *, const char *, char *, size_t), void *ctx,
                       char *which, size_t which_len)
{
    static const char *prefixes[] = { "UCTR_CONTAINER_", "PYXIS_CONTAINER_" };
    for (size_t i = 0; i < sizeof(prefixes) / sizeof(prefixes[0]); i++) {
        snprintf(which, which_len, "%s%s", prefixes[i], suffix);
        if (get(ctx, which, buf, len) && buf[0])
            return 1;
    }
    return 0;
}

static void default_string(char **slot, const char *suffix,
                           int (*get)(void *, const char *, char *, size_t), void *ctx)
{
    char buf[8192], which[64];
    if (*slot == NULL && get_default(suffix, buf, sizeof(buf), get, ctx, which, sizeof(which)))
        *slot = strdup(buf);
}

/* pyxis's booleans: 1/true/yes/y/on and 0/false/no/n/off; anything else is an error */
static int parse_bool(const char *v)
{
    static const char *yes[] = { "1", "true", "yes", "y", "on" };
    static const char *no[] = { "0", "false", "no", "n", "off" };
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        if (!strcasecmp(v, yes[i]))
            return 1;
        if (!strcasecmp(v, no[i]))
            return 0;
    }
    return -1;
}

static void default_flag_inv(int *slot, const char *suffix, int invert,
                             int (*get)(void *, const char *, char *, size_t), void *ctx)
{
    char buf[16], which[64];
    if (*slot != -1 || !get_default(suffix, buf, sizeof(buf), get, ctx, which, sizeof(which)))
        return;
    int value = parse_bool(buf);
    if (value < 0) {
        snprintf(env_error, sizeof(env_error), "%s=%s: expected 1/true/yes or 0/false/no",
                 which, buf);
        return;
    }
    *slot = invert ? !value : value;
}

static void default_flag(int *slot, const char *suffix,
                         int (*get)(void *, const char *, char *, size_t), void *ctx)
{
    default_flag_inv(slot, suffix, 0, get, ctx);
}

void uctr_args_env_defaults(int (*get)(void *, const char *, char *, size_t), void *ctx)
{
    default_string(&uctr_args.image, "IMAGE", get, ctx);
    default_string(&uctr_args.mounts, "MOUNTS", get, ctx);
    default_string(&uctr_args.workdir, "WORKDIR", get, ctx);
    default_string(&uctr_args.env_names, "ENV", get, ctx);
    default_string(&uctr_args.mode, "MODE", get, ctx);
    default_string(&uctr_args.mpi, "MPI", get, ctx);
    default_string(&uctr_args.gpu, "GPU", get, ctx);
    default_string(&uctr_args.name, "NAME", get, ctx);
    default_string(&uctr_args.save, "SAVE", get, ctx);
    default_string(&uctr_args.unshare, "UNSHARE", get, ctx);
    default_flag(&uctr_args.writable, "WRITABLE", get, ctx);
    default_flag_inv(&uctr_args.writable, "READONLY", 1, get, ctx);
    default_flag(&uctr_args.mount_home, "MOUNT_HOME", get, ctx);
    default_flag(&uctr_args.remap_root, "REMAP_ROOT", get, ctx);
    default_flag(&uctr_args.entrypoint, "ENTRYPOINT", get, ctx);
    default_flag(&uctr_args.entrypoint_log, "ENTRYPOINT_LOG", get, ctx);
}

int uctr_args_any_set(void)
{
    return uctr_args.mounts || uctr_args.workdir || uctr_args.env_names || uctr_args.mode
           || uctr_args.mpi || uctr_args.gpu || uctr_args.writable != -1
           || uctr_args.mount_home != -1 || uctr_args.name || uctr_args.save
           || uctr_args.remap_root != -1 || uctr_args.entrypoint != -1
           || uctr_args.entrypoint_log != -1 || uctr_args.unshare;
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

/* pyxis's flags joined by '+'; uctr honours these (ro/rw; binds are recursive and private
 * anyway; mount points are created; nosuid/nodev hold in an unprivileged container) and
 * refuses the others rather than ignore them */
static int check_mount_flags(const char *flags, const char *whole)
{
    static const char *known[] = { "ro", "rw", "rbind", "bind", "rprivate", "private",
                                   "nosuid", "nodev", "x-create=auto", "x-create=dir",
                                   "x-create=file" };
    char *copy = strdup(flags), *save = NULL;
    int rc = 0;
    for (char *f = strtok_r(copy, "+", &save); f && !rc; f = strtok_r(NULL, "+", &save)) {
        size_t i = 0;
        while (i < sizeof(known) / sizeof(known[0]) && strcmp(f, known[i]))
            i++;
        if (i == sizeof(known) / sizeof(known[0]))
            rc = invalid("container-mounts", whole,
                         "uctr supports the mount flags ro, rw, rbind, rprivate, nosuid, "
                         "nodev and x-create only (see docs/migration.md)");
    }
    free(copy);
    return rc;
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
        rc = invalid("container-mounts", whole, "each mount is SRC:DST[:FLAGS] or PATH");
    else if (!strcmp(fields[0], "tmpfs") || !strcmp(fields[0], "umount"))
        rc = invalid("container-mounts", whole,
                     "tmpfs and umount sources are not supported by uctr (bind a directory)");
    else if (fields[0][0] != '/' && fields[0][0] != '.')
        rc = invalid("container-mounts", whole,
                     "mount source must be an absolute path or start with ./");
    else if (n >= 2 && fields[1][0] != '/')
        rc = invalid("container-mounts", whole, "mount destination must be an absolute path");
    else if (n == 3)
        rc = check_mount_flags(fields[2], whole);
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

/* pyxis's --container-name: NAME[:FLAG]; the name becomes a directory name on the node */
static int check_name(const char *v)
{
    const char *colon = strchr(v, ':');
    size_t len = colon ? (size_t)(colon - v) : strlen(v);
    const char *flag = colon ? colon + 1 : "auto";
    static const char *flags[] = { "auto", "create", "exec", "no_create", "no_exec", "" };
    if (len == 0 || len > 64 || !isalnum((unsigned char)v[0]))
        return invalid("container-name", v, "a name is 1-64 letters, digits, '_', '.' or '-'");
    for (size_t i = 0; i < len; i++)
        if (!isalnum((unsigned char)v[i]) && !strchr("_.-", v[i]))
            return invalid("container-name", v, "a name is 1-64 letters, digits, '_', '.' or '-'");
    for (size_t i = 0; i < sizeof(flags) / sizeof(flags[0]); i++)
        if (!strcmp(flag, flags[i]))
            return 0;
    return invalid("container-name", v,
                   "the flag after ':' is auto, create, exec, no_create or no_exec");
}

int uctr_args_validate(void)
{
    struct uctr_args *a = &uctr_args;
    if (env_error[0]) {
        slurm_error(UCTR_PREFIX "%s", env_error);
        return -1;
    }
    if (a->name && check_name(a->name))
        return -1;
    if (a->unshare)
        return invalid("container-unshare", a->unshare,
                       "not supported: uctr runs tasks in the host's network, IPC and UTS "
                       "namespaces, which MPI and the fabric need (see docs/migration.md)");
    if (a->save && (!a->save[0] || a->save[strlen(a->save) - 1] == '/'))
        return invalid("container-save", a->save, "target is a directory; name a file");
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
