#!/usr/bin/env python3
"""Cluster scale: one job of N nodes x 2 ranks running an MPI hello, N = 1 .. 32, on the
simulated Slurm cluster of tests/harness/slurm.py (one slurmd per network namespace, private
/tmp and /dev/shm per node, the shared cache in the test user's home).

    python3 bench/bench_scale.py                 # as root; N = 1 2 4 8 16 32
    python3 bench/bench_scale.py --nodes 1 2 4   # fewer sizes
    python3 bench/bench_scale.py --states none warm-node --repeat 5 --merge
                                                 # the warm-node ratio alone (~4 min),
                                                 # merged into the last run's scale.json

For every N, in this order (each a fresh sbatch job, `srun --mpi=pmix` of mpi_hello in the
debian-openmpi test image, 2 ranks per node):
  none        the same job without a container (the host's Open MPI and an mpi_hello
              compiled here): the floor
  per-node    the per-node-pull baseline, as pyxis+enroot and udocker work: every node
              resolves the tag, downloads every layer into its own cache and unpacks on its
              own (uctr pull/create with a node-private cache), then the ranks start
  cold        uctr: nothing cached (shared cache and every node-local dir emptied)
  warm-node   uctr: the same job again (rootfs already on every node)
  warm-cache  uctr: layers in the shared cache, node-local dirs emptied
--states runs some states only; "warm-node" without "cold" or "warm-cache" before it is
primed by one unrecorded job per N (so every node holds the rootfs). --merge keeps the rows
of bench/out/scale.json that this run did not measure (by N and state); the report then
names the run each state's rows come from.

Measured per job: start = submit -> the last rank running (each rank prints its clock
before exec'ing mpi_hello), total = submit -> job finished; registry requests from the
registry's access log (manifest and blob GETs); unpacks per node from the prolog logs (the
baseline: one per node by construction); bytes read from the shared cache (= compressed
layer bytes x unpacks, the unpack reads each layer once); CPU seconds per node spent staging
(slurmd's reaped-children CPU, i.e. prolog + epilog; the baseline: its pull+unpack steps);
and node CPU = everything the node ran for the job (slurmd, prolog, epilog, slurmstepd,
uctr-exec and the ranks), from a cpuacct cgroup (v1; cgroup v2: cpu.stat) around each
slurmd, when the machine has one ("-" otherwise).

One run per cold/warm-cache/per-node cell (a cold start cannot be repeated without redoing
the whole cell, and the cluster is shared by other engineers' tests); "none" and "warm-node"
run REPEAT times and report the median. The simulated nodes share the machine's cores,
so times at large N measure this machine's contention as much as the design; the counts
(requests, unpacks, bytes, CPU per node) are what extrapolates (docs/scale.md has the model).

Writes bench/out/scale.json, the "Cluster scale" section of bench/RESULTS.md and the plots
docs/img/scale-start.png and docs/img/scale-requests.png (matplotlib of /usr/bin/python3).
"""

import argparse
import json
import os
import pwd
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402
from tests.harness import slurm as harness  # noqa: E402
from tests.harness.images import ImageSet  # noqa: E402
from tests.harness.users import TEST_USER  # noqa: E402

OUT = REPO / "bench" / "out"
IMG_DIR = REPO / "docs" / "img"
IMAGE = "debian-openmpi"
RANKS_PER_NODE = 2
SIZES = (1, 2, 4, 8, 16, 32)
STATES = ("none", "per-node", "cold", "warm-node", "warm-cache")
REPEAT = 3  # runs of "none" and "warm-node" per N (their median is reported; --repeat)
HELLO_RE = re.compile(r"hello rank=(\d+) size=(\d+) host=(\S+) sum=(\d+)")
T_RE = re.compile(r"^T=(\d+\.\d+) host=(\S+)$", re.M)
RANK = "echo \"T=$(date +%s.%N) host=$(hostname)\"; exec {hello}"


# -- the jobs --------------------------------------------------------------------------------
# Open MPI 4.1 here sometimes segfaults (both ranks of one node, "address nil") once every
# rank is running, with vader or with TCP alone, with or without a container; the other ranks
# then hang in MPI_Init. A run is cut HANG_GRACE s after its last rank started; its start time
# still counts (every rank ran) and the table marks it "MPI failed".
HANG_GRACE = 30.0


