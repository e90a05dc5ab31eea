"""scripts/demo: the main job on an embedded default, end to end on this machine.

1. Starts a local registry, builds the busybox demo image offline, pushes it with skopeo,
   then runs `uctr pull` and `uctr create` (as the unprivileged test user when started as
   root) and lists the root filesystem it made. Everything lives under one temporary
   directory, removed at the end, and the registry is stopped however the demo ends.
2. Brings up the embedded two-node Slurm cluster of the test suite (tests/harness/slurm.py:
   munge, slurmctld, two slurmd nodes in their own namespaces, the uctr SPANK plugin and
   prolog/epilog, a registry on the nodes' bridge), pushes an MPI test image (built
   offline with mmdebstrap on the first run, cached in /var/cache/uctr-tests after), and
   submits, as the test user, a batch script with `#SBATCH --container=IMAGE` that runs
   mpi4py's helloworld on 2 nodes x 2 ranks with `srun --mpi=pmix`. A Slurm without
   mpi/pmix (Debian's 26.05) gets the MPICH image and `srun --mpi=pmi2` instead; the demo
   says which launcher it picked. Prints the job's output and "4 ranks on 2 nodes". The
   cluster is stopped at the end (UCTR_SLURM_KEEP=1 leaves it running); a second run starts
   afresh.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import users
from .images import ImageSet, push
from .registry import Registry

REPO = Path(__file__).resolve().parents[2]


def say(message: str) -> None:
    sys.stderr.write(f"==> {message}\n")
    sys.stderr.flush()


class DemoUser:
    """Runs uctr as USER (None: the current user) with demo-local cache and rootfs dirs."""

    def __init__(self, workdir: Path, user: Optional[str], insecure: str):
        self.user = user
        home = workdir / "home"
        home.mkdir()
        pythonpath = REPO
        if user:  # the checkout may sit where USER cannot read it (/root/...)
            pythonpath = users.copy_package(REPO / "uctr_batch", workdir / "src").parent
        self.env: Dict[str, str] = {
            "PATH": users.BASE_PATH, "LANG": "C.UTF-8", "HOME": str(home),
            "PYTHONPATH": str(pythonpath), "PYTHONDONTWRITEBYTECODE": "1",
            # under HOME, which USER owns: the demo user creates them as a user would
            "UCTR_CACHE": str(home / "cache"), "UCTR_LOCAL_DIR": str(home / "local"),
            "UCTR_INSECURE_REGISTRIES": insecure,
        }
        if user:
            self.env.update(USER=user, LOGNAME=user)
            users.chown_tree(home, user)
        self.cwd = home
        # The `uctr` a new user types, installed by scripts/install.sh (not the checkout);
        # without it (the demo module run by hand) the checkout's package.
        self.command: List[str] = [sys.executable, "-m", "uctr_batch"]
        installed = shutil.which("uctr", path=users.login_path())
        if installed:
            self.command = [installed]
            del self.env["PYTHONPATH"]

    def uctr(self, *args: str) -> subprocess.CompletedProcess:
        argv: List[str] = [*self.command, *args]
        if self.user:
            argv = users.as_user_argv(self.user, argv, self.env)
        say("uctr " + " ".join(args))
        result = subprocess.run(argv, env=self.env, cwd=self.cwd, stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise SystemExit(f"demo failed: uctr {' '.join(args)} exited {result.returncode}")
        return result


def run_demo(workdir: Path) -> None:
    workdir.chmod(0o755)  # the unprivileged user reaches its own subdirectories
    say("starting a local registry (docker-registry)")
    with Registry(workdir / "registry") as registry:
        say(f"registry at {registry.url}; building the busybox image offline")
        image = ImageSet(workdir / "images")["busybox"]
        ref = push(image, registry, repo="demo/busybox", tag="latest")
        say(f"pushed {ref} with skopeo")
        user = users.TEST_USER if users.can_switch_user() else None
        if user:
            say(f"running uctr as the unprivileged user {user}")
        demo = DemoUser(workdir, user, registry.host)
        demo.uctr("pull", ref)
        rootfs = demo.uctr("create", ref).stdout.strip().splitlines()[-1]
        say(f"root filesystem: {rootfs}")
        sys.stdout.write(f"{rootfs}\n")
        sys.stdout.flush()
        subprocess.run(["ls", "-l", rootfs], check=True)
    say("registry stopped")


MPI_JOB = """#!/bin/bash
#SBATCH --container={image}
#SBATCH -N 2 --ntasks-per-node=2 --time={minutes}
{launcher} {program}
"""
FINALIZE_HANG_ATTEMPTS = 4  # MPICH hanging in MPI_Finalize 4 times in a row at 40 %: 2.6 %
# Launchers in order of preference: (Slurm MPI plugin, test image, program). Open MPI needs
# PMIx; a Slurm without mpi/pmix (Debian's 26.05) still has pmi2, which MPICH speaks.
LAUNCHERS = (
    ("pmix", "debian-openmpi", "python3 -m mpi4py.bench helloworld"),
    ("pmi2", "debian-mpich", "mpi_hello"),
)
RANK_RE = re.compile(r"I am process\s+(\d+) of \d+ on (\S+)\."  # mpi4py.bench helloworld
                     r"|hello rank=(\d+) size=\d+ host=(\S+)")  # mpi_hello


def pick_launcher(plugins: List[str]) -> Tuple[str, str, str]:
    for plugin, image, program in LAUNCHERS:
        if plugin in plugins:
            return plugin, image, program
    raise SystemExit("demo failed: this Slurm has neither mpi/pmix nor mpi/pmi2 "
                     f"(srun --mpi=list: {', '.join(plugins)})")


def ranks_and_nodes(output: str) -> Tuple[List[int], List[str]]:
    ranks, nodes = [], set()
    for match in RANK_RE.finditer(output):
        ranks.append(int(match.group(1) or match.group(3)))
        nodes.add(match.group(2) or match.group(4))
    return sorted(ranks), sorted(nodes)


def submit_mpi_job(cluster, script: str, retry_finalize_hang: bool):
    """Submit SCRIPT, print its output; the finished job. Debian 12's MPICH (the pmi2 image)
    can hang in its own MPI_Finalize after every rank has reported (user guide,
    Troubleshooting): such a job runs into its time limit and is submitted again."""
    attempts = FINALIZE_HANG_ATTEMPTS if retry_finalize_hang else 1
    for attempt in range(1, attempts + 1):
        job_id = cluster.submit(script, name="demo-mpi")
        result = cluster.wait(job_id, timeout=600)
        say(f"job {job_id}: {result.state} (exit {result.exit_code}); its output:")
        sys.stdout.write(result.output)
        sys.stdout.flush()
        if result.state == "COMPLETED":
            return result
        ranks, _ = ranks_and_nodes(result.output)
        if result.state != "TIMEOUT" or ranks != [0, 1, 2, 3] or attempt == attempts:
            raise SystemExit(f"demo failed: job {job_id} ended {result.state}")
        say("every rank reported, then MPICH hung in MPI_Finalize (Debian 12's MPICH with "
            "UCX over TCP, openucx/ucx#8738; see the user guide): submitting it again")
    raise AssertionError("unreachable")


def run_slurm_demo(workdir: Path) -> None:
    """An MPI job in a container through `#SBATCH --container=` on the two-node cluster."""
    from . import slurm

    why = slurm.missing_prerequisites()
    if why:
        raise SystemExit(f"demo failed: the Slurm part cannot run here: {why}")
    if not users.can_switch_user():
        raise SystemExit(f"demo failed: the Slurm job runs as {users.TEST_USER}, who does "
                         "not exist (run scripts/install.sh)")
    say("bringing up the two-node Slurm cluster (munge, slurmctld, slurmd node1 and node2)")
    cluster = slurm.SessionCluster(REPO, sys.executable, ImageSet(workdir / "images"))
    cluster.start()
    try:
        say(f"cluster up in {cluster.bringup_seconds:.1f} s; registry at "
            f"{cluster.registry_host}")
        plugins = cluster.mpi_plugins()
        plugin, mpi_image, program = pick_launcher(plugins)
        say(f"launcher: srun --mpi={plugin} with the {mpi_image} image (this Slurm's MPI "
            f"plugins: {', '.join(plugins)})")
        say(f"building (first run only: mmdebstrap) and pushing the {mpi_image} image")
        image = cluster.image_ref(mpi_image, tag="demo")
        script = MPI_JOB.format(image=image, launcher=f"srun --mpi={plugin}", program=program,
                                minutes=2 if plugin == "pmi2" else 5)
        say(f"sbatch as {users.TEST_USER}:\n" + script.rstrip())
        result = submit_mpi_job(cluster, script, retry_finalize_hang=plugin == "pmi2")
        ranks, nodes = ranks_and_nodes(result.output)
        if ranks != [0, 1, 2, 3] or len(nodes) != 2:
            raise SystemExit(f"demo failed: expected ranks 0-3 on 2 nodes, got ranks {ranks} "
                             f"on {', '.join(nodes) or 'no node'}")
        say(f"{len(ranks)} ranks on {len(nodes)} nodes ({', '.join(nodes)}) with "
            f"srun --mpi={plugin}")
    finally:
        keep = os.environ.get("UCTR_SLURM_KEEP") == "1"
        say("leaving the cluster running (UCTR_SLURM_KEEP=1)" if keep
            else "stopping the cluster")
        cluster.stop(keep_running=keep)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="uctr-demo-"))
    try:
        run_demo(workdir)
        run_slurm_demo(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    say("demo done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
