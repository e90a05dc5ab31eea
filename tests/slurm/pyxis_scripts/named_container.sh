#!/bin/bash
#SBATCH --job-name=pyxis-named
#SBATCH --nodes=1
#SBATCH --ntasks=1
# Step 1 changes the named container; step 2 sees the change (pyxis: "If a container with this
# name already exists, the existing container is used and the import is skipped").
srun --container-image=@IMAGE@ --container-name=dev sh -c 'echo installed > /etc/pkg-marker'
echo "step2=$(srun --container-name=dev cat /etc/pkg-marker)"
# An unnamed container from the same image starts clean.
echo "unnamed=$(srun --container-image=@IMAGE@ sh -c 'cat /etc/pkg-marker 2>/dev/null || echo clean')"
# (test probe, not pyxis style: where uctr keeps the named container on this node)
echo "during=$(ls /tmp/uctr-$(id -u)/containers/job-$SLURM_JOB_ID | grep -v lock | tr '\n' ' ')"
