/* Creating a job step's N1 container from C (the C creator): what the Python launcher's
 * step rendezvous (uctr_batch/launch/sharedns.py) writes and runs, replayed without Python.
 * Pure C on libc only: linked into the static front uctr-exec and the SPANK plugin. */
#ifndef FASTCTR_H_INCLUDED
#define FASTCTR_H_INCLUDED

#include <stddef.h>
#include <sys/types.h>

/* A growing buffer (the records written here and in replay.c): on allocation failure
 * oom is set and later puts do nothing. Free p when done. */
struct fc_buf {
    unsigned char *p;
    size_t n, cap;
    int oom;
};
void fc_put(struct fc_buf *b, const void *data, size_t len);

/* "%08x%08x" % (zlib.crc32(DATA), zlib.adler32(DATA)): recipe.digest and sharedns.ns_key
 * over repr(...).encode(). OUT gets 16 hex digits and a NUL. */
void fc_digest(const char *data, size_t len, char out[17]);

/* One member of the record: (PID, "START"), START from /proc/PID/stat field 22
 * (sharedns.start_time); a NULL start is written as None, as Python records it. */
struct fc_member {
    long pid;
    const char *start;
};

/* The namespace record sharedns.Rendezvous.publish writes (its keys, in its order). */
struct fc_ns {
    int py_major, py_minor;     /* the Python that will read it: read_record compares */
    long generation;
    double created;             /* time.time() */
    long creator;
    long holder;                /* <= 0: None */
    unsigned long long user, mnt;    /* st_ino of /proc/self/ns/{user,mnt} */
    const struct fc_member *members;
    size_t nmembers;
    const unsigned char *extras;     /* marshal.dumps(extras) (version 4), embedded verbatim */
    size_t extras_len;
};

/* The record as marshal.dumps would load it back: malloc'ed, *len bytes; NULL on OOM. */
unsigned char *fc_ns_record(const struct fc_ns *ns, size_t *len);

/* Replace NAME under DIR_FD with DATA as nodelock.write_marshal and fastrec.write do:
 * NAME.PID.tmp (0600, O_NOFOLLOW), then renamed over NAME; the temporary file is removed
 * on failure. 0, or -1 with errno. */
int fc_write_file(int dir_fd, const char *name, const void *data, size_t len);

/* Replace NAME under DIR_FD with the record as nodelock.write_marshal does: NAME.PID.tmp
 * (0600, O_NOFOLLOW), then renamed over NAME. 0, or -1 with errno. */
int fc_write_ns_record(int dir_fd, const char *name, const struct fc_ns *ns);

/* The holder's setup: it gets the holder's descriptors of DIR_FD and of the status pipe
 * (they may have moved), to hand them to a program it execs (fc_hold). 0, or -1 with a
 * message in ERR. */
typedef int fc_setup_fn(void *arg, int dir, int status, char *err, size_t errlen);

/* The step's holder (sharedns.spawn_holder/_holder_main), which also makes the namespace:
 * a grandchild of the caller (double fork: never a child of the payload the caller execs)
 * that keeps only DIR_FD (stdio on /dev/null), calls SETUP(ARG, err, errlen) and, when
 * that returns 0, stays until the step's local ranks are all in, see fastctr.c.
 *   members_name: the members file of the generation (one "PID START" line per joined
 *                 task; the holder itself is never counted)
 *   record_name:  the .ns record; the holder leaves when it is replaced or removed, or
 *                 when it did not appear within 1 s
 *   local_size:   tasks of the step on this node; <= 0 unknown
 *   limit:        seconds at most (the staging timeout); also how long the caller waits
 *                 for SETUP (<= 0: no bound on that wait)
 * Returns the holder's pid once SETUP succeeded; else -1 and why in ERR (SETUP's
 * message, or a fork/pipe error). */
pid_t fc_spawn_holder(fc_setup_fn *setup, void *arg,
                      int dir_fd, const char *record_name, const char *members_name,
                      long local_size, double limit, char *err, size_t errlen);

/* What the holder does once it is alone (fc_spawn_holder's grandchild, or a clean program
 * that grandchild exec'd, given DIR_FD and the STATUS pipe's write end): SETUP, then "ok"
 * or SETUP's message on STATUS, then stay as fc_spawn_holder says. Never returns. */
void fc_hold(int dir_fd, int status, const char *record_name, const char *members_name,
             long local_size, double limit, fc_setup_fn *setup,
             void *arg) __attribute__((noreturn));

#define FC_HOLDER_POLL_NS (10L * 1000 * 1000)  /* sharedns.HOLDER_POLL */
#define FC_HOLDER_IDLE_KNOWN 60.0              /* sharedns.HOLDER_IDLE_KNOWN */
#define FC_HOLDER_IDLE_UNKNOWN 2.0             /* sharedns.HOLDER_IDLE_UNKNOWN */
#define FC_HOLDER_RECORD_GRACE 1.0             /* for the record to appear */

#endif
