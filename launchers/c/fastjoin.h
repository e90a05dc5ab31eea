/* Joining a step's running N1 container (launchers/c/record.md, "What a joining rank
 * checks"): shared by the C front (uctr_exec.c) and the SPANK plugin (spank/uctr_join.c). */
#ifndef FASTJOIN_H_INCLUDED
#define FASTJOIN_H_INCLUDED

#include "fastrec.h"

struct fj_join {
    struct fr_record rec;
    struct fr_rank me;
    int launch, lock, ns[2];   /* -1 when not open */
    char **command, **env;     /* the payload's argv (strings borrowed) and environment */
    int ncommand;
};

#define FJ_JOIN_INIT { .launch = -1, .lock = -1, .ns = { -1, -1 } }

/* Everything before the first setns that can still hand over to Python, for the request
 * ARGV (argv[0] is the launcher) in environment ENVP, from the current directory: NULL
 * when j->ns[] are open on a live member under the step's lock, else why not. fj_failed
 * when the step's outcome record says the first rank failed on the same request: the
 * caller then fails too, with fj_fail_as_recorded (j is kept for it). */
const char *fj_prepare(struct fj_join *j, int argc, char **argv, char **envp);
extern const char fj_failed[];
void fj_fail_as_recorded(struct fj_join *j) __attribute__((noreturn));

/* Touch fast-seen in the record directory DIR after writing a record there (as
 * fastrec.write does): the waiting tasks' one fstatat says an N1 step ran here lately. */
void fj_touch_seen(int dir);

/* Waiting for the step's record (the SPANK plugin's tasks, while local task 0 creates the
 * container). fj_watch_records: an inotify descriptor on the record directory that reports
 * files renamed into place (records are written to a temporary name, then renamed), and
 * the record's NAME; -1 when there is none (no directory yet, inotify limits reached).
 * fj_wait_records: 1 once our record was renamed into place, 0 when only other files were,
 * -1 when MS milliseconds (at most 100) passed without either; with no descriptor, a 5 ms
 * sleep and 1. A waiting task
 * costs no CPU and does not look again until its record lands: the creator's other files
 * (lock, members, the rendezvous record) and other steps' records do not wake it. */
int fj_watch_records(char **envp, char *name, size_t size);
int fj_wait_records(int watch, const char *name, long ms);

/* Does the slurm.conf-style file PATH set KEY (case-insensitive, "Key=value" with a
 * non-empty value)? 0 when it cannot be read. */
int fj_conf_sets(const char *path, const char *key);

/* setns() into the user namespace FD; 0 also when we are in it already. */
int fj_setns_user(int fd);

/* The pieces fj_prepare is made of, for the C creator (replay.c): the record directory
 * of the environment (<UCTR_LOCAL_DIR, else /tmp/uctr-UID>/launch; NULL or why not), a
 * directory of ours nobody else can write (-1 otherwise), and a record file of ours
 * (malloc'ed, NULL when it is not a regular file of ours of at most FR_MAX_BYTES). */
const char *fj_record_dir(char **envp, char *out, size_t size);
int fj_open_private_dir(int at, const char *path);
struct stat;
char *fj_read_record(int dir, const char *name, size_t *len, struct stat *st);

/* Close what fj_prepare left open and free it (a caller that does not exec afterwards). */
void fj_release(struct fj_join *j);

/* Field 22 of /proc/PID/stat ("self" for us), as sharedns.start_time. */
int fj_start_time(const char *pid, char *out, size_t size);

/* pid-PID in the bundle's in-use directory; before setns (a host path). */
void fj_mark_in_use(const char *dir);

/* After both setns: add "PID STARTED" to the members file, then drop the lock. */
void fj_add_member(struct fj_join *j, const char *started);

/* base.resolve_command: COMMAND in PATH, a regular file we may execute (a static buffer),
 * else NULL with *denied set when one was found but is not executable. */
const char *fj_resolve(const char *command, const char *path, int *denied);

/* An error after the namespaces were joined (no handing over to Python any more):
 * "error:" and "hint:" (none when HINT is NULL or empty) as the Python launcher prints
 * them (launch.main.Diag), prefixed "uctr", or "uctr[rank N]" once fj_name_rank(N) was
 * called, then _exit(CODE). */
void fj_name_rank(long rank);
void fj_die(int code, const char *hint, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 3, 4)));

#define FJ_HINT_CHMOD "make it executable in the image (chmod +x), or run it through its " \
                      "interpreter, e.g. sh FILE"

#endif
