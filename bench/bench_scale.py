#!/usr/bin/env python3
"""Cluster scale: one job of N nodes x 2 ranks running an MPI hello, N = 1 .. 32, on the
simulated Slurm cluster of tests/harness/slurm.py (one slurmd per network namespace, private
/tmp and /dev/shm per node, the shared cache in the test user's home).

    python3 bench/bench_scale.py                 # as root; N = 1 2 4 8 16 32
    python3 bench/bench_scale.py --nodes 1 2 4   # fewer sizes

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
Measured per job: start = submit -> the last rank running (each rank prints its clock
before exec'ing mpi_hello), total = submit -> job finished; registry requests from the
registry's access log (manifest and blob GETs); unpacks per node from the prolog logs (the
baseline: one per node by construction); bytes read from the shared cache (= compressed
layer bytes x unpacks, the unpack reads each layer once); CPU seconds per node spent staging
(slurmd's reaped-children CPU, i.e. prolog + epilog; the baseline: its pull+unpack steps).

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
REPEAT = 3  # runs of "none" and "warm-node" per N (their median is reported)
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


def registry_counts(cluster):
    lines = cluster.registry.access_log()
    manifests = sum(1 for line in lines if re.match(r'GET /v2/\S+/manifests/\S+ HTTP\S+" 200', line))
    blobs = sum(1 for line in lines if re.match(r'GET /v2/\S+/blobs/\S+ HTTP\S+" 200', line))
    return manifests, blobs


def run_job(cluster, n: int, state: str, image: str, host_hello: str, layer_bytes: int) -> dict:
    nodes = sorted(cluster.nodes, key=lambda name: int(name[4:]))[:n]
    script = job_script(cluster, n, state, image, host_hello)
    args = ["-N", str(n), f"--ntasks-per-node={RANKS_PER_NODE}", "--time=4",
            "-w", ",".join(nodes), "--exclusive"]
    if state not in ("none", "per-node"):
        args.append(f"--container-image={image}")
    cpu0, (m0, b0) = slurmd_child_cpu(cluster, nodes), registry_counts(cluster)
    submitted = time.time()
    job_id = cluster.submit(script, name=f"scale-{n}-{state}", args=args)
    result = wait_or_cut(cluster, job_id, n, f"scale-{n}-{state}")
    total = time.time() - submitted
    cpu1, (m1, b1) = slurmd_child_cpu(cluster, nodes), registry_counts(cluster)
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
           "cpu_max_node_s": max(cpu.values()) if cpu else 0.0}
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


def measure(sizes, states) -> dict:
    images = ImageSet(OUT / "images")
    cluster = harness.SessionCluster(REPO, str(common.VENV_PYTHON), images,
                                     nodes=harness.make_nodes(max(sizes)))
    info = common.machine_info(OUT)
    started = time.monotonic()
    cluster.start()
    try:
        info["cluster bring-up"] = f"{cluster.bringup_seconds:.1f} s for {max(sizes)} nodes"
        image = cluster.image_ref(IMAGE)
        test_image = images[IMAGE]
        layers = test_image.manifest()["layers"]
        layer_bytes = sum(layer["size"] for layer in layers)
        host_hello = host_mpi_hello(cluster)
        rows = []
        for n in sizes:
            cluster.reset_user_storage()
            forget_local(cluster)
            for state in states:
                if state == "cold":
                    cluster.reset_user_storage()
                if state == "warm-cache":
                    forget_local(cluster)
                # the cheap states run REPEAT times (median reported); a cold one cannot
                for _ in range(REPEAT if state in ("none", "warm-node") else 1):
                    rows.append(run_job(cluster, n, state, image, host_hello, layer_bytes))
            cluster.reset_user_storage()
            forget_local(cluster)
    finally:
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
           "the counts are what scales (model: docs/scale.md).", "",
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
    out += [common.markdown_table(headers, table), "",
            "Registry requests, unpacks, shared-cache reads and staging CPU per job:", ""]
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
    ax.plot(x, y, style, label=label)
ax.set_xscale("log", base=2); ax.set_yscale("log"); ax.set_xlabel("nodes")
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
    p.add_argument("--report-only", action="store_true", help="redo tables/plots from scale.json")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    json_path = OUT / "scale.json"
    if args.report_only:
        data = json.loads(json_path.read_text())
    else:
        if os.geteuid() != 0:
            sys.exit("run as root: the simulated cluster needs namespaces and munge")
        data = measure(sorted(args.nodes), args.states)
        json_path.write_text(json.dumps(data, indent=1))
    text = report(data)
    common.replace_section("scale", text, heading="## Cluster scale (bench/bench_scale.py)")
    plot(json_path)
    print(text)


if __name__ == "__main__":
    common.reexec_in_venv()
    main()
