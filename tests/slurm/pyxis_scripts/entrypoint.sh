#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks=1
# pyxis does not run the image's entrypoint unless asked.
srun --container-image=@EPIMAGE@ sh -c 'echo "default=${FROM_ENTRYPOINT:-unset}"'
srun --container-image=@EPIMAGE@ --container-entrypoint sh -c 'echo "with=${FROM_ENTRYPOINT:-unset}"'
srun --container-image=@EPIMAGE@ --no-container-entrypoint --container-entrypoint-log \
    sh -c 'echo "without=${FROM_ENTRYPOINT:-unset}"'
