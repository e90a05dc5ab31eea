#!/usr/bin/env python3
"""Slurm Epilog: removes the job's uctr state on this node and enforces the node-local quota.

Never fails on missing state: a failing epilog drains the node.
"""
import sys

from uctr_batch.batch import slurm

if __name__ == "__main__":
    sys.exit(slurm.epilog_main())
