"""Per-rank start of a rank that joins its step's running container: the C front of
uctr-exec (launchers/c) against the Python launcher and the peers, in one run.

    python3 bench/bench_fastpath.py [--runs 40] [--rank-runs 3] [--ranks 1,8,16,32,64]

One step's container runs (an anchor rank sleeping in it, N1); every timed rank joins it
and runs /bin/true in the busybox image. Side by side, interleaved round by round:

  c-join       launchers/c/uctr-exec (release build), joins from C
  python-join  launchers/uctr-exec (the sh shim, python -S), joins from Python
  bare         /bin/true on the host
  unshare      unshare -Ur chroot ROOTFS /bin/true (the same rootfs)
  ch-run       ch-run ROOTFS -- /bin/true          (when installed)
  bwrap        bwrap --unshare-user --ro-bind ROOTFS / ... /bin/true   (when installed)

Also: file-system calls per rank (strace -f -c -e trace=%file, plus the descriptor calls
fstat/newfstatat/statx), and ranks ready vs rank count (N concurrent ranks, xargs -P N, until
all ran `true`) for c-join, python-join and unshare, with a PNG plot
(bench/fastpath-ranks.png, drawn by the system python3's matplotlib).

Targets (issue 12): c-join <= 1.5x unshare, <= 20 file-system calls per rank; 64
concurrent warm ranks ready <= 1.5x 64 concurrent unshare starts. The section "uctr-exec C
front" of bench/RESULTS.md is replaced with the results (other sections are left alone).
"""

import argparse
import json
import os
import re
import shutil
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
PLOT_PYTHON = "/usr/bin/python3"  # Debian's python3-matplotlib
PNG = REPO / "bench" / "fastpath-ranks.png"
SECTION, HEADING = "fastpath", "## uctr-exec C front (bench/bench_fastpath.py)"



class Bench:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        (workdir / "home").mkdir(parents=True, exist_ok=True)
        self.local = workdir / "local"
        self.front = workdir / "uctr-exec"

    def env(self, **extra) -> dict:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.workdir / "home"),
               "LANG": "C.UTF-8", "UCTR_PYTHON": VENV_PYTHON,
               "USER": os.environ.get("USER", "root"),
               "UCTR_CACHE": str(self.workdir / "cache"), "UCTR_LOCAL_DIR": str(self.local)}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def prepare(self) -> None:
        from tests.harness import cfront
        from tests.harness.images import build_busybox

        layout = self.workdir / "busybox"
        build_busybox(layout)
        self.image = f"oci:{layout}:1"
        built = cfront.build(self.workdir / "cfront", ("uctr-exec",))
        shutil.copy2(built["uctr-exec"], self.front)
        for _ in range(2):  # stage, cache policy and recipe
            subprocess.run([str(SHIM), self.image, "true"], env=self.env(), check=True,
                           cwd=self.workdir)
        self.rootfs = next((self.local / "bundles").glob("*/rootfs"))

    def step(self, job: int, ranks: int, rank: int = 0) -> dict:
        return self.env(SLURM_JOB_ID=job, SLURM_STEP_ID=0, SLURM_PROCID=rank, SLURM_LOCALID=rank,
                        SLURM_NODEID=0, SLURM_STEP_NUM_TASKS=ranks,
                        SLURM_STEP_TASKS_PER_NODE=ranks)

    def anchor(self, job: int) -> subprocess.Popen:
        """Rank 0 of step JOB.0, sleeping in the step's container; returns once the
        fast-join record is there."""
        env = self.step(job, 100000)
        proc = subprocess.Popen([str(SHIM), self.image, "sleep", "3600"], env=env,
                                cwd=self.workdir)
        record = self.local / "launch" / f"fast-step-{job}.0.rec"  # fastrec.record_name
        deadline = time.monotonic() + 120
        while not record.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the anchor rank did not publish its container")
            time.sleep(0.05)
        return proc


def peers(rootfs: Path):
    """(name, argv) of the peers installed here."""
    out = [("bare", ["/bin/true"]),
           ("unshare", ["unshare", "-Ur", "/usr/sbin/chroot", str(rootfs), "/bin/true"])]
    if shutil.which("ch-run"):
        out.append(("ch-run", ["ch-run", str(rootfs), "--", "/bin/true"]))
    if shutil.which("bwrap"):
        out.append(("bwrap", ["bwrap", "--unshare-user", "--ro-bind", str(rootfs), "/",
                              "--proc", "/proc", "--dev", "/dev", "/bin/true"]))
    return out


