"""uctr-batch: run OCI/Docker images in HPC batch jobs without root.

Pipeline: image (reference -> registry -> store -> flatten) -> modes -> launch -> batch.
"""

__version__ = "0.1.0"
