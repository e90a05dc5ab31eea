"""uctr-exec, the per-rank launcher: start overhead, ranks ready on one node, MPI ping-pong.

    python3 bench/bench_launch.py [--runs 30] [--rank-runs 5] [--ranks 32,64] [--no-pingpong]

Everything is measured side by side in one run and reported as ratios (bench/README.md):

  start   one rank, warm (image staged, policy and container recipe cached), payload /bin/true
          in the busybox image, against bare /bin/true and `python3 -c pass`; plus a rank
          that joins a running step's container (what ranks 2..N of a step pay);
  ranks   N ranks of one job step started at once on this node (`seq N | xargs -P N`, one
          Slurm-like step per round), until all have run `true`, against N concurrent bare
          `python3 -c pass`: warm, and cold (empty cache and node-local directory: one rank
          imports and unpacks the image while the others wait);
  mpi     mpi4py ping-pong between 2 ranks on this node (bench/pingpong.py, 1 B..4 MiB),
          `mpirun -np 2`, bare host Python + Open MPI against the debian-openmpi image
          (its own Open MPI; and with --mpi auto, the host's injected).

Targets (issue 4): intra-node bandwidth within 5% of bare; 32 warm ranks ready in <= 2x the
time of 32 concurrent bare `python3 -c pass`. The section "uctr-exec" of bench/RESULTS.md is
replaced with the results.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common, tests.harness

from bench.common import (  # noqa: E402
    REPO, Case, Result, fmt_time, info_lines, machine_info, markdown_table, remove,
    replace_section, run_rounds, say, wait_for_quiet,
)

SHIM = REPO / "launchers" / "uctr-exec"
VENV_PYTHON = "/opt/uctr-batch/venv/bin/python3"
HOST_PYTHON = "/usr/bin/python3"
SECTION, HEADING = "launch", "## uctr-exec (bench/bench_launch.py)"



class Bench:
    """Directories, images and the environment uctr-exec runs with."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.home = workdir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.cache, self.local = workdir / "cache", workdir / "local"
        self.step = 0

    def images(self, pingpong: bool) -> None:
        from tests.harness.images import build_busybox

        layout = self.workdir / "busybox"
        if not (layout / "index.json").exists():
            build_busybox(layout)
        self.busybox = f"oci:{layout}:1"
        self.openmpi = None
        if pingpong:
            from tests.harness.mpi_images import cached_mpi_layout

            self.openmpi = f"oci:{cached_mpi_layout('debian-openmpi')}:1"

    def env(self, **extra) -> dict:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8",
               "UCTR_PYTHON": os.environ.get("UCTR_BENCH_EXEC_PYTHON", VENV_PYTHON),
               "UCTR_CACHE": str(self.cache), "UCTR_LOCAL_DIR": str(self.local)}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def next_step(self, ranks: int) -> dict:
        """A fresh Slurm-like job step of RANKS ranks on this node (each round: a new srun)."""
        self.step += 1
        return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": str(self.step), "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": str(ranks),
                "SLURM_STEP_TASKS_PER_NODE": str(ranks)}

    def uctr(self, *args, env=None, check=True) -> subprocess.CompletedProcess:
        cp = subprocess.run([str(SHIM), *args], env=env or self.env(), capture_output=True,
                            text=True, cwd=str(self.workdir))
        if check and cp.returncode != 0:
            raise RuntimeError(f"uctr-exec {' '.join(args)} failed:\n{cp.stderr[-3000:]}")
        return cp

    def cold(self) -> None:
        for path in (self.cache, self.local):
            remove(path)


def compile_bytecode() -> None:
    """Installed packages have their .pyc files; a checkout gets them here."""
    subprocess.run([VENV_PYTHON, "-m", "compileall", "-q", str(REPO / "uctr_batch")],
                   stdout=subprocess.DEVNULL, check=False)


