#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks=1
echo "remapped=$(srun --container-image=@IMAGE@ --container-remap-root id -u)"
echo "plain=$(srun --container-image=@IMAGE@ --no-container-remap-root id -u)"
echo "host=$(id -u)"
