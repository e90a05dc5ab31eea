#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --container-image=@RELSQSH@
#SBATCH --container-remap-root
# pyxis >= 0.12 takes its options in #SBATCH lines too; they apply to the job's srun steps.
srun sh -c 'echo "sbatch=$GREETING/uid$(id -u)"'
