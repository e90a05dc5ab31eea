#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks=1
# pyxis >= 0.21: every option has a PYXIS_CONTAINER_* default; the command line wins.
export PYXIS_CONTAINER_IMAGE=@IMAGE@
export PYXIS_CONTAINER_WORKDIR=/etc
echo "pwd=$(srun pwd)"
echo "cli=$(srun --container-workdir=/bin pwd)"
export PYXIS_CONTAINER_REMAP_ROOT=1
echo "uid=$(srun id -u)"