def job_script(cluster, n: int, state: str, image: str, host_hello: str) -> str:
    return job_body(cluster, n, state, image, host_hello)


def job_body(cluster, n: int, state: str, image: str, host_hello: str) -> str:
    srun = f"srun --mpi=pmix --ntasks-per-node={RANKS_PER_NODE}"
    per_node = f"srun -n {n} --ntasks-per-node=1"  # one task on every node
    if state == "none":
        return f"#!/bin/sh\n{srun} sh -c '{RANK.format(hello=host_hello)}'\n"
    if state == "per-node":
        uctr, uexec = cluster.prefix / "bin" / "uctr", cluster.prefix / "bin" / "uctr-exec"
        cpu = ("import resource,subprocess,sys; "
               "rc=subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
               "r=resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print('CPU=%.3f host=' % (r.ru_utime+r.ru_stime) + __import__('socket')"
               ".gethostname()); sys.exit(rc)")
        return "\n".join([
            "#!/bin/sh",
            # a node-private cache and rootfs dir, as enroot/udocker keep them
            "export UCTR_CACHE=/tmp/pernode/cache UCTR_LOCAL_DIR=/tmp/pernode/local",
            f"{per_node} {cluster.python} -c \"{cpu}\" {uctr} -q create {image}",
            f"{srun} {uexec} {image} sh -c '{RANK.format(hello='/usr/local/bin/mpi_hello')}'",
            f"{per_node} rm -rf /tmp/pernode", ""])
    return f"#!/bin/sh\n{srun} sh -c '{RANK.format(hello='/usr/local/bin/mpi_hello')}'\n"


