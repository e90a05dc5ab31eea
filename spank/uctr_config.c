/*
 * plugstack.conf arguments:
 *
 *   required /usr/local/lib/uctr/uctr_spank.so uctr_exec=/usr/local/bin/uctr-exec \
 *            policy=/etc/uctr/policy.yaml sbatch_support=1 batch_in_container=0 \
 *            execute_entrypoint=0 container_scope=job
 *
 * execute_entrypoint and container_scope are pyxis's keys with pyxis's meaning; the default
 * scope is "job" (the epilog removes a job's named containers), "global" keeps them.
 *
 * Parsed in every callback that needs them: slurmd's job_prolog process never calls
 * slurm_spank_init, so no state from init can be relied on.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "uctr.h"

static int set_path(char *dst, const char *key, const char *value)
{
    if (value[0] != '/') {
        slurm_error(UCTR_PREFIX "plugstack.conf: %s must be an absolute path: %s", key, value);
        return -1;
    }
    if (strlen(value) >= PATH_MAX) {
        slurm_error(UCTR_PREFIX "plugstack.conf: %s is too long", key);
        return -1;
    }
    strcpy(dst, value);
    return 0;
}

static int set_bool(int *dst, const char *key, const char *value)
{
    if (!strcmp(value, "1") || !strcmp(value, "true") || !strcmp(value, "yes")) {
        *dst = 1;
    } else if (!strcmp(value, "0") || !strcmp(value, "false") || !strcmp(value, "no")) {
        *dst = 0;
    } else {
        slurm_error(UCTR_PREFIX "plugstack.conf: %s must be 0 or 1, not %s", key, value);
        return -1;
    }
    return 0;
}

static void set_defaults(struct uctr_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    /* a bare name is found through the task's PATH: 22.05 resolves argv[0] after task_init */
    strcpy(cfg->uctr_exec, "uctr-exec");
    strcpy(cfg->run_dir, "/run/uctr");
    cfg->sbatch_support = 1;
    cfg->batch_in_container = 0;
    cfg->execute_entrypoint = 0;  /* pyxis's default */
    strcpy(cfg->container_scope, "job");
    strcpy(cfg->resolver, "uctr");  /* found through the submitting user's PATH */
    cfg->pin_at_submit = 1;
    cfg->resolve_timeout = 30;
}

static int set_scope(char *dst, const char *value)
{
    if (strcmp(value, "job") && strcmp(value, "global")) {
        slurm_error(UCTR_PREFIX "plugstack.conf: container_scope must be job or global, not %s",
                    value);
        return -1;
    }
    strcpy(dst, value);
    return 0;
}

static int set_pin(int *dst, const char *value)
{
    if (!strcmp(value, "submit") || !strcmp(value, "prolog")) {
        *dst = !strcmp(value, "submit");
        return 0;
    }
    slurm_error(UCTR_PREFIX "plugstack.conf: pin must be submit or prolog, not %s", value);
    return -1;
}

static int set_seconds(int *dst, const char *key, const char *value)
{
    char *end = NULL;
    long n = strtol(value, &end, 10);
    if (end == value || *end || n < 1 || n > 600) {
        slurm_error(UCTR_PREFIX "plugstack.conf: %s must be 1..600 seconds, not %s", key, value);
        return -1;
    }
    *dst = (int)n;
    return 0;
}

int uctr_config_parse(int ac, char **av, struct uctr_config *cfg)
{
    set_defaults(cfg);
    for (int i = 0; i < ac; i++) {
        const char *arg = av[i];
        const char *eq = strchr(arg, '=');
        if (eq == NULL) {
            slurm_error(UCTR_PREFIX "plugstack.conf: expected KEY=VALUE, got %s", arg);
            return -1;
        }
        size_t klen = (size_t)(eq - arg);
        const char *value = eq + 1;
        int rc;
        if (klen == 9 && !strncmp(arg, "uctr_exec", klen))
            rc = set_path(cfg->uctr_exec, "uctr_exec", value);
        else if (klen == 6 && !strncmp(arg, "policy", klen))
            rc = set_path(cfg->policy, "policy", value);
        else if (klen == 7 && !strncmp(arg, "run_dir", klen))
            rc = set_path(cfg->run_dir, "run_dir", value);
        else if (klen == 14 && !strncmp(arg, "sbatch_support", klen))
            rc = set_bool(&cfg->sbatch_support, "sbatch_support", value);
        else if (klen == 18 && !strncmp(arg, "batch_in_container", klen))
            rc = set_bool(&cfg->batch_in_container, "batch_in_container", value);
        else if (klen == 18 && !strncmp(arg, "execute_entrypoint", klen))
            rc = set_bool(&cfg->execute_entrypoint, "execute_entrypoint", value);
        else if (klen == 15 && !strncmp(arg, "container_scope", klen))
            rc = set_scope(cfg->container_scope, value);
        else if (klen == 8 && !strncmp(arg, "resolver", klen))
            rc = set_path(cfg->resolver, "resolver", value);
        else if (klen == 3 && !strncmp(arg, "pin", klen))
            rc = set_pin(&cfg->pin_at_submit, value);
        else if (klen == 15 && !strncmp(arg, "resolve_timeout", klen))
            rc = set_seconds(&cfg->resolve_timeout, "resolve_timeout", value);
        else {
            slurm_error(UCTR_PREFIX "plugstack.conf: unknown argument %s", arg);
            rc = -1;
        }
        if (rc)
            return -1;
    }
    return 0;
}
