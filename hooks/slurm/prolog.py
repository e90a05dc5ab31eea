#!/usr/bin/env python3
"""Slurm Prolog (PrologFlags=Alloc; runs as root on every allocated node).

Stages the job's container image on this node. Exit status: 0 when the node is fine, even
if the user's image is bad (that is recorded for the job's steps, which then fail with the
message); non-zero only for a node fault, because Slurm drains the node on failure.
"""
import gc
import sys

# A short-lived process: while its ~120 modules load, the cyclic garbage collector would
# only walk their objects again and again (~2 ms a job on a warm node). The staging child
# (common.stage_as_user), which may pull and unpack for minutes, turns it back on.
gc.disable()

from uctr_batch.batch import slurm  # noqa: E402

if __name__ == "__main__":
    sys.exit(slurm.prolog_main())
