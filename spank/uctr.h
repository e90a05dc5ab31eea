/*
 * uctr SPANK plugin: shared declarations.
 *
 * Structure (after pyxis): uctr_dispatch.c routes each SPANK callback to the file that owns
 * that context: uctr_client.c (srun/sbatch/salloc), uctr_remote.c (slurmstepd). Options live
 * in uctr_args.c, plugstack.conf arguments in uctr_config.c. The plugin itself stages and
 * runs nothing: the prolog stages the image, `uctr-exec` runs each task in it.
 */
#ifndef UCTR_SPANK_H
#define UCTR_SPANK_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>  /* spank.h uses uint32_t without including it */
#include <slurm/spank.h>

#define UCTR_PREFIX "uctr: "

struct uctr_config {
    char uctr_exec[PATH_MAX];   /* launcher run in front of every task */
    char policy[PATH_MAX];      /* site policy file handed to uctr-exec ("" = its default) */
    char run_dir[PATH_MAX];     /* node-local dir where the prolog records readiness */
    int sbatch_support;         /* register the options in sbatch/salloc */
    int batch_in_container;     /* run the batch script itself in the container */
    int execute_entrypoint;     /* pyxis's key: run the image's entrypoint by default (0) */
    char container_scope[8];    /* pyxis's key: named containers live for the "job" or are
                                   kept across jobs ("global") */
    char resolver[PATH_MAX];    /* `uctr` run at submission to pin IMAGE:tag to a digest */
    int pin_at_submit;          /* 1: pin in sbatch/salloc/srun; 0: the prolog resolves */
    int resolve_timeout;        /* seconds the submission waits for the resolver */
};

/* -1 = not given, 0/1 = given */
struct uctr_args {
    char *image;
    char *mounts;
    char *workdir;
    char *env_names;
    char *mode;
    char *mpi;
    char *gpu;
    int writable;
    int mount_home;
    /* pyxis's options (docs/migration.md) */
    char *name;          /* NAME[:auto|create|exec|no_create|no_exec] */
    char *save;          /* squashfs written at the end of the step */
    int remap_root;
    int entrypoint;
    int entrypoint_log;
    char *unshare;       /* pyxis 0.24 --container-unshare: refused with the reason */
};

extern struct uctr_args uctr_args;

/* uctr_config.c */
int uctr_config_parse(int ac, char **av, struct uctr_config *cfg);

/* uctr_args.c */
int uctr_args_register(spank_t sp);
/* get(ctx, NAME, buf, len) copies NAME's value into buf and returns 1 when it is set */
void uctr_args_env_defaults(int (*get)(void *ctx, const char *name, char *buf, size_t len),
                            void *ctx);
int uctr_args_validate(void);
int uctr_args_any_set(void);

/* uctr_pin.c: IMAGE:tag -> IMAGE@sha256:... once per job, at submission */
#define UCTR_IMAGE_MAX 4096
int uctr_pin_image(const struct uctr_config *cfg, const char *image, char *pinned, size_t len);
int uctr_pinned_for(const char *image, const char *job_pin, const char *job_tag);

/* uctr_client.c */
int uctr_client_post_opt(spank_t sp, const struct uctr_config *cfg);

/* uctr_remote.c */
int uctr_remote_task_init(spank_t sp, const struct uctr_config *cfg);
int uctr_remote_mark_named(spank_t sp, const struct uctr_config *cfg);
/* Slurm >= 23.11: what is prepended to a task's argv, uctr-exec IMAGE -- (the count) */
#define UCTR_PREFIX_MAX 3
int uctr_exec_prefix(const struct uctr_config *cfg, const char *image,
                     const char *prefix[UCTR_PREFIX_MAX]);

/* uctr_join.c: 0 when the task joined its step's running container (setns, cwd, env),
 * 1 when it must go through uctr-exec; errors after joining end the task there */
int uctr_join_task(spank_t sp, const struct uctr_config *cfg, const char *image);

#endif
