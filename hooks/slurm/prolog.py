#!/usr/bin/env python3
"""Slurm Prolog (PrologFlags=Alloc; runs as root on every allocated node).

Stages the job's container image on this node. Exit status: 0 when the node is fine, even
if the user's image is bad (that is recorded for the job's steps, which then fail with the
message); non-zero only for a node fault, because Slurm drains the node on failure.
"""
import sys

from uctr_batch.batch import slurm

if __name__ == "__main__":
    sys.exit(slurm.prolog_main())
