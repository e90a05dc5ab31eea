#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks=1
# A step given --container-name=NAME:exec attaches to the running container of that name and
# sees what that step mounted (as in pyxis's "attach to running container"); :no_exec does not.
srun --container-image=@IMAGE@ --container-name=live busybox mkdir -p /mymnt
srun --container-name=live --container-remap-root \
    sh -c 'busybox mount -t tmpfs none /mymnt && echo up > /mymnt/flag && exec busybox sleep 300' &
# until the first step has mounted (no fixed wait: a loaded node may take a while)
for _ in $(seq 120); do
    seen=$(srun --overlap --container-name=live:exec cat /mymnt/flag 2>/dev/null) && break
    sleep 1
done
echo "attached=$seen"
echo "own=$(srun --overlap --container-name=live:no_exec sh -c 'cat /mymnt/flag 2>/dev/null || echo not-mounted')"
kill %1
wait
exit 0
