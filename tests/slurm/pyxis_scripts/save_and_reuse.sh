#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks=1
srun --container-image=@IMAGE@ --container-save=@WORK@/saved.sqsh sh -c 'echo from-step-1 > /etc/saved-marker'
echo "saved=$(srun --container-image=@WORK@/saved.sqsh cat /etc/saved-marker)"