# -- start: one rank ------------------------------------------------------------------------------
def bench_start(b: Bench, runs: int):
    b.uctr(b.busybox, "true")  # stage, cache the policy and the recipe
    b.uctr(b.busybox, "true")
    plain = b.env()

    def uctr_run():
        subprocess.run([str(SHIM), b.busybox, "true"], env=plain, check=True)

    # A step whose container is running: each timed rank joins it.
    anchor_env = b.env(**b.next_step(1000))
    anchor = subprocess.Popen([str(SHIM), b.busybox, "sleep", "3600"], env=anchor_env)
    time.sleep(2)
    joiner_env = dict(anchor_env, SLURM_PROCID="1")

    def joiner_run():
        subprocess.run([str(SHIM), b.busybox, "true"], env=joiner_env, check=True)

    cases = [
        Case("bare", lambda: subprocess.run(["/bin/true"], check=True)),
        Case("python", lambda: subprocess.run([HOST_PYTHON, "-c", "pass"], check=True)),
        Case("uctr", uctr_run),
        Case("join", joiner_run),
    ]
    try:
        samples = run_rounds(cases, runs, warmup=2, say=say)
    finally:
        anchor.kill()
        anchor.wait()
    return [
        Result("start.bare", "start", "bare /bin/true", samples["bare"], "bare exec"),
        Result("start.python", "start", "python3 -c pass", samples["python"], "interpreter floor"),
        Result("start.uctr", "start", "uctr-exec IMG true", samples["uctr"],
               "warm, no launcher: sets up its own container"),
        Result("start.join", "start", "uctr-exec IMG true (joins)", samples["join"],
               "warm, joins its step's running container (ranks 2..N)"),
    ]


# -- ranks: N at once -----------------------------------------------------------------------------
def xargs(ranks: int, argv, env) -> None:
    cp = subprocess.run(["xargs", "-P", str(ranks), "-I{}", *argv],
                        input="".join(f"{i}\n" for i in range(ranks)), env=env, text=True,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} x {ranks} failed:\n{cp.stderr[-3000:]}")


def bench_ranks(b: Bench, counts, runs: int):
    results = []
    for ranks in counts:
        holder = {}

        def new_step(ranks=ranks):
            holder["env"] = b.env(**b.next_step(ranks))

        def cold_prepare(ranks=ranks):
            b.cold()
            new_step(ranks)

        def uctr(ranks=ranks):
            xargs(ranks, [str(SHIM), b.busybox, "true"], holder["env"])

        bare_env = b.env()
        cases = [
            Case("bare", lambda ranks=ranks: xargs(ranks, [HOST_PYTHON, "-c", "pass"], bare_env)),
            Case("warm", uctr, prepare=new_step),
            Case("cold", uctr, prepare=cold_prepare),
        ]
        b.uctr(b.busybox, "true")
        samples = run_rounds(cases, runs, warmup=1, say=say)
        b.uctr(b.busybox, "true")  # leave it warm
        results += [
            Result(f"ranks{ranks}.bare", f"{ranks} ranks", f"{ranks} x python3 -c pass",
                   samples["bare"], "xargs -P"),
            Result(f"ranks{ranks}.warm", f"{ranks} ranks", f"{ranks} x uctr-exec IMG true",
                   samples["warm"], "warm: staged, policy cached; new step each round"),
            Result(f"ranks{ranks}.cold", f"{ranks} ranks", f"{ranks} x uctr-exec IMG true",
                   samples["cold"], "cold node: empty cache and local dir"),
        ]
    return results


# -- MPI ping-pong --------------------------------------------------------------------------------
def pingpong(argv, env) -> dict:
    cp = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", *argv], env=env,
                        capture_output=True, text=True, timeout=900)
    if cp.returncode != 0:
        raise RuntimeError(f"ping-pong {' '.join(argv)} failed:\n{cp.stderr[-3000:]}")
    return json.loads(cp.stdout.strip().splitlines()[-1])


