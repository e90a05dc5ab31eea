#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
# pyxis's recommended way to avoid re-importing: an enroot squashfs on the shared file system.
srun --container-image=@SQSH@ sh -c 'echo "greeting=$GREETING node=$SLURM_NODEID"'
