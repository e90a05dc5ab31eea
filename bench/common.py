"""Small helpers shared by the bench/ scripts: timing, statistics, tables, RESULTS.md.

    cases = [Case("tar", run=extract, prepare=mkdir, cleanup=rmtree), ...]
    samples = run_rounds(cases, runs=5)           # interleaved: round 1 of every case, ...
    rows = [Result("flatten.tar", "flatten", "GNU tar", samples["tar"])]
    section = results_table(rows)
    replace_section(RESULTS, "image", header + section)

Cases of one comparison run interleaved, round by round, so a burst of load from something
else on the machine hits every tool alike and the ratios stay comparable.
"""

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
VENV_PYTHON = Path(os.environ.get("UCTR_BENCH_PYTHON", "/opt/uctr-batch/venv/bin/python"))


# -- interpreter ---------------------------------------------------------------------------------
def reexec_in_venv() -> None:
    """Run the calling script again under the project's venv (requests, isal, ...), unless
    it already runs there or the venv is missing (then the caller's imports decide)."""
    if not VENV_PYTHON.exists() or Path(sys.prefix) == VENV_PYTHON.parent.parent:
        return
    if os.environ.get("UCTR_BENCH_REEXEC"):  # the venv python did not take: don't loop
        return
    os.environ["UCTR_BENCH_REEXEC"] = "1"
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])


# -- machine -------------------------------------------------------------------------------------
def say(text: str) -> None:
    """Progress for the person running a bench: stderr, at once (results go to RESULTS.md)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def load_average() -> Tuple[float, float, float]:
    return os.getloadavg()


def wait_for_quiet(max_load: float, timeout: float, say=print) -> float:
    """Wait up to TIMEOUT seconds for the 1-minute load average to drop below MAX_LOAD;
    return the load when we stop waiting (other benchmarks or test runs may share the host)."""
    deadline = time.monotonic() + timeout
    load = load_average()[0]
    if load >= max_load:
        say(f"load average {load:.2f} >= {max_load:.2f}: waiting up to {timeout:.0f} s")
    while load >= max_load and time.monotonic() < deadline:
        time.sleep(5)
        load = load_average()[0]
    return load


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def tool_version(argv: Sequence[str]) -> str:
    """First line a tool prints for its version flag, or 'missing'."""
    return _first_line(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return 0.0


def fs_type(path: Path) -> str:
    """Filesystem type of the mount holding PATH (longest matching mount point)."""
    best, kind = "", "?"
    target = str(Path(path).resolve())
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype = line.split()[:3]
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def git_revision() -> str:
    rev = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    status = ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]
    dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
    return rev + (" (uncommitted changes)" if dirty else "")


def machine_info(workdir: Path) -> Dict[str, str]:
    load = load_average()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "host": f"{platform.node()}, {platform.system()} {platform.release()}",
        "cpu": f"{os.cpu_count()} x {cpu_model()} (nproc {len(os.sched_getaffinity(0))})",
        "memory": f"{mem_total_gib():.1f} GiB",
        "load at start": "%.2f %.2f %.2f (1/5/15 min)" % load,
        "workdir": f"{workdir} ({fs_type(workdir)})",
        "python": f"{sys.executable} {platform.python_version()}",
        "uctr-batch": git_revision(),
        "user": f"uid {os.getuid()}",
    }


# -- timing --------------------------------------------------------------------------------------
def _nothing() -> None:
    return None


@dataclass
class Case:
    """One thing to time: run() is timed; prepare() before and cleanup() after it are not."""

    name: str
    run: Callable[[], None]
    prepare: Callable[[], None] = _nothing
    cleanup: Callable[[], None] = _nothing


def time_call(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_command(argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
                cwd: Optional[Path] = None,
                stdout=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """Run ARGV; its stderr is shown only when it fails (then RuntimeError)."""
    result = subprocess.run(list(map(str, argv)), env=None if env is None else dict(env),
                            cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
                           f"{result.stderr[-3000:]}")
    return result


def command(argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
            cwd: Optional[Path] = None) -> Callable[[], None]:
    """A run() that executes ARGV (process start included in the time, like a user sees it)."""
    def run() -> None:
        run_command(argv, env, cwd)
    return run


def run_rounds(cases: Sequence[Case], runs: int, warmup: int = 1,
               say: Callable[[str], None] = _nothing) -> Dict[str, List[float]]:
    """Time every case RUNS times, interleaved round by round, after WARMUP untimed rounds
    (page cache, .pyc files, the registry's first answers). name -> seconds per run."""
    samples: Dict[str, List[float]] = {case.name: [] for case in cases}
    for round_no in range(warmup + runs):
        for case in cases:
            case.prepare()
            try:
                elapsed = time_call(case.run)
            finally:
                case.cleanup()
            if round_no >= warmup:
                samples[case.name].append(elapsed)
        if round_no >= warmup:
            say(f"  round {round_no - warmup + 1}/{runs}: " + ", ".join(
                f"{case.name} {fmt_time(samples[case.name][-1])}" for case in cases))
    return samples


def remove(path: Path) -> None:
    """rm -rf that also copes with directories an unpacker left without write permission."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, _ in os.walk(path):
            for name in dirs:
                p = os.path.join(root, name)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
        shutil.rmtree(path)
    else:
        os.unlink(path)


# -- statistics and tables -----------------------------------------------------------------------
@dataclass
class Result:
    """The samples of one case, with the row it makes in a results table."""

    id: str
    group: str
    tool: str
    samples: List[float]
    note: str = ""
    extra: Dict[str, str] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


def ratio(numerator: Result, denominator: Result) -> float:
    """Median of NUMERATOR over median of DENOMINATOR: a throughput ratio when the
    numerator is the reference's time (>1: faster than the reference)."""
    return numerator.median / denominator.median


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_table(results: Sequence[Result], extra_columns: Sequence[str] = ()) -> str:
    """id | group | tool | median | min | max | runs [| extra...] | notes"""
    headers = ["id", "group", "tool", "median", "min", "max", "runs", *extra_columns, "notes"]
    rows = [[r.id, r.group, r.tool, fmt_time(r.median), fmt_time(r.min), fmt_time(r.max),
             len(r.samples), *(r.extra.get(c, "") for c in extra_columns), r.note]
            for r in results]
    return markdown_table(headers, rows)


def info_lines(info: Mapping[str, str]) -> str:
    return "".join(f"- {key}: {value}\n" for key, value in info.items())


# -- RESULTS.md ----------------------------------------------------------------------------------
def _markers(name: str) -> Tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_section(name: str, body: str, heading: str = "", path: Path = RESULTS) -> None:
    """Put BODY between the NAME markers of PATH; every other section is left as it is.

    A new section is appended as HEADING, then the markers. The heading stays outside the
    markers so that scripts which replace "from a '## ' heading to the next one" do not eat
    this section's begin marker. Written atomically (rename)."""
    begin, end = _markers(name)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    start = text.find(begin)
    if start < 0 and heading and text.find(heading + "\n") >= 0:  # begin marker lost
        start = text.find(heading + "\n") + len(heading) + 1
    stop = text.find(end, start) if start >= 0 else -1
    if start >= 0 and stop >= 0:
        text = text[:start] + block + text[stop + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + (heading + "\n\n" if heading else "") + block + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
