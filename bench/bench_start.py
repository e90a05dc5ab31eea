#!/usr/bin/env python3
"""Start overhead per mode, against the floors and the peers, measured in one run.

    python3 bench/bench_start.py --user uctrtest --image oci:/path/to/layout:1   # as root
    python3 bench/bench_start.py --rootfs ~/my-rootfs        # as an unprivileged user

Groups (medians; every command is checked to exit 0 before it is timed; commands are run
round-robin, one run of each per round, so a busy shared machine slows them all alike):
  start    /bin/true from the rootfs: bare /bin/true, `python3 -c pass` (the interpreter
           floor of any Python tool), unshare -Ur chroot, bwrap, ch-run, udocker P1 (from
           PyPI, on Debian's proot), and `uctr run --mode M` for every mode that works here;
           plus "N1 exec" = the N1 mode started from a prepared RunSpec (what the per-rank
           launcher does, without the CLI's argparse/logging/policy start-up).
  syscall  statbench 20000 (20000 x stat+open+close, a static C program compiled here with
           gcc -static; F1 runs a dynamic build, its preload cannot reach a static one),
           minus `statbench 0` through the same tool in the same round: the start is netted
           out, what remains is the cost of the system calls themselves.

Writes bench/out/start-*.json and replaces the "Start overhead" section of bench/RESULTS.md.
The measuring runs as an unprivileged user (udocker refuses root, and the modes are meant for
users): started as root with --user U, the script byte-compiles the package (as an install
would), measures as U through runuser, and writes the results as root.
"""