def slurmd_child_cpu(cluster, nodes):
    """CPU seconds of the children slurmd has reaped (prolog, epilog), per node."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for node in nodes:
        pid = harness._read_pid(cluster.path("run", f"slurmd.{node}.pid"))
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[node] = (int(fields[13]) + int(fields[14])) / tick  # cutime + cstime
    return out


class NodeCpu:
    """CPU seconds of everything each simulated node runs for a job: its slurmd is moved into
    a cgroup of its own (what it starts stays there) and moved back by close()."""

    V1, V2 = Path("/sys/fs/cgroup/cpuacct"), Path("/sys/fs/cgroup")

    def __init__(self, cluster, nodes):
        self.groups = {}  # node -> (cgroup dir, slurmd pid, the cgroup it came from)
        root = self.V1 if (self.V1 / "cpuacct.usage").exists() else \
            self.V2 if (self.V2 / "cgroup.controllers").exists() else None
        for node in nodes if root else ():
            pid = harness._read_pid(cluster.path("run", f"slurmd.{node}.pid"))
            group = root / f"uctr-bench-{node}"
            try:
                origin = root / self._cgroup_of(pid, root == self.V1).lstrip("/")
                group.mkdir(exist_ok=True)
                (group / "cgroup.procs").write_text(str(pid))
            except (OSError, TypeError):
                continue
            self.groups[node] = (group, pid, origin)

    @staticmethod
    def _cgroup_of(pid, v1: bool) -> str:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if ("cpuacct" in controllers.split(",")) if v1 else controllers == "":
                return path
        raise OSError(f"no {'cpuacct' if v1 else 'unified'} cgroup for pid {pid}")

    def seconds(self):
        out = {}
        for node, (group, _pid, _origin) in self.groups.items():
            if (group / "cpuacct.usage").exists():
                out[node] = int((group / "cpuacct.usage").read_text()) / 1e9
            else:
                stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
                out[node] = int(stat["usage_usec"]) / 1e6
        return out

    def close(self) -> None:
        for group, pid, origin in self.groups.values():
            try:
                (origin / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass
            for _ in range(50):  # the last of the node's processes may still be leaving
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        self.groups = {}


def registry_counts(cluster):
    lines = cluster.registry.access_log()
    manifests = sum(1 for line in lines if re.match(r'GET /v2/\S+/manifests/\S+ HTTP\S+" 200', line))
    blobs = sum(1 for line in lines if re.match(r'GET /v2/\S+/blobs/\S+ HTTP\S+" 200', line))
    return manifests, blobs


def run_job(cluster, n: int, state: str, image: str, host_hello: str, layer_bytes: int,
            node_cpu: NodeCpu) -> dict:
    nodes = sorted(cluster.nodes, key=lambda name: int(name[4:]))[:n]
    script = job_script(cluster, n, state, image, host_hello)
    args = ["-N", str(n), f"--ntasks-per-node={RANKS_PER_NODE}", "--time=4",
            "-w", ",".join(nodes), "--exclusive"]
    if state not in ("none", "per-node"):
        args.append(f"--container-image={image}")
    cpu0, (m0, b0) = slurmd_child_cpu(cluster, nodes), registry_counts(cluster)
    all0 = node_cpu.seconds()
    submitted = time.time()
    job_id = cluster.submit(script, name=f"scale-{n}-{state}", args=args)
    result = wait_or_cut(cluster, job_id, n, f"scale-{n}-{state}")
    total = time.time() - submitted
    drained = drained_nodes()
    cpu1, (m1, b1) = slurmd_child_cpu(cluster, nodes), registry_counts(cluster)
    all1 = node_cpu.seconds()
    node_all = [all1[node] - all0[node] for node in nodes if node in all0 and node in all1]
    hello = HELLO_RE.findall(result.output)
    starts = [float(t) for t, _host in T_RE.findall(result.output)]
    ok = (result.state == "COMPLETED" and len(hello) == n * RANKS_PER_NODE
          and {int(h[1]) for h in hello} == {n * RANKS_PER_NODE})
    if state == "per-node":
        cpu = {h: float(c) for c, h in re.findall(r"CPU=(\S+) host=(\S+)", result.output)}
        unpacks = {node: 1 for node in nodes}
    else:
        cpu = {node: cpu1[node] - cpu0[node] for node in nodes}
        unpacks = {node: sum("(unpacked)" in line
                             for line in cluster.hook_lines("prolog", node, job_id))
                   for node in nodes}
    row = {"n": n, "state": state, "job": job_id, "ok": ok, "job_state": result.state,
           "ranks_started": len(starts),
           "start_s": (max(starts) - submitted) if starts else None, "total_s": total,
           "manifest_gets": m1 - m0, "blob_gets": b1 - b0,
           "unpacks_per_node": max(unpacks.values()) if unpacks else 0,
           "unpacks": sum(unpacks.values()),
           "cache_bytes_read": (sum(unpacks.values()) * layer_bytes
                                if state not in ("none", "per-node") else 0),
           "cpu_per_node_s": (sum(cpu.values()) / len(cpu)) if cpu else 0.0,
           "cpu_max_node_s": max(cpu.values()) if cpu else 0.0,
           "node_cpu_s": (sum(node_all) / len(node_all)) if len(node_all) == n else None}
    if drained:  # see resume_after_cut
        row["resumed"] = drained
        cluster.resume_nodes()
    if not ok:
        row["output_tail"] = result.output[-2000:]
    print(json.dumps({k: v for k, v in row.items() if k != "output_tail"}), flush=True)
    return row


def wait_or_cut(cluster, job_id: str, n: int, name: str):
    """cluster.wait, but a job whose ranks all started and that is still running
    HANG_GRACE s later is cancelled (see HANG_GRACE)."""
    out = cluster.path("work", name, f"slurm-{job_id}.out")
    all_started = None
    while True:
        state = cluster.job_record(job_id).get("JobState", "")
        if state in harness.TERMINAL_STATES:
            return cluster.wait(job_id)
        try:
            seen = len(T_RE.findall(out.read_text(errors="replace")))
        except OSError:
            seen = 0
        if seen >= n * RANKS_PER_NODE and all_started is None:
            all_started = time.monotonic()
        if all_started is not None and time.monotonic() - all_started > HANG_GRACE:
            subprocess.run(["scancel", str(job_id)], capture_output=True)
            return cluster.wait(job_id, timeout=120)
        time.sleep(0.5)


def drained_nodes() -> list:
    """Nodes Slurm drained. Seen only after a cut (scancel of an MPI hang) on a loaded
    machine: "Kill task failed", the ranks outlived slurmstepd's kill timeout. The bench
    resumes them (the next cell needs them) and the row says so ("resumed")."""
    out = subprocess.run(["sinfo", "-h", "-N", "-t", "drain,drained,draining", "-o", "%N %E"],
                         capture_output=True, text=True).stdout
    return sorted({line.strip() for line in out.splitlines() if line.strip()})


def forget_local(cluster) -> None:
    uid = pwd.getpwnam(TEST_USER).pw_uid
    for node in cluster.nodes:
        cluster.node_exec(node, ["rm", "-rf", f"/tmp/uctr-{uid}", "/tmp/pernode"])


def host_mpi_hello(cluster) -> str:
    """mpi_hello built with the host's mpicc, on the shared state dir (the 'none' jobs)."""
    from tests.harness.mpi_images import MPI_HELLO_C

    directory = cluster.path("bench")
    directory.mkdir(exist_ok=True)
    source, binary = directory / "mpi_hello.c", directory / "mpi_hello"
    source.write_text(MPI_HELLO_C)
    subprocess.run(["mpicc", "-O2", "-o", str(binary), str(source)], check=True)
    binary.chmod(0o755)
    directory.chmod(0o755)
    return str(binary)