def works(argv, env) -> bool:
    return subprocess.run(argv, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def bench_start(b: Bench, runs: int):
    anchor = b.anchor(5001)
    try:
        joiner = b.step(5001, 100000, 1)
        c_argv = [str(b.front), b.image, "/bin/true"]
        py_argv = [str(SHIM), b.image, "/bin/true"]
        probe = subprocess.run(c_argv, env=dict(joiner, UCTR_FAST_DEBUG="1"), cwd=b.workdir,
                               capture_output=True, text=True)
        if probe.returncode != 0 or "python path" in probe.stderr:
            raise RuntimeError("the C front did not join: " + probe.stderr)

        def run(argv, env):
            return lambda: subprocess.run(argv, env=env, cwd=b.workdir, check=True)

        cases = [Case("c-join", run(c_argv, joiner)), Case("python-join", run(py_argv, joiner))]
        plain = b.env()
        skipped = []
        for name, argv in peers(b.rootfs):
            if works(argv, plain):
                cases.append(Case(name, run(argv, plain)))
            else:
                skipped.append(name)
        samples = run_rounds(cases, runs, warmup=3, say=say)
        calls = {name: fs_calls(argv, env, b.workdir) for name, argv, env in
                 [("c-join", c_argv, joiner), ("python-join", py_argv, joiner)]
                 + [(n, a, plain) for n, a in peers(b.rootfs) if n not in skipped]}
    finally:
        anchor.kill()
        anchor.wait()
    notes = {"c-join": "C front joins the step's running container",
             "python-join": "Python launcher (sh shim, python -S) joins it",
             "bare": "host exec floor", "unshare": "unshare -Ur chroot ROOTFS true",
             "ch-run": "ch-run ROOTFS -- true", "bwrap": "bwrap --unshare-user, ro root"}
    results = [Result(f"start.{c.name}", "start", c.name, samples[c.name], notes[c.name],
                      {"fs calls": str(calls.get(c.name, ""))}) for c in cases]
    return results, skipped


def fs_calls(argv, env, cwd) -> int:
    """File-system calls of one start, all processes (strace -f -c): the calls that take a
    path, plus fstat/newfstatat/statx on descriptors."""
    if not shutil.which("strace"):
        return -1
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        subprocess.run(["strace", "-f", "-qq", "-c", "-o", out.name,
                        "-e", "trace=%file,fstat,newfstatat,statx", *argv],
                       env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
        text = out.read()
    match = re.search(r"^-+.*\n\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?total", text, re.M)
    if match:
        return int(match.group(1))
    rows = re.findall(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?\w+$", text, re.M)
    return sum(int(r) for r in rows)


def xargs(ranks: int, argv, env, cwd) -> None:
    cp = subprocess.run(["xargs", "-P", str(ranks), "-I{}", *argv],
                        input="".join(f"{i}\n" for i in range(ranks)), env=env, text=True,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    if cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} x {ranks} failed:\n{cp.stderr[-3000:]}")


def bench_ranks(b: Bench, counts, runs: int):
    anchor = b.anchor(5002)
    results = []
    try:
        joiner = b.step(5002, 100000, 1)
        plain = b.env()
        for ranks in counts:
            cases = [
                Case("c-join", lambda r=ranks: xargs(r, [str(b.front), b.image, "/bin/true"],
                                                     joiner, b.workdir)),
                Case("python-join", lambda r=ranks: xargs(r, [str(SHIM), b.image, "/bin/true"],
                                                          joiner, b.workdir)),
                Case("unshare", lambda r=ranks: xargs(
                    r, ["unshare", "-Ur", "/usr/sbin/chroot", str(b.rootfs), "/bin/true"], plain,
                    b.workdir)),
            ]
            say(f"{ranks} ranks ...")
            samples = run_rounds(cases, runs, warmup=1, say=say)
            results += [Result(f"ranks{ranks}.{c.name}", f"{ranks} ranks", c.name,
                               samples[c.name], "xargs -P: all ranks ready") for c in cases]
    finally:
        anchor.kill()
        anchor.wait()
    return results


def plot(results, counts, path: Path) -> bool:
    series = {}
    for r in results:
        series.setdefault(r.tool, []).append(r.median * 1000)
    data = json.dumps({"counts": counts, "series": series})
    script = """
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
d = json.loads(sys.argv[1])
fig, ax = plt.subplots(figsize=(6.4, 4.2))
for name, ys in d["series"].items():
    ax.plot(d["counts"], ys, marker="o", label=name)
ax.set_xlabel("concurrent ranks on one node")
ax.set_ylabel("time until all ranks ran (ms, median)")
ax.set_title("uctr-exec: ranks joining a running step container")
ax.grid(True, alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=100)
"""
    if not Path(PLOT_PYTHON).exists():
        return False
    cp = subprocess.run([PLOT_PYTHON, "-c", script, data, str(path)], capture_output=True,
                        text=True)
    if cp.returncode != 0:
        say("no plot: " + cp.stderr[-500:])
    return cp.returncode == 0


def section(start, skipped, ranks, counts, plotted: bool) -> str:
    by = {r.tool: r for r in start}
    base = by["unshare"].median
    rows = [[r.tool, fmt_time(r.median), fmt_time(r.min), len(r.samples),
             "%.2fx" % (r.median / base), "%.2fx" % (r.median / by["bare"].median),
             r.extra.get("fs calls", ""), r.note] for r in start]
    text = ("### One rank joining a running step container\n\n"
            + markdown_table(["tool", "median", "min", "runs", "vs unshare", "vs bare",
                              "fs calls", "notes"], rows))
    if skipped:
        text += "\nNot run (failed here): %s\n" % ", ".join(skipped)
    rrows = []
    for n in counts:
        group = {r.tool: r for r in ranks if r.group == f"{n} ranks"}
        u = group["unshare"].median
        rrows.append([n] + ["%s (%.2fx)" % (fmt_time(group[t].median), group[t].median / u)
                            for t in ("c-join", "python-join", "unshare")])
    text += ("\n### Ranks ready vs rank count (ratio to as many concurrent unshare starts)\n\n"
             + markdown_table(["ranks", "c-join", "python-join", "unshare"], rrows))
    if plotted:
        text += "\n![ranks ready vs rank count](fastpath-ranks.png)\n"
    c, p = by["c-join"], by["python-join"]
    last = max(counts)
    group = {r.tool: r for r in ranks if r.group == f"{last} ranks"}
    text += ("\n### Targets (issue 12)\n\n"
             f"- c-join vs unshare -Ur chroot: {c.median / base:.2f}x (target <= 1.5x); "
             f"the Python join: {p.median / base:.2f}x; c-join is {p.median / c.median:.1f}x "
             "faster than the Python join\n"
             f"- file-system calls per rank: c-join {c.extra.get('fs calls')} (target <= 20), "
             f"python-join {p.extra.get('fs calls')}; both include the payload's own (busybox "
             "/bin/true: execve and readlink, 2) and the launcher's execve; all of the C "
             "front's are on /proc and the node-local directory\n"
             f"- {last} concurrent warm ranks ready: c-join "
             f"{group['c-join'].median / group['unshare'].median:.2f}x {last} concurrent "
             "unshare starts (target <= 1.5x)\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=40, help="rounds of the one-rank start (40)")
    p.add_argument("--rank-runs", type=int, default=3, help="rounds per rank count (3)")
    p.add_argument("--ranks", default="1,8,16,32,64", help="rank counts (1,8,16,32,64)")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm"))
    p.add_argument("--max-load", type=float, default=os.cpu_count() / 2)
    p.add_argument("--wait", type=float, default=300)
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.ranks.split(",") if n]
    workdir = Path(tempfile.mkdtemp(prefix="uctr-bench-fast-", dir=args.workdir))
    os.chmod(workdir, 0o755)
    try:
        load = wait_for_quiet(args.max_load, args.wait, say)
        info = machine_info(workdir)
        b = Bench(workdir)
        b.prepare()
        say("one-rank start ...")
        start, skipped = bench_start(b, args.runs)
        ranks = bench_ranks(b, counts, args.rank_runs)
        plotted = plot(ranks, counts, PNG)
        info["user"] = "uid %d" % os.getuid()
        info["load at start"] = "%.2f (1 min)" % load
        info["load at end"] = "%.2f %.2f %.2f (1/5/15 min)" % os.getloadavg()
        body = ("Measured by `bench/bench_fastpath.py`; medians of interleaved rounds, ratios "
                "from this one run. Every uctr rank joins a running N1 step container and runs "
                "/bin/true in the busybox image.\n\n" + info_lines(info) + "\n"
                + section(start, skipped, ranks, counts, plotted))
        print(body)
        if not args.no_write:
            replace_section(SECTION, body, heading=HEADING)
    finally:
        remove(workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
