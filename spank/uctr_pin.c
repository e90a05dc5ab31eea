/*
 * The submit-time pin: sbatch/salloc/srun turn IMAGE:tag into IMAGE@sha256:... once, as the
 * submitting user (their credentials, their shared cache), by running `uctr resolve`. Every
 * node's prolog and every step then uses that digest, so a tag moved while the job starts
 * cannot put two images in one job, and the N nodes send the registry no manifest request.
 *
 * The resolver runs with a bounded wall-clock time; anything but one digest reference on
 * its stdout refuses the submission (its own "error:/hint:" lines reach the user's stderr).
 */
#define _GNU_SOURCE  /* pipe2 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "uctr.h"

/* the digest part of REF when it is pinned (@sha256: + 64 lowercase hex), else NULL */
static const char *digest_of(const char *ref)
{
    const char *at = strrchr(ref, '@');
    if (at == NULL || strncmp(at + 1, "sha256:", 7))
        return NULL;
    const char *hex = at + 8;
    size_t n = 0;
    for (; hex[n]; n++)
        if (!isxdigit((unsigned char)hex[n]) || isupper((unsigned char)hex[n]))
            return NULL;
    return n == 64 ? at + 1 : NULL;
}

/* 1 when the job was pinned for IMAGE (the same --container-image the job asked for):
 * an srun step inside sbatch/salloc takes the job's digest instead of resolving again */
int uctr_pinned_for(const char *image, const char *job_pin, const char *job_tag)
{
    return image && job_pin && job_tag && !strcmp(image, job_tag) && digest_of(job_pin);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void run_child(const struct uctr_config *cfg, const char *image, int out)
{
    char timeout[16];
    snprintf(timeout, sizeof(timeout), "%d", cfg->resolve_timeout);
    int null = open("/dev/null", O_RDONLY);
    if (null >= 0)
        dup2(null, 0);
    dup2(out, 1);
    char *argv[] = { (char *)cfg->resolver, "-q", "resolve", "--timeout", timeout,
                     (char *)image, NULL };
    execvp(cfg->resolver, argv);
    dprintf(2, "uctr: cannot run %s: %s\n", cfg->resolver, strerror(errno));
    _exit(127);
}

/* read the child's stdout until EOF or DEADLINE; returns bytes read, -1 on timeout */
static ssize_t read_until(int fd, char *buf, size_t len, double deadline)
{
    size_t got = 0;
    for (;;) {
        double left = deadline - now();
        if (left <= 0)
            return -1;
        struct pollfd p = { .fd = fd, .events = POLLIN };
        int rc = poll(&p, 1, (int)(left * 1000) + 1);
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc <= 0)
            return rc == 0 ? -1 : (ssize_t)got;
        char scratch[256];
        char *dst = got < len - 1 ? buf + got : scratch;
        size_t room = got < len - 1 ? len - 1 - got : sizeof(scratch);
        ssize_t n = read(fd, dst, room);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return (ssize_t)got;
        if (dst == buf + got)
            got += (size_t)n;
    }
}

static int wait_child(pid_t pid)
{
    int status = 0;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int uctr_pin_image(const struct uctr_config *cfg, const char *image, char *pinned, size_t len)
{
    /* already pinned, the prolog resolves, or an image file (pyxis: a path), read as it is */
    if (digest_of(image) || !cfg->pin_at_submit || image[0] == '/' || image[0] == '.') {
        snprintf(pinned, len, "%s", image);
        return 0;
    }
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) < 0) {
        slurm_error(UCTR_PREFIX "cannot pin %s: pipe: %s", image, strerror(errno));
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        slurm_error(UCTR_PREFIX "cannot pin %s: fork: %s", image, strerror(errno));
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    if (pid == 0)
        run_child(cfg, image, fds[1]);
    close(fds[1]);
    char out[UCTR_IMAGE_MAX + 2] = "";
    /* the resolver's own timeout fires first; this one covers a resolver that hangs */
    ssize_t n = read_until(fds[0], out, sizeof(out), now() + cfg->resolve_timeout + 5);
    close(fds[0]);
    if (n < 0)
        kill(pid, SIGKILL);
    int rc = wait_child(pid);
    if (n < 0 || rc != 0) {
        slurm_error(UCTR_PREFIX "--container-image=%s: cannot resolve the image to a digest at "
                    "submission (%s)", image, n < 0 ? "timed out" : "see the error above");
        slurm_spank_log(UCTR_PREFIX "hint: check that the registry is reachable from this host "
                        "and `uctr login` if it needs credentials; a site without registry access "
                        "here sets pin=prolog in plugstack.conf");
        return -1;
    }
    out[n] = '\0';
    out[strcspn(out, "\n")] = '\0';
    /* the resolver echoes an image file reference (squashfs:, oci-archive:, ...) unpinned */
    if ((!digest_of(out) && strcmp(out, image)) || strlen(out) >= len || strpbrk(out, " \t")) {
        slurm_error(UCTR_PREFIX "--container-image=%s: %s printed no digest reference", image,
                    cfg->resolver);
        return -1;
    }
    snprintf(pinned, len, "%s", out);
    return 0;
}
