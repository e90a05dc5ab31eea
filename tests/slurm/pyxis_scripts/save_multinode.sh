#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
# --container-save on two nodes: every node saves its own container, as pyxis's last task on
# each node exports it. A node-local path: each node keeps its own image.
srun --container-image=@IMAGE@ --container-save=/tmp/node-saved.sqsh sh -c 'hostname > /etc/saved-on'
echo "local=$(srun --container-image=/tmp/node-saved.sqsh cat /etc/saved-on | sort | tr '\n' ' ')"
# A shared path: both nodes write it; the file is one node's complete image.
srun --container-image=@IMAGE@ --container-save=@WORK@/shared-saved.sqsh sh -c 'hostname > /etc/saved-on'
echo "shared=$(srun -N1 -n1 --container-image=@WORK@/shared-saved.sqsh cat /etc/saved-on)"
