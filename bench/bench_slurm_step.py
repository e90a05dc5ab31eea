"""A whole Slurm step in a container against the same step without one, on the simulated
two-node cluster (tests/harness/slurm.py; it waits for the cluster's session lock).

    python3 bench/bench_slurm_step.py [--runs 10] [--tasks 64] [--no-write]

Cases, interleaved round by round (bench/README.md), each timed around `srun` as the test
user sees it:

  bare       srun -O -N2 -nTASKS true
  container  srun -O -N2 -nTASKS --container-image=busybox true, warm node: local task 0
             of each node sets up the step's container from C (the replay template the
             first such step's Python launcher left), every task joins it from C in the
             SPANK plugin's task_init (no process)
  bare-2, container-2   the same with -n2 (one task per node): what a container costs per
             step (submit-time pin, prolog, epilog, the creator's uctr-exec), whatever
             the task count; the rest of container - bare is what the joining tasks cost

and, the issue's own measure, steps of a job (one allocation per round and kind, the steps
timed inside it by the job's own script):

  job-bare        srun -O -N2 -nTASKS true (and -n2) in `salloc -N2 -nTASKS`
  job-container   the same steps in `salloc ... --container-image=busybox`: they inherit the
                  image, pinned once at submission and staged by the job's prolog, so a step
                  costs what uctr adds per step (the creator's uctr-exec, the joins)

Target (issue 12): a step in a container job <= 1.1x the same step without a container.
Also reported: how many tasks of the container step joined from C (UCTR_FAST_DEBUG=1). The
section "Slurm step" of bench/RESULTS.md is replaced with the results.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common, tests.harness

from bench.common import (  # noqa: E402
    REPO, Case, fmt_time, info_lines, machine_info, markdown_table, replace_section, run_rounds,
    say,
)

SECTION, HEADING = "slurm-step", "## Slurm step (bench/bench_slurm_step.py)"
VENV_PYTHON = "/opt/uctr-batch/venv/bin/python3"
JOINED = "uctr: task_init: joined the step's container from C"
CREATED = "uctr: task_init: set the step's container up from C (replay template)"



def srun(cluster, args, env=None) -> subprocess.CompletedProcess:
    result = cluster.srun(["--time=5", "-O", *args], env=env, name="bench-step", timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"srun {' '.join(args)} exited {result.returncode}:\n"
                           f"{result.stderr[-3000:]}")
    return result


# Runs inside the allocation on the submit host: STEPS rounds of one step of each size.
STEP_TIMER = r"""#!/bin/sh
for i in $(seq "$1"); do
  for n in "$2" 2; do
    s=$(date +%s%N); srun -O -N2 -n"$n" true >/dev/null || exit 1; e=$(date +%s%N)
    echo "n$n $(( (e - s) / 1000 ))"
  done
done
"""


def job_steps(cluster, timer: Path, tasks: int, rounds: int, steps: int, image: str, say):
    """Steps of a job with and without a container, alternating one allocation of each
    per round; the first round is a warm-up. {case: [seconds]}."""
    samples = {}
    for round_no in range(rounds + 1):
        for kind, extra in (("job-bare", []), ("job-container", [f"--container-image={image}"])):
            result = cluster.salloc(["-O", "-N2", f"-n{tasks}", "--time=5", *extra],
                                    [str(timer), str(steps), str(tasks)], name="bench-job")
            if result.returncode != 0:
                raise RuntimeError(f"salloc ({kind}) exited {result.returncode}:\n"
                                   f"{result.stderr[-3000:]}")
            for line in result.stdout.split("\n"):
                size, _, micros = line.partition(" ")
                if round_no and size in (f"n{tasks}", "n2") and micros.isdigit():
                    name = kind + ("" if size == f"n{tasks}" else "-2")
                    samples.setdefault(name, []).append(int(micros) / 1e6)
        if round_no:
            say(f"  job round {round_no}/{rounds}: " + ", ".join(
                f"{name} {fmt_time(v[-1])}" for name, v in samples.items()))
    return samples


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--tasks", type=int, default=64)
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = p.parse_args(argv)

    from tests.harness import slurm
    from tests.harness.images import ImageSet

    why = slurm.missing_prerequisites()
    if why:
        say(f"skipped: {why}")
        return 2
    root = Path(tempfile.mkdtemp(prefix="uctr-bench-step-", dir="/tmp"))
    root.chmod(0o755)
    cluster = slurm.SessionCluster(REPO, os.environ.get("UCTR_TEST_PYTHON", VENV_PYTHON),
                                   ImageSet(root / "images")).start()
    try:
        image = cluster.image_ref("busybox")
        step = ["-N2", f"-n{args.tasks}"]
        container = step + [f"--container-image={image}"]
        srun(cluster, container + ["true"])  # warm: image staged, record directory there
        debug = srun(cluster, container + ["true"], env={"UCTR_FAST_DEBUG": "1"})
        joined = len(re.findall(re.escape(JOINED), debug.stderr))
        created = len(re.findall(re.escape(CREATED), debug.stderr))
        two = ["-N2", "-n2"]
        cases = [Case("bare", lambda: srun(cluster, step + ["true"])),
                 Case("container", lambda: srun(cluster, container + ["true"])),
                 Case("bare-2", lambda: srun(cluster, two + ["true"])),
                 Case("container-2", lambda: srun(cluster, two + container[2:] + ["true"]))]
        samples = run_rounds(cases, args.runs, say=say)
        timer = root / "step-timer.sh"
        timer.write_text(STEP_TIMER)
        timer.chmod(0o755)
        samples.update(job_steps(cluster, timer, args.tasks, max(1, args.runs // 3), 3, image,
                                 say))
        info = machine_info(REPO)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)

    median = {name: sorted(s)[len(s) // 2] for name, s in samples.items()}
    ratio = median["container"] / median["bare"]
    in_job = median["job-container"] / median["job-bare"]
    base = {"bare": "bare", "container": "bare", "bare-2": "bare-2", "container-2": "bare-2",
            "job-bare": "job-bare", "job-container": "job-bare", "job-bare-2": "job-bare-2",
            "job-container-2": "job-bare-2"}
    rows = [[name, fmt_time(median[name]), fmt_time(min(samples[name])),
             fmt_time(max(samples[name])), f"{median[name] / median[base[name]]:.2f}x"]
            for name in base]
    per_step = median["container-2"] - median["bare-2"]
    per_tasks = (median["container"] - median["bare"]) - per_step
    body = ("`srun -O -N2 -n%d true` on the simulated two-node cluster, %d interleaved runs, "
            "warm node (image staged, record directory there). In the container step %d of "
            "%d tasks joined the step's container from C in task_init, and %d of 2 containers "
            "(one per node) were set up from C by local task 0 (a replay template); the "
            "others went through uctr-exec.\n\n"
            % (args.tasks, args.runs, joined, args.tasks, created)
            + markdown_table(["case", "median", "min", "max", "/ bare (same -n)"], rows)
            + "\nA step of a container job / the same step of a job without one (job-container "
              "/ job-bare, the issue's measure) = %.2fx (target <= 1.1x). As whole jobs (srun "
              "without an allocation: submit-time pin, prolog and epilog included): container "
              "/ bare = %.2fx.\n\n" % (in_job, ratio)
            + "Per step, with one task per node (container-2 - bare-2): %s. The other %d "
              "tasks (container - bare, less that): %s.\n\n"
              % (fmt_time(per_step), args.tasks - 2, fmt_time(per_tasks))
            + info_lines(info))
    print(body)
    if not args.no_write:
        replace_section(SECTION, body, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