def bench_mpi(b: Bench, repeats: int):
    script_dir = b.workdir / "pp"
    script_dir.mkdir(exist_ok=True)
    shutil.copy(REPO / "bench" / "pingpong.py", script_dir / "pingpong.py")
    b.uctr(b.openmpi, "true")  # stage the image
    # Single-copy through CMA for large messages, on both sides: between ranks of two
    # sibling user namespaces it would fail (EPERM), so this also proves they share one.
    env = b.env(OMPI_ALLOW_RUN_AS_ROOT=1, OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1,
                OMPI_MCA_btl_vader_single_copy_mechanism="cma")
    variants = {
        "bare": [HOST_PYTHON, str(script_dir / "pingpong.py")],
        "container": [str(SHIM), "-v", f"{script_dir}:/pp", b.openmpi, "python3",
                      "/pp/pingpong.py"],
        "injected": [str(SHIM), "--mpi", "auto", "-v", f"{script_dir}:/pp", b.openmpi, "python3",
                     "/pp/pingpong.py"],
    }
    runs = {name: [] for name in variants}
    names = list(variants)
    for round_no in range(repeats):
        for name in names[round_no % len(names):] + names[:round_no % len(names)]:  # rotate
            runs[name].append(pingpong(variants[name], env))
        say(f"  ping-pong round {round_no + 1}/{repeats} done")
    sizes = runs["bare"][0]["sizes"]
    table = {}
    for name, results in runs.items():
        table[name] = {
            "latency": _medians(results, "latency_us", len(sizes)),
            "bandwidth": _medians(results, "bandwidth_mbs", len(sizes)),
            "library": results[0]["library"],
        }
    return sizes, table


def _medians(results, key: str, count: int):
    return [statistics.median(r[key][i] for r in results) for i in range(count)]


# -- report ---------------------------------------------------------------------------------------
def ratio_of(results, a: str, b: str) -> float:
    by_id = {r.id: r for r in results}
    return by_id[a].median / by_id[b].median


def start_section(results) -> str:
    by_id = {r.id: r for r in results}
    bare, python = by_id["start.bare"].median, by_id["start.python"].median
    rows = [[r.id, r.tool, fmt_time(r.median), fmt_time(r.min), fmt_time(r.max), len(r.samples),
             f"{r.median / bare:.1f}", f"{r.median / python:.2f}", r.note] for r in results]
    overhead = by_id["start.uctr"].median - bare
    return ("### One rank, warm\n\n"
            + markdown_table(["id", "tool", "median", "min", "max", "runs", "× bare", "× python",
                              "notes"], rows)
            + f"\nPer-rank start overhead over bare exec: {fmt_time(overhead)} "
              f"(a rank that sets up its container), "
              f"{fmt_time(by_id['start.join'].median - bare)} (a rank that joins one).\n")


def ranks_section(results, counts) -> str:
    by_id = {r.id: r for r in results}
    rows = []
    for n in counts:
        bare, warm, cold = (by_id[f"ranks{n}.{k}"] for k in ("bare", "warm", "cold"))
        rows.append([n, fmt_time(bare.median), fmt_time(warm.median), fmt_time(cold.median),
                     f"{warm.median / bare.median:.2f}", f"{cold.median / bare.median:.2f}",
                     len(bare.samples)])
    return ("### N ranks of one step on one node, started at once\n\n"
            + markdown_table(["ranks", "bare python3 -c pass", "uctr-exec warm", "uctr-exec cold",
                              "warm × bare", "cold × bare", "runs"], rows))


