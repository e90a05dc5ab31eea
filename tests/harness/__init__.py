"""Real test harness: local docker-registry instances, offline-built test images pushed with
skopeo, and a fault-injecting proxy. Used by tests/conftest.py and scripts/demo.

Nothing here imports uctr_batch: the project is never checked with its own code.
"""