def measure(sizes, states, repeat: int = REPEAT) -> dict:
    images = ImageSet(OUT / "images")
    cluster = harness.SessionCluster(REPO, str(common.VENV_PYTHON), images,
                                     nodes=harness.make_nodes(max(sizes)))
    info = common.machine_info(OUT)
    started = time.monotonic()
    cluster.start()
    node_cpu = None
    try:
        node_cpu = NodeCpu(cluster, cluster.nodes)
        info["node CPU"] = ("cgroup per slurmd" if node_cpu.groups else
                            "not measured (no cpuacct or cgroup v2 here)")
        info["cluster bring-up"] = f"{cluster.bringup_seconds:.1f} s for {max(sizes)} nodes"
        image = cluster.image_ref(IMAGE)
        test_image = images[IMAGE]
        layers = test_image.manifest()["layers"]
        layer_bytes = sum(layer["size"] for layer in layers)
        host_hello = host_mpi_hello(cluster)
        rows = []
        # only the cold and warm-cache cells and the baseline need the storage emptied; the
        # warm-node cells alone keep it, so each N unpacks only on its new nodes
        fresh = bool({"cold", "warm-cache", "per-node"} & set(states))
        for n in sizes:
            if fresh:
                cluster.reset_user_storage()
                forget_local(cluster)
            warm = False  # every node holds the rootfs
            for state in states:
                if state == "cold":
                    cluster.reset_user_storage()
                if state == "warm-cache":
                    forget_local(cluster)
                if state == "warm-node" and not warm:  # prime it: one job, not recorded
                    run_job(cluster, n, state, image, host_hello, layer_bytes, node_cpu)
                # the cheap states run REPEAT times (median reported); a cold one cannot
                for _ in range(repeat if state in ("none", "warm-node") else 1):
                    rows.append(run_job(cluster, n, state, image, host_hello, layer_bytes,
                                        node_cpu))
                warm = warm or state in ("cold", "warm-node", "warm-cache")
        cluster.reset_user_storage()
        forget_local(cluster)
    finally:
        if node_cpu is not None:
            node_cpu.close()
        cluster.stop()
    info["bench wall time"] = f"{time.monotonic() - started:.0f} s"
    return {"info": info, "image": {"name": IMAGE, "layers": len(layers),
                                    "layer_bytes": layer_bytes,
                                    "config_bytes": test_image.manifest()["config"]["size"]},
            "rows": rows}


# -- report ----------------------------------------------------------------------------------
def started(row) -> bool:
    """Every rank was seen running (its start time counts even if MPI failed later)."""
    return row["start_s"] is not None and row.get("ranks_started", 0) == row["n"] * RANKS_PER_NODE


