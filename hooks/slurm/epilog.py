#!/usr/bin/env python3
"""Slurm Epilog: removes the job's uctr state on this node and enforces the node-local quota.

Never fails on missing state: a failing epilog drains the node.
"""
import gc
import sys

# A short-lived process: while its ~120 modules load, the cyclic garbage collector would
# only walk their objects again and again (~2 ms a job on a warm node).
gc.disable()

from uctr_batch.batch import slurm  # noqa: E402

if __name__ == "__main__":
    sys.exit(slurm.epilog_main())
