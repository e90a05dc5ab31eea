/*
 * Test driver for spank/uctr_args.c (included, to reach its static option table): applies
 * "--NAME[=VALUE]" arguments through the plugin's own callbacks, then the environment
 * defaults (getenv), then the syntax checks, and prints the result as KEY=VALUE lines.
 * Built with ASan/UBSan by tests/unit/test_spank_args.py. Slurm's logging is stubbed.
 */
#include <stdarg.h>

#include "../../../spank/uctr_args.c"

void slurm_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stdout);
    vprintf(fmt, ap);
    putchar('\n');
    va_end(ap);
}

void slurm_spank_log(const char *fmt, ...)
{
    (void)fmt;
}

spank_err_t spank_option_register(spank_t sp, struct spank_option *opt)
{
    (void)sp;
    (void)opt;
    return ESPANK_SUCCESS;
}

const char *spank_strerror(spank_err_t err)
{
    (void)err;
    return "stub";
}

static int env_get(void *ctx, const char *name, char *buf, size_t len)
{
    (void)ctx;
    const char *v = getenv(name);
    if (v == NULL)
        return 0;
    snprintf(buf, len, "%s", v);
    return 1;
}

static int apply(const char *arg)
{
    if (strncmp(arg, "--", 2))
        return -1;
    const char *eq = strchr(arg, '=');
    size_t len = eq ? (size_t)(eq - arg - 2) : strlen(arg + 2);
    for (struct spank_option *o = options; o->name; o++)
        if (strlen(o->name) == len && !strncmp(o->name, arg + 2, len))
            return o->cb(o->val, eq ? eq + 1 : NULL, 0);
    return -1;
}

static void show(const char *key, const char *value)
{
    printf("%s=%s\n", key, value ? value : "(unset)");
}

static void show_flag(const char *key, int value)
{
    printf("%s=%d\n", key, value);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (apply(argv[i])) {
            printf("unknown option %s\n", argv[i]);
            return 2;
        }
    uctr_args_env_defaults(env_get, NULL);
    int rc = uctr_args_validate();
    show("image", uctr_args.image);
    show("mounts", uctr_args.mounts);
    show("workdir", uctr_args.workdir);
    show("name", uctr_args.name);
    show("save", uctr_args.save);
    show_flag("writable", uctr_args.writable);
    show_flag("remap_root", uctr_args.remap_root);
    show_flag("entrypoint", uctr_args.entrypoint);
    show_flag("entrypoint_log", uctr_args.entrypoint_log);
    show_flag("mount_home", uctr_args.mount_home);
    return rc ? 1 : 0;
}