import argparse
import json
import marshal
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "RESULTS.md")
SECTION = "## Start overhead"
STAT_N = 20000
PROOT_NOK = """#!/bin/sh
# Debian proot 5.1 breaks dynamic binaries with any -k on recent kernels; udocker always
# passes -k RELEASE, so drop it (research/peer-facts.md).
n=$#; i=0
while [ "$i" -lt "$n" ]; do
  a=$1; shift; i=$((i+1))
  if [ "$a" = "-k" ]; then shift; i=$((i+1)); continue; fi
  set -- "$@" "$a"
done
exec proot "$@"
"""
# The per-rank path: a RunSpec prepared once (marshal: no import cost), then exec.
EXEC_SPEC = """import marshal, sys
sys.path.insert(0, %r)
from uctr_batch.modes import RunSpec, get_mode
with open(sys.argv[1], "rb") as f:
    spec = RunSpec.from_dict(marshal.load(f))
get_mode(sys.argv[2]).exec(spec)
"""


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = args.workdir or os.path.join(tempfile.gettempdir(), "uctr-bench-%d" % os.getuid())
        os.makedirs(self.work, exist_ok=True)
        self.python = args.python
        self.env = dict(os.environ, PYTHONPATH=REPO, UCTR_LOCAL_DIR=os.path.join(self.work, "local"),
                        UCTR_CACHE=os.path.join(self.work, "cache"), USER=os.environ.get("USER") or
                        _user_name())
        self.rows = []
        self.notes = []

    # -- setup ----------------------------------------------------------------------------
    def rootfs(self) -> str:
        if self.args.rootfs:
            return os.path.abspath(self.args.rootfs)
        cp = subprocess.run([self.python, "-m", "uctr_batch", "create", self.args.image],
                            env=self.env, capture_output=True, text=True)
        if cp.returncode != 0:
            sys.exit("uctr create failed:\n" + cp.stderr)
        return cp.stdout.strip()

    def build_statbench(self, rootfs: str) -> None:
        src = os.path.join(HERE, "statbench.c")
        bindir = os.path.join(rootfs, "usr/local/bin")
        os.makedirs(bindir, exist_ok=True)
        for name, extra in (("statbench", ["-static"]), ("statbench-dyn", [])):
            subprocess.run(["gcc", "-O2", *extra, "-o", os.path.join(bindir, name), src], check=True)

    def udocker(self, rootfs: str):
        """udocker (PyPI) set up on Debian's proot; its argv prefix, or None (noted)."""
        venv = os.path.join(self.work, "udocker-venv")
        udocker = os.path.join(venv, "bin", "udocker")
        if not os.path.exists(udocker):
            cp = subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True, text=True)
            cp = cp if cp.returncode else subprocess.run(
                [os.path.join(venv, "bin", "pip"), "install", "-q", "udocker"], capture_output=True, text=True)
            if cp.returncode:
                self.notes.append("udocker P1 skipped: pip install udocker failed: "
                                  + (cp.stderr.strip().splitlines() or ["?"])[-1])
                return None
        home = os.path.join(self.work, "udocker")
        os.makedirs(os.path.join(home, "lib"), exist_ok=True)
        with open(os.path.join(home, "lib", "VERSION"), "w") as f:
            f.write("1.2.11\n")  # tools.is_available() only reads this: no GitHub download
        wrapper = os.path.join(self.work, "proot-nok")
        with open(wrapper, "w") as f:
            f.write(PROOT_NOK)
        os.chmod(wrapper, 0o755)
        self.env.update(UDOCKER_DIR=home, UDOCKER_USE_PROOT_EXECUTABLE=wrapper)
        listed = subprocess.run([udocker, "ps"], env=self.env, capture_output=True, text=True).stdout
        if "uctrbench" not in listed:
            tar = os.path.join(self.work, "rootfs.tar")
            subprocess.run(["tar", "-C", rootfs, "-cf", tar, "."], check=True)
            cp = subprocess.run([udocker, "import", "--tocontainer", "--name=uctrbench", tar, "uctrbench"],
                                env=self.env, capture_output=True, text=True)
            os.unlink(tar)
            if cp.returncode:
                self.notes.append("udocker P1 skipped: udocker import failed: " + cp.stderr.strip()[-200:])
                return None
            subprocess.run([udocker, "setup", "--execmode=P1", "uctrbench"], env=self.env,
                           capture_output=True, text=True)
        return [udocker, "run", "uctrbench"]

    def exec_spec(self, rootfs: str, mode: str):
        """Argv of the prepared-spec launcher (N1 exec) for mode."""
        sys.path.insert(0, REPO)
        from uctr_batch import run as uctr_run
        from uctr_batch.policy.model import NodePolicy, builtin_body

        policy = NodePolicy.from_body(builtin_body(), {}, node="bench", partition=None, features=(),
                                      class_name=None, reason="bench")
        os.environ.update(UCTR_LOCAL_DIR=self.env["UCTR_LOCAL_DIR"])
        spec = uctr_run.build_spec(uctr_run.target_from_path(rootfs), policy, command=["/bin/true"])
        spec_file = os.path.join(self.work, "spec-%s.marshal" % mode)
        with open(spec_file, "wb") as f:
            marshal.dump(spec.to_dict(), f)
        script = os.path.join(self.work, "exec_spec.py")
        with open(script, "w") as f:
            f.write(EXEC_SPEC % REPO)
        return [self.python, script, spec_file, mode]

    # -- measuring --------------------------------------------------------------------------
    def works(self, ident, argv) -> bool:
        """Run argv once; a command that fails is reported, not timed."""
        if not (shutil.which(argv[0], path=self.env["PATH"]) or os.path.exists(argv[0])):
            self.notes.append("%s skipped: %s not installed" % (ident, argv[0]))
            return False
        cp = subprocess.run(argv, env=self.env, capture_output=True, timeout=600)
        if cp.returncode != 0:
            why = (cp.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            self.notes.append("%s skipped: exit %d: %s" % (ident, cp.returncode, why[:160]))
            return False
        return True

    def time_once(self, argv) -> float:
        """Wall time of one run (posix_spawn + waitpid, output to /dev/null)."""
        path = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=self.env["PATH"])
        devnull = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_WRONLY, 0) for fd in (1, 2)]
        start = time.perf_counter()
        pid = os.posix_spawn(path, argv, self.env, file_actions=devnull)
        _, status = os.waitpid(pid, 0)
        elapsed = time.perf_counter() - start
        if status != 0:
            raise RuntimeError("%s exited with status %d while timed" % (" ".join(argv), status))
        return elapsed

    def measure_group(self, group, commands, warmup=3):
        """Round-robin: every round runs each command once, so load from other processes on
        a shared machine hits all of them alike and the ratios stay meaningful.

        commands: (ident, tool, argv, runs, note, baseline_argv or None); with a baseline,
        the row is the per-round difference argv - baseline (the start cost netted out)."""
        todo = [c for c in commands if self.works(c[0], c[2]) and (c[5] is None or self.works(c[0], c[5]))]
        times = {c[0]: [] for c in todo}
        for rnd in range(warmup + max((c[3] for c in todo), default=0)):
            for ident, _tool, argv, runs, _note, baseline in todo:
                if rnd >= warmup + runs:
                    continue
                t = self.time_once(argv)
                if baseline is not None:
                    t -= self.time_once(baseline)
                if rnd >= warmup:
                    times[ident].append(t)
        for ident, tool, _argv, _runs, note, _base in todo:
            ts = times[ident]
            self.rows.append({"id": ident, "group": group, "tool": tool, "median": statistics.median(ts),
                              "min": min(ts), "max": max(ts), "runs": len(ts), "note": note})
            print("%-26s %9.1f ms" % (ident, statistics.median(ts) * 1000), file=sys.stderr)

    def uctr_modes(self):
        sys.path.insert(0, REPO)
        from uctr_batch.modes import base

        return [m for m in base.MODE_NAMES if base.get_mode(m).probe().ok]

    def run(self):
        rootfs = self.rootfs()
        self.build_statbench(rootfs)
        runs = self.args.runs
        uctr = [self.python, "-m", "uctr_batch", "run"]
        modes = self.uctr_modes()
        self.notes += ["mode %s not measured: its probe fails here" % m
                       for m in ("N1", "R1", "P1", "P2", "F1", "S1") if m not in modes]
        bwrap = ["bwrap", "--unshare-user", "--bind", rootfs, "/", "--proc", "/proc", "--dev", "/dev"]
        peers = [
            ("bare", "bare", []), ("unshare", "unshare -Ur chroot", ["unshare", "-Ur", "chroot", rootfs]),
            ("bwrap", "bwrap", bwrap), ("chrun", "ch-run", ["ch-run", rootfs, "--"]),
        ]
        ud = None if self.args.no_udocker else self.udocker(rootfs)
        starts = [("start.python", "python3 -c pass", [self.python, "-c", "pass"], runs,
                   "interpreter floor", None)]
        starts += [("start." + i, tool, prefix + ["/bin/true"], runs, "", None) for i, tool, prefix in peers]
        starts += [("start.uctr.%s" % m, "uctr run --mode %s" % m, uctr + ["--mode", m, rootfs, "/bin/true"],
                    runs, "full CLI", None) for m in modes]
        if "N1" in modes:
            starts.append(("start.exec.N1", "N1 exec (prepared spec)", self.exec_spec(rootfs, "N1"), runs,
                           "per-rank path: RunSpec prepared, mode exec only", None))
        if ud:
            starts.append(("start.udocker.P1", "udocker P1", ud + ["/bin/true"], max(5, runs // 2),
                           "PyPI udocker on Debian proot (-k stripped)", None))
        self.measure_group("start", starts)

        def stat(prefix, prog, n):
            return prefix + [prog, str(n), "/etc/passwd"]

        inside = "/usr/local/bin/statbench"
        # bare: the host's /etc/passwd, as deep as the container's (path walks cost per component)
        host = [os.path.join(rootfs, "usr/local/bin/statbench"), str(STAT_N), "/etc/passwd"]
        note = "statbench %d (%d syscalls), minus statbench 0 in the same round" % (STAT_N, 3 * STAT_N)
        sys_cmds = [("sys.bare", "bare", host, 10, note, host[:1] + ["0"] + host[2:])]
        sys_cmds += [("sys." + i, tool, stat(prefix, inside, STAT_N), 10, note, stat(prefix, inside, 0))
                     for i, tool, prefix in peers[1:]]
        for m in modes:
            prog = inside + "-dyn" if m == "F1" else inside
            prefix = uctr + ["--mode", m, rootfs]
            sys_cmds.append(("sys.uctr.%s" % m, "uctr run --mode %s" % m, stat(prefix, prog, STAT_N),
                             3 if m in ("P1", "P2") else 10, note, stat(prefix, prog, 0)))
        if ud:
            sys_cmds.append(("sys.udocker.P1", "udocker P1", stat(ud, inside, STAT_N), 3, note,
                             stat(ud, inside, 0)))
        self.measure_group("syscall", sys_cmds, warmup=1)
        return rootfs

    # -- reporting -------------------------------------------------------------------------
    def table(self) -> str:
        base = {r["id"]: r["median"] for r in self.rows}
        lines = ["| id | tool | median | min | max | runs | × bare | × python | notes |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            floor = base.get("start.bare" if r["group"] == "start" else "sys.bare")
            py = base.get("start.python") if r["group"] == "start" else None
            lines.append("| %s | %s | %s | %s | %s | %d | %s | %s | %s |" % (
                r["id"], r["tool"], _ms(r["median"]), _ms(r["min"]), _ms(r["max"]), r["runs"],
                "%.1f" % (r["median"] / floor) if floor else "", "%.2f" % (r["median"] / py) if py else "",
                r["note"]))
        return "\n".join(lines)

    def targets(self) -> list:
        m = {r["id"]: r["median"] for r in self.rows}
        out = []

        def check(label, ok, detail):
            out.append("- %s: **%s** (%s)" % (label, "met" if ok else "NOT met", detail))

        if "start.python" in m:
            for ident in ("start.uctr.N1", "start.exec.N1"):
                if ident in m:
                    ratio = m[ident] / m["start.python"]
                    check("N1 start ≤ 1.5× `python3 -c pass` (%s)" % ident, ratio <= 1.5,
                          "%.2f×: %s vs %s" % (ratio, _ms(m[ident]), _ms(m["start.python"])))
        for ident in ("start.uctr.N1", "start.exec.N1"):
            if "start.udocker.P1" in m and ident in m:
                ratio = m["start.udocker.P1"] / m[ident]
                check("N1 ≥ 5× faster than udocker P1 (%s)" % ident, ratio >= 5,
                      "%.1f× faster: %s vs %s" % (ratio, _ms(m[ident]), _ms(m["start.udocker.P1"])))
        for mode in ("N1", "R1"):
            ident = "sys.uctr.%s" % mode
            if ident in m and "sys.bare" in m:
                ratio = m[ident] / m["sys.bare"]
                check("no runtime overhead for %s on statbench" % mode, ratio <= 1.10,
                      "%s vs bare %s (%.2f×)" % (_ms(m[ident]), _ms(m["sys.bare"]), ratio))
        return out

    def dump(self, path: str, source: str) -> None:
        with open(path, "w") as f:
            json.dump({"rows": self.rows, "notes": self.notes, "meta": {
                "when": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
                "machine": platform.machine(), "cpus": os.cpu_count(),
                "kernel": platform.release(), "uid": os.getuid(), "source": source}}, f, indent=1)


def report(data: dict) -> str:
    """The RESULTS.md section for a dump()ed measurement."""
    bench = Bench.__new__(Bench)
    bench.rows, bench.notes = data["rows"], data["notes"]
    meta = data["meta"]
    text = [SECTION, "",
            "Measured %s on %s (%s, %d CPUs, kernel %s) by `bench/bench_start.py` as uid %d; "
            "rootfs from %s. Round-robin runs (posix_spawn + waitpid); ratios are medians over bare "
            "`/bin/true` (start) or bare statbench (syscall), and over `python3 -c pass`."
            % (meta["when"], meta["host"], meta["machine"], meta["cpus"], meta["kernel"],
               meta["uid"], meta["source"]),
            "", bench.table(), "", "Targets (issue 3):", ""] + bench.targets()
    if bench.notes:
        text += ["", "Notes:", ""] + ["- " + n for n in bench.notes]
    return "\n".join(text) + "\n"


def save(data: dict) -> None:
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    with open(os.path.join(HERE, "out", "start-%s.json" % time.strftime("%Y%m%d-%H%M%S")), "w") as f:
        json.dump(data, f, indent=1)
    replace_section(RESULTS, SECTION, report(data))


def replace_section(path: str, heading: str, body: str) -> None:
    """Replace the section that starts with `heading` (up to the next '## ') or append it."""
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = "# Benchmark results\n"
    start = old.find(heading + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + body
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + body + (old[end + 1:] if end >= 0 else "")
    with open(path, "w") as f:
        f.write(new)


def _ms(seconds: float) -> str:
    return "%.1f ms" % (seconds * 1000) if seconds < 10 else "%.2f s" % seconds


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="image to `uctr create` (e.g. oci:/path/layout:1)")
    src.add_argument("--rootfs", help="an existing rootfs (or bundle rootfs) you own")
    p.add_argument("--runs", type=int, default=40, help="runs per start command (default 40)")
    p.add_argument("--workdir", help="scratch dir (default /tmp/uctr-bench-$UID)")
    p.add_argument("--python", default="/usr/bin/python3", help="interpreter for uctr and the floor")
    p.add_argument("--no-udocker", action="store_true", help="skip udocker P1")
    p.add_argument("--user", help="as root: measure as this unprivileged user")
    p.add_argument("--json-out", help=argparse.SUPPRESS)  # the unprivileged half's result file
    args = p.parse_args()
    if os.getuid() == 0:
        if not args.user:
            sys.exit("as root, give --user USER (an unprivileged user to measure as)")
        data = measure_as(args.user, args)
    else:
        bench = Bench(args)
        rootfs = bench.run()
        out = args.json_out or os.path.join(bench.work, "measure.json")
        bench.dump(out, args.image or rootfs)
        if args.json_out:
            return
        with open(out) as f:
            data = json.load(f)
        if not os.access(HERE, os.W_OK):
            print(report(data))
            print("(%s is not writable: results left in %s)" % (RESULTS, out), file=sys.stderr)
            return
    save(data)
    print(report(data))


def measure_as(user: str, args) -> dict:
    """Root half: byte-compile the package, run the measuring half as USER, load its data."""
    import pwd
    import compileall

    compileall.compile_dir(os.path.join(REPO, "uctr_batch"), quiet=1)
    entry = pwd.getpwnam(user)
    work = args.workdir or os.path.join(tempfile.gettempdir(), "uctr-bench-%d" % entry.pw_uid)
    os.makedirs(work, exist_ok=True)
    os.chown(work, entry.pw_uid, entry.pw_gid)
    out = os.path.join(work, "measure.json")
    argv = ["runuser", "-u", user, "--", "/usr/bin/env", "-u", "PYTHONDONTWRITEBYTECODE",
            "HOME=" + entry.pw_dir, "USER=" + user, args.python, os.path.abspath(__file__),
            "--runs", str(args.runs), "--workdir", work, "--python", args.python, "--json-out", out]
    argv += ["--image", args.image] if args.image else ["--rootfs", args.rootfs]
    argv += ["--no-udocker"] if args.no_udocker else []
    subprocess.run(argv, check=True)
    with open(out) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
