#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks=1
echo hello-from-host > @WORK@/input.txt
srun --container-image=@IMAGE@ --container-mounts=@WORK@:/data:ro+rprivate --container-workdir=/data \
    sh -c 'echo "read=$(cat input.txt) cwd=$(pwd)"; touch /data/x 2>/dev/null && echo ro=no || echo ro=yes'
