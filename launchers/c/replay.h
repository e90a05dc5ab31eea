/* The C creator: a later step of a request sets its N1 container up without Python, by
 * replaying what the Python launcher recorded for an earlier step (launch/replay.py,
 * launchers/c/record.md "Replay templates"). Used by the SPANK plugin's local task 0. */
#ifndef REPLAY_H_INCLUDED
#define REPLAY_H_INCLUDED

#include "fastrec.h"

struct rp {
    struct fr_record tpl;     /* the template */
    char job[24], step[24];   /* this step's ids (digits) */
    char step_key[512];       /* JOB.STEP */
    char stem[640];           /* step-<safe key>-<namespace key> */
    char dir[4096];           /* the record (and rendezvous) directory */
    long rank;                /* for diagnostics: uctr[rank N] */
    char template_name[64];   /* fast-replay-<key>.rec */
    unsigned long long template_ino;
};

/* argv[1] of the C front run as a step's holder (rp_holder_main) */
#define RP_HOLDER_FLAG "--uctr-replay-holder"

/* The template's name part for this request: UCTR_IMAGE, the working directory and the
 * option tokens before the command (replay.key). */
void rp_key(char *const *envp, const char *cwd, char *const *prefix, int nprefix,
            char out[17]);

/* Is there a template for the request ARGV (argv[0] is the launcher; its NPREFIX option
 * tokens follow) that still holds for this step? NULL and *r filled, or why not. */
const char *rp_prepare(struct rp *r, int argc, char **argv, int nprefix, char **envp);

/* Set the step's container up (a holder process, the C front FRONT, replays the setup)
 * and write the step's
 * rendezvous record, fast-join record and manifest; the caller then joins like any task.
 * NULL, or why not (then nothing was published). Releases r either way. */
const char *rp_create(struct rp *r, long local_size, char **envp, const char *front);

/* The C front as the holder rp_create starts (FRONT, exec'd with RP_HOLDER_FLAG): reads
 * the template again, replays its setup, reports, and holds. Never returns. */
void rp_holder_main(int argc, char **argv) __attribute__((noreturn));

void rp_release(struct rp *r);

#endif