def mpi_section(sizes, table) -> str:
    rows = []
    bare, ctr, inj = table["bare"], table["container"], table["injected"]
    for i, size in enumerate(sizes):
        rows.append([_size(size), f"{bare['latency'][i]:.2f}", f"{ctr['latency'][i]:.2f}",
                     f"{inj['latency'][i]:.2f}", f"{bare['bandwidth'][i]:.1f}",
                     f"{ctr['bandwidth'][i]:.1f}", f"{inj['bandwidth'][i]:.1f}",
                     f"{ctr['bandwidth'][i] / bare['bandwidth'][i]:.3f}",
                     f"{inj['bandwidth'][i] / bare['bandwidth'][i]:.3f}"])
    return ("### mpi4py ping-pong, 2 ranks on one node (bench/pingpong.py)\n\n"
            f"bare: host Python + {bare['library']}; container: the debian-openmpi image's own "
            f"MPI ({ctr['library']}); injected: the same image with `--mpi auto` (host Open MPI "
            "bound over the image's). Latency = half a round trip; bandwidth = bytes / latency."
            "\n\n"
            + markdown_table(["size", "lat bare µs", "lat ctr µs", "lat inj µs", "bw bare MB/s",
                              "bw ctr MB/s", "bw inj MB/s", "ctr/bare bw", "inj/bare bw"], rows))


def _size(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def targets(results, counts, mpi) -> str:
    lines = []
    if 32 in counts:
        r = ratio_of(results, "ranks32.warm", "ranks32.bare")
        lines.append(f"- 32 warm ranks ready in ≤ 2× 32 concurrent `python3 -c pass`: "
                     f"**{'met' if r <= 2 else 'NOT met'}** ({r:.2f}×)")
    if mpi:
        sizes, table = mpi
        big = [i for i, s in enumerate(sizes) if s >= 64 << 10]
        for name, words in (("container", "image MPI"), ("injected", "host MPI injected")):
            ratios = [table[name]["bandwidth"][i] / table["bare"]["bandwidth"][i] for i in big]
            mean = statistics.geometric_mean(ratios)
            peak = max(table[name]["bandwidth"]) / max(table["bare"]["bandwidth"])
            lines.append(
                f"- intra-node bandwidth within 5% of bare ({words}, 64 KiB..4 MiB, geometric "
                f"mean of the per-size ratios): **{'met' if mean >= 0.95 else 'NOT met'}** "
                f"({mean:.3f}×; peak {peak:.3f}×; sizes from {min(ratios):.3f}× to "
                f"{max(ratios):.3f}×, single sizes move by ±10-20% between runs here)")
    return "Targets (issue 4):\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30, help="rounds of the one-rank start (30)")
    p.add_argument("--rank-runs", type=int, default=5, help="rounds of the N-rank starts (5)")
    p.add_argument("--ranks", default="32,64", help="rank counts (32,64)")
    p.add_argument("--mpi-runs", type=int, default=5, help="ping-pong repetitions (5)")
    p.add_argument("--no-pingpong", action="store_true")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm"),
                   help="where caches and rootfs live (tmpfs: stable numbers)")
    p.add_argument("--max-load", type=float, default=os.cpu_count() / 2)
    p.add_argument("--wait", type=float, default=300)
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.ranks.split(",") if n]
    workdir = Path(tempfile.mkdtemp(prefix="uctr-bench-launch-", dir=args.workdir))
    try:
        load = wait_for_quiet(args.max_load, args.wait, say)
        info = machine_info(workdir)
        compile_bytecode()
        b = Bench(workdir)
        b.images(not args.no_pingpong)
        say("one-rank start ...")
        start = bench_start(b, args.runs)
        say("N ranks ...")
        ranks = bench_ranks(b, counts, args.rank_runs)
        mpi = None
        if not args.no_pingpong:
            say("ping-pong ...")
            mpi = bench_mpi(b, args.mpi_runs)
        info["load at start"] = "%.2f (1 min)" % load
        info["load at end"] = "%.2f %.2f %.2f (1/5/15 min)" % os.getloadavg()
        body = ("Measured by `bench/bench_launch.py`; medians of interleaved rounds, ratios from "
                "this one run. The launcher is launchers/uctr-exec (python -S, the venv's "
                "python), mode N1.\n\n" + info_lines(info) + "\n" + start_section(start) + "\n"
                + ranks_section(ranks, counts) + "\n"
                + (mpi_section(*mpi) + "\n" if mpi else "") + targets(start + ranks, counts, mpi))
        print(body)
        if not args.no_write:
            replace_section(SECTION, body, heading=HEADING)
    finally:
        remove(workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