def cell(rows, n, state):
    """The run of (N, STATE); of repeated runs, the one with the median start time."""
    found = [r for r in rows if r["n"] == n and r["state"] == state]
    timed = sorted((r for r in found if started(r)),
                   key=lambda r: r["start_s"])
    if timed:
        return timed[(len(timed) - 1) // 2]
    return found[0] if found else None


def merge(old: dict, new: dict) -> dict:
    """NEW, plus the rows of OLD for the (N, state) cells NEW did not measure; every row
    keeps the date of the run it comes from."""
    for data in (old, new):
        for row in data["rows"]:
            row.setdefault("run", data["info"]["date"])
    measured = {(r["n"], r["state"]) for r in new["rows"]}
    kept = [r for r in old["rows"] if (r["n"], r["state"]) not in measured]
    new["rows"] = sorted(kept + new["rows"], key=lambda r: r["n"])
    return new


def run_lines(rows) -> list:
    """Which run each state's rows come from, when they come from more than one."""
    runs = {}
    for r in rows:
        runs.setdefault(r.get("run", "this run"), {}).setdefault(r["state"], set()).add(r["n"])
    if len(runs) < 2:
        return []
    out = ["Rows merged from several runs (--merge):", ""]
    for run, states in sorted(runs.items()):
        cells = "; ".join(f"{state} at N = {', '.join(map(str, sorted(ns)))}"
                          for state, ns in sorted(states.items()))
        out.append(f"- {run}: {cells}")
    return out + [""]


def node_cpu_table(rows, sizes) -> list:
    """Mean CPU per node of every process the node ran for the job, none vs warm-node."""
    table = []
    for n in sizes:
        values = []
        for state in ("none", "warm-node"):
            # only jobs that ended by themselves: a cut one spun in MPI for HANG_GRACE s
            found = [r["node_cpu_s"] for r in rows if r["n"] == n and r["state"] == state
                     and r["ok"] and r.get("node_cpu_s") is not None]
            values.append(sorted(found)[(len(found) - 1) // 2] if found else None)
        if values == [None, None]:
            continue
        gap = f"{values[1] - values[0]:+.2f}" if None not in values else "-"
        table.append([str(n)] + ["-" if v is None else f"{v:.2f}" for v in values] + [gap])
    if not table:
        return []
    return ["CPU per node per job (s, median; everything the node ran: slurmd, prolog, epilog, "
            "slurmstepd, uctr-exec, the ranks):", "",
            common.markdown_table(["N", "none", "uctr warm-node", "container's share"], table),
            ""]


def fmt_s(value):
    return "-" if value is None else f"{value:.1f}"


def report(data) -> str:
    rows, image = data["rows"], data["image"]
    sizes = sorted({r["n"] for r in rows})
    mib = image["layer_bytes"] / 2**20
    out = [common.info_lines(data["info"]),
           f"Image: {image['name']}, {image['layers']} layers, {mib:.1f} MiB compressed. "
           f"One job per cell, {RANKS_PER_NODE} ranks per node, `srun --mpi=pmix` mpi_hello. "
           "All simulated nodes share this machine's cores: the times show its contention, "
           "the counts are what scales (model: docs/scale.md).", "", *run_lines(rows),
           "Job start (s, submit -> last rank running):", ""]
    headers = ["N", "none", "uctr warm-node", "ratio", "uctr warm-cache", "uctr cold",
               "per-node pull", "per-node / cold"]
    table = []
    for n in sizes:
        none, warm, wc, cold, pn = (cell(rows, n, s) for s in
                                    ("none", "warm-node", "warm-cache", "cold", "per-node"))
        get = lambda r: r["start_s"] if r and started(r) else None  # noqa: E731
        ratio = (f"{get(warm) / get(none):.2f}x" if get(warm) and get(none) else "-")
        pn_ratio = (f"{get(pn) / get(cold):.2f}x" if get(pn) and get(cold) else "-")
        table.append([str(n), fmt_s(get(none)), fmt_s(get(warm)), ratio, fmt_s(get(wc)),
                      fmt_s(get(cold)), fmt_s(get(pn)), pn_ratio])
    out += [common.markdown_table(headers, table), ""]
    out += node_cpu_table(rows, sizes)
    out += ["Registry requests, unpacks, shared-cache reads and staging CPU per job:", ""]
    headers = ["N", "state", "manifest GETs", "blob GETs", "unpacks/node", "unpacks",
               "MiB read from shared cache", "CPU s/node (mean)", "CPU s/node (max)", "job"]
    table = []
    for n in sizes:
        for state in ("cold", "warm-cache", "warm-node", "per-node"):
            r = cell(rows, n, state)
            if r is None:
                continue
            table.append([str(n), state, str(r["manifest_gets"]), str(r["blob_gets"]),
                          str(r["unpacks_per_node"]), str(r["unpacks"]),
                          f"{r['cache_bytes_read'] / 2**20:.0f}", f"{r['cpu_per_node_s']:.2f}",
                          f"{r['cpu_max_node_s']:.2f}",
                          r["job_state"] if r["ok"] else f"{r['job_state']} (MPI failed)"])
    out.append(common.markdown_table(headers, table))
    resumed = [r for r in rows if r.get("resumed")]
    if resumed:
        out += ["", "Nodes Slurm drained after a job the bench cancelled (an MPI hang, see "
                "HANG_GRACE; the ranks outlived slurmstepd's kill timeout on the loaded "
                "machine), resumed by the bench: " + "; ".join(
                    f"N = {r['n']} {r['state']} job {r['job']}: {', '.join(r['resumed'])}"
                    for r in resumed) + "."]
    out += ["", "Plots: docs/img/scale-start.png, docs/img/scale-requests.png (shown in "
            "docs/scale.md)."]
    return "\n".join(out)


PLOT = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data = json.load(open(sys.argv[1]))
rows = [r for r in data["rows"] if r.get("ranks_started", 0) == 2 * r["n"] or r["ok"]]
import statistics
def series(state, key):
    ns = sorted({r["n"] for r in rows if r["state"] == state})
    ys = [statistics.median_low([r[key] for r in rows if r["n"] == n and r["state"] == state
                                 and r[key] is not None] or [None]) for n in ns]
    return ns, ys
fig, ax = plt.subplots(figsize=(6.4, 4.2))
for state, style in (("none", "k--"), ("warm-node", "g-o"), ("warm-cache", "b-s"),
                     ("cold", "r-^"), ("per-node", "m:v")):
    x, y = series(state, "start_s")
    label = {"none": "no container", "per-node": "per-node pull (enroot/udocker style)"}.get(state, "uctr " + state)
    ax.plot(x, y, style, label=label)
ax.set_xscale("log", base=2); ax.set_xlabel("nodes (2 ranks each)")
ax.set_ylabel("job start: submit -> last rank running (s)")
ax.set_title("Job start vs nodes (simulated nodes share 2 cores)")
ax.legend(fontsize=8); ax.grid(True, alpha=0.3)
fig.tight_layout(); fig.savefig(sys.argv[2], dpi=110)
fig, ax = plt.subplots(figsize=(6.4, 4.2))
for state, key, style, label in (("cold", "blob_gets", "r-^", "uctr cold: blob GETs"),
                                 ("cold", "manifest_gets", "r--", "uctr cold: manifest GETs"),
                                 ("per-node", "blob_gets", "m:v", "per-node pull: blob GETs"),
                                 ("per-node", "manifest_gets", "m-.", "per-node pull: manifest GETs")):
    x, y = series(state, key)
    if x:  # a --states run without cold or per-node has no request series
        ax.plot(x, y, style, label=label)
ax.set_xscale("log", base=2); ax.set_xlabel("nodes")
if ax.lines:
    ax.set_yscale("log")
ax.set_ylabel("registry requests per job"); ax.set_title("Registry requests vs nodes")
ax.legend(fontsize=8); ax.grid(True, alpha=0.3)
fig.tight_layout(); fig.savefig(sys.argv[3], dpi=110)
"""


def plot(json_path: Path) -> None:
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(["/usr/bin/python3", "-c", PLOT, str(json_path),
                    str(IMG_DIR / "scale-start.png"), str(IMG_DIR / "scale-requests.png")],
                   check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=list(SIZES),
                   help=f"cluster sizes (default {' '.join(map(str, SIZES))}; at most "
                        f"{harness.MAX_NODES})")
    p.add_argument("--states", nargs="+", default=list(STATES), choices=STATES)
    p.add_argument("--repeat", type=int, default=REPEAT, choices=range(1, 11), metavar="1..10",
                   help=f"runs of none and warm-node per N, the median reported (default {REPEAT})")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of bench/out/scale.json this run does not measure")
    p.add_argument("--report-only", action="store_true", help="redo tables/plots from scale.json")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    json_path = OUT / "scale.json"
    if args.report_only:
        data = json.loads(json_path.read_text())
    else:
        if os.geteuid() != 0:
            sys.exit("run as root: the simulated cluster needs namespaces and munge")
        data = measure(sorted(args.nodes), [s for s in STATES if s in args.states], args.repeat)
        if args.merge and json_path.exists():
            data = merge(json.loads(json_path.read_text()), data)
        json_path.write_text(json.dumps(data, indent=1))
    text = report(data)
    common.replace_section("scale", text, heading="## Cluster scale (bench/bench_scale.py)")
    plot(json_path)
    print(text)


if __name__ == "__main__":
    common.reexec_in_venv()
    main()
