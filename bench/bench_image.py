"""Image pipeline benchmark: uctr pull and unpack against their floors and peers, in ONE run.

    python3 bench/bench_image.py [--runs 5] [--images debian,debian-openmpi,...]

Unpack (layers already in the cache, everything on tmpfs):
    GNU tar -x of the layers in sequence (the floor: no whiteouts, no safety checks),
    uctr's flatten as a library call and as `uctr create --dest` (whole command),
    `umoci unpack --rootless`, and `udocker create` (1.3.17, see setup_peers.sh).
Pull (cold destination, same local docker-registry):
    curl of the blobs to /dev/null (the raw HTTP floor), `uctr pull` (digests verified) as a
    command and as a library call, `skopeo copy docker://... oci:DIR`, `udocker pull`.

The test images are the suite's own (tests/harness): busybox, the mmdebstrap "debian" minbase
and, when they are cached, the two-layer "debian-openmpi" / "debian-mpich". When uctr pull
misses its target (2x skopeo) a profile shows where its time goes.
Writes the "image" section of bench/RESULTS.md and prints it on stdout.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# Run as a file (python3 bench/bench_image.py): the repository root holds bench/, tests/ and
# uctr_batch/, which this script drives; it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import (  # noqa: E402
    Case, Result, fmt_ratio, fmt_time, markdown_table, ratio, say,
)

SECTION = "image"
HEADING = "## Image pipeline (bench/bench_image.py)"
TAG = "1"
UDOCKER = Path(os.environ.get("UCTR_BENCH_PREFIX", "/opt/uctr-bench")) / "udocker-venv/bin/udocker"
UDOCKER_ENV = UDOCKER.parent.parent.parent / "udocker-env"
UDOCKER_TOOLS_VERSION = "1.2.11"
UNPACK_TARGET = 0.85  # x GNU tar throughput
PULL_TARGET = 2.0  # x faster than skopeo copy
STARTUP_BOUND_BYTES = 10 << 20  # smaller images measure process start-up, not throughput
PULL_IMAGE_STEP = "pull_image(): manifests, blobs, cache"
STARTUP_STEP = "spawn + interpreter start (site, encodings) to the first line"
TEARDOWN_STEP = "exit: interpreter teardown (thread joins, module cleanup) + reaping"
DEFAULT_IMAGES = ("debian", "debian-openmpi", "debian-mpich", "busybox")
MEDIA_TAR_FLAGS = {"gzip": "-z", "zstd": "--zstd", "none": ""}



# -- images --------------------------------------------------------------------------------------
@dataclass
class LayerFile:
    digest: str
    media_type: str
    size: int  # compressed
    path: Path  # blob in the tmpfs copy of the layout
    tar_bytes: int = 0  # uncompressed
    members: int = 0

    @property
    def compression(self) -> str:
        if "zstd" in self.media_type:
            return "zstd"
        return "gzip" if "gzip" in self.media_type else "none"


@dataclass
class BenchImage:
    name: str
    layout: Path  # tmpfs copy
    ref: str = ""  # on the local registry
    layers: Tuple[LayerFile, ...] = ()
    config_digest: str = ""

    @property
    def oci_ref(self) -> str:
        return f"{self.layout}:{TAG}"

    @property
    def tar_bytes(self) -> int:
        return sum(layer.tar_bytes for layer in self.layers)

    @property
    def compressed(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def members(self) -> int:
        return sum(layer.members for layer in self.layers)


def cached_layout(name: str, build: bool, scratch: Path) -> Optional[Path]:
    """The harness's layout for NAME: busybox is built here (seconds); the mmdebstrap images
    come from the suite's cache, and are built only with --build-missing (minutes)."""
    from tests.harness import debian, mpi_images
    from tests.harness.images import ImageSet

    if name in mpi_images.FLAVOURS:
        mirror = debian.host_mirror()
        path = mpi_images.cache_root() / (f"{name}-{debian.SUITE}-"
                                          f"{mpi_images.recipe_key(name, mirror)}")
        if not (path / "index.json").exists() and not build:
            return None
        return mpi_images.cached_mpi_layout(name)
    if name == "debian":
        key = debian.recipe_key(debian.host_mirror())
        path = debian.cache_root() / f"debian-{debian.SUITE}-{key}"
        if not (path / "index.json").exists() and not build:
            return None
        return debian.cached_debian_layout()
    return ImageSet(scratch)[name].layout


def load_image(name: str, source: Path, dest: Path) -> BenchImage:
    """Copy the layout to tmpfs (tar and umoci read it there) and describe its layers."""
    shutil.copytree(source, dest)
    index = json.loads((dest / "index.json").read_text())
    entry = next(m for m in index["manifests"]
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == TAG)
    manifest = json.loads(_blob(dest, entry["digest"]).read_text())
    layers = tuple(LayerFile(la["digest"], la["mediaType"], la["size"], _blob(dest, la["digest"]))
                   for la in manifest["layers"])
    for layer in layers:
        layer.tar_bytes, layer.members = _tar_facts(layer)
    return BenchImage(name, dest, layers=layers, config_digest=manifest["config"]["digest"])


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


class _Counting:
    """File-like reader that counts the bytes passing through."""

    def __init__(self, raw):
        self.raw, self.count = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data


def _tar_facts(layer: LayerFile) -> Tuple[int, int]:
    """(uncompressed bytes, tar members) of a layer."""
    with open(layer.path, "rb") as raw:
        if layer.compression == "gzip":
            import gzip
            stream = gzip.GzipFile(fileobj=raw)
        elif layer.compression == "zstd":
            import zstandard
            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        else:
            stream = raw
        counting = _Counting(stream)
        with tarfile.open(fileobj=counting, mode="r|") as tar:
            members = sum(1 for _ in tar)
        while counting.read(1 << 20):  # padding after the end-of-archive blocks
            pass
        return counting.count, members


# -- the environment of the runs -----------------------------------------------------------------
class Bench:
    """Work directories, the registry, and the environment each tool runs with."""

    def __init__(self, work: Path, runs: int, use_udocker: bool):
        self.work, self.runs = work, runs
        self.registry = None
        self.python = sys.executable
        self.udocker = UDOCKER if use_udocker else None
        self.images: List[BenchImage] = []

    def start_registry(self) -> None:
        from tests.harness.registry import Registry

        self.registry = Registry(self.work / "registry").start()

    def stop(self) -> None:
        if self.registry is not None:
            self.registry.stop()

    def push(self, image: BenchImage) -> None:
        """Push with skopeo (digests preserved) as NAME:1, and as library/NAME:1 for udocker,
        which maps a bare name to library/NAME."""
        from tests.harness.images import TestImage, push

        harness_image = TestImage(image.name, image.layout, TAG)
        image.ref = push(harness_image, self.registry)
        push(harness_image, self.registry, repo=f"library/{image.name}")

    # environments
    def uctr_env(self, cache: Path) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UCTR_")}
        env.update(PYTHONPATH=str(common.REPO), UCTR_CACHE=str(cache),
                   UCTR_INSECURE_REGISTRIES=self.registry.host,
                   UCTR_CONFIG_DIR=str(self.work / "uctr-config"),
                   UCTR_LOCAL_DIR=str(self.work / "uctr-local"))
        return env

    def uctr_argv(self, *args: str) -> List[str]:
        return [self.python, "-m", "uctr_batch", *args]

    def udocker_env(self, udocker_dir: Path) -> Dict[str, str]:
        env = dict(os.environ, UDOCKER_DIR=str(udocker_dir))
        if UDOCKER_ENV.exists():  # Debian's engines (setup_peers.sh); create needs none
            for line in UDOCKER_ENV.read_text().splitlines():
                match = re.match(r"^([A-Z_]+)=(\S+)", line)
                if match:
                    env[match.group(1)] = match.group(2)
        return env

    def udocker_argv(self, *args: str) -> List[str]:
        root = ["--allow-root"] if os.geteuid() == 0 else []
        return [str(self.udocker), *root, *args]

    def fresh_udocker_dir(self, path: Path) -> None:
        """An empty udocker repository that believes its tools are installed (offline)."""
        common.remove(path)
        (path / "lib").mkdir(parents=True)
        (path / "lib" / "VERSION").write_text(UDOCKER_TOOLS_VERSION + "\n")


# -- pull ----------------------------------------------------------------------------------------
def pull_cases(bench: Bench, image: BenchImage) -> List[Case]:
    work = bench.work / "pull" / image.name
    work.mkdir(parents=True)
    host = bench.registry.host
    repo = image.ref.split("/", 1)[1].rsplit(":", 1)[0]
    urls = [f"http://{host}/v2/{repo}/blobs/{d}"
            for d in (image.config_digest, *(la.digest for la in image.layers))]
    curl = ["curl", "--fail", "--silent", "--show-error"]
    for url in urls:
        curl += ["-o", "/dev/null", url]
    cache, lib_cache, oci, udir = (work / n for n in ("uctr-cache", "lib-cache", "oci", "udocker"))
    cases = [
        Case("curl", common.command(curl)),
        Case("uctr", common.command(bench.uctr_argv("pull", image.ref), bench.uctr_env(cache),
                                    common.REPO),
             prepare=lambda: common.remove(cache)),
        Case("uctr-lib", lambda: _library_pull(bench, image, lib_cache),
             prepare=lambda: common.remove(lib_cache)),
        Case("skopeo", common.command(
            ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
             f"docker://{image.ref}", f"oci:{oci}:{TAG}"]),
             prepare=lambda: common.remove(oci)),
    ]
    if bench.udocker:
        cases.append(Case("udocker", common.command(
            bench.udocker_argv("pull", f"--registry=http://{host}", f"{image.name}:{TAG}"),
            bench.udocker_env(udir)), prepare=lambda: bench.fresh_udocker_dir(udir)))
    return cases


def _library_pull(bench: Bench, image: BenchImage, cache: Path) -> None:
    """pull_image() in this (warm) interpreter: the data path without start-up costs."""
    from uctr_batch import records, settings
    from uctr_batch.image import platforms, pull, reference
    from uctr_batch.image.store import Store

    config = records.replace(settings.registry_config(), insecure=(bench.registry.host,))
    pull.pull_image(reference.parse(image.ref), config, Store(cache),
                    platforms.wanted_or_host(None))


PULL_TOOLS = {
    "curl": ("curl (floor)", "GET config + layer blobs -> /dev/null, one process, no verification"),
    "uctr": ("uctr pull", "`python -m uctr_batch pull`, new process, empty cache, sha256 verified"),
    "uctr-lib": ("uctr pull_image()", "library call in a warm interpreter, empty cache"),
    "skopeo": ("skopeo copy", "docker://... -> oci:DIR (empty), digests verified"),
    "udocker": ("udocker pull", "1.3.17, empty UDOCKER_DIR; does not verify digests"),
}


# -- unpack --------------------------------------------------------------------------------------
def unpack_cases(bench: Bench, image: BenchImage, pulled_cache: Path) -> List[Case]:
    work = bench.work / "unpack" / image.name
    work.mkdir(parents=True)
    dest = work / "dest"
    mkdest = lambda: dest.mkdir()  # noqa: E731
    clean = lambda: common.remove(dest)  # noqa: E731

    def tar() -> None:
        for layer in image.layers:
            flag = MEDIA_TAR_FLAGS[layer.compression]
            common.run_command(["tar", "--no-same-owner", "-x", *([flag] if flag else []),
                                "-f", layer.path, "-C", dest])

    library_layers = _cached_layers(bench, image, pulled_cache)

    def library() -> None:
        from uctr_batch.image import flatten

        flatten.unpack_layers(library_layers, dest)

    create_parent = work / "create"
    create_parent.mkdir()
    cases = [
        Case("tar", tar, prepare=mkdest, cleanup=clean),
        Case("uctr-lib", library, prepare=mkdest, cleanup=clean),
        Case("uctr", common.command(
            bench.uctr_argv("create", "--no-pull", "--dest", str(create_parent / "b"), image.ref),
            bench.uctr_env(pulled_cache), common.REPO),
             cleanup=lambda: (common.remove(create_parent), create_parent.mkdir())),
        Case("umoci", common.command(["umoci", "unpack", "--rootless", "--image", image.oci_ref,
                                      dest]), cleanup=clean),
    ]
    if bench.udocker:
        udir = work / "udocker"
        bench.fresh_udocker_dir(udir)
        env = bench.udocker_env(udir)
        common.run_command(bench.udocker_argv("pull", f"--registry=http://{bench.registry.host}",
                                              f"{image.name}:{TAG}"), env)
        containers = udir / "containers"
        cases.append(Case("udocker", common.command(
            bench.udocker_argv("create", f"{image.name}:{TAG}"), env),
            cleanup=lambda: (common.remove(containers), containers.mkdir())))
    return cases


def _cached_layers(bench: Bench, image: BenchImage, cache: Path) -> list:
    """(blob path, Layer) of IMAGE in uctr's cache, pulled there first by the command."""
    from uctr_batch.image.manifest import Layer
    from uctr_batch.image.store import Store

    common.run_command(bench.uctr_argv("pull", image.ref), bench.uctr_env(cache), common.REPO)
    store = Store(cache)
    return [(store.blob_path(la.digest), Layer(la.digest, la.media_type, la.size))
            for la in image.layers]


UNPACK_TOOLS = {
    "tar": ("GNU tar -x (floor)", "layers in sequence, --no-same-owner; no whiteouts, no safety"),
    "uctr-lib": ("uctr unpack_layers()", "library call: digest check, validation, whiteouts"),
    "uctr": ("uctr create --dest", "whole command: new process, cache lookup, lock, rename"),
    "umoci": ("umoci unpack --rootless", "also verifies digests and writes an mtree manifest"),
    "udocker": ("udocker create", "1.3.17; layers already pulled into UDOCKER_DIR"),
}


# -- profile of uctr pull ------------------------------------------------------------------------
PHASES_SCRIPT = r"""
import time
born = time.time()  # wall clock: the parent compares it with when it spawned us
import json, sys
marks = [("start", time.perf_counter())]
def mark(name): marks.append((name, time.perf_counter()))
import uctr_batch.cli as cli
mark("import uctr_batch.cli (log, errors, argparse)")
argv = ["pull", sys.argv[1]]
try:
    parser = cli.build_parser(argv)  # builds only the chosen subcommand's arguments
except TypeError:  # an older cli.py: every subcommand
    parser = cli.build_parser()
args = parser.parse_args(argv)
mark("build_parser() + parse_args")
import requests
mark("import requests (urllib3, charset_normalizer, idna, ...)")
from uctr_batch.image import pull, reference, registry
from uctr_batch.image.store import Store
mark("import uctr pull/registry/store/auth modules")
if hasattr(pull, "command_context"):
    store, config = pull.command_context(args)
else:
    from uctr_batch import settings
    config, store = settings.registry_config(args), Store(settings.default_cache_dir())
mark("site policy + settings + cache directory")
calls = {}
def timed(cls, name, key):
    original = getattr(cls, name)
    def wrapper(*a, **k):
        started = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            calls.setdefault(key, []).append(time.perf_counter() - started)
    setattr(cls, name, wrapper)
timed(registry.RegistryClient, "get_manifest", "manifest GET")
timed(registry.RegistryClient, "download_blob", "blob GET + sha256 + write")
timed(Store, "ingest_blob", "Store.ingest_blob")
timed(Store, "record", "Store.record")
from uctr_batch.image import platforms
ref, wanted = reference.parse(sys.argv[1]), platforms.wanted_or_host(None)
pull.pull_image(ref, config, store, wanted)
mark("pull_image(): manifests, blobs, cache")
steps = [(n, b - a) for (_, a), (n, b) in zip(marks, marks[1:])]
first_calls, calls = calls, {}
# The same pull again into an empty cache, in this now warm process: the data path alone.
started = time.perf_counter()
pull.pull_image(ref, config, Store(sys.argv[2]), wanted)
warm = time.perf_counter() - started
print(json.dumps({"steps": steps, "calls": first_calls, "warm": warm, "born": born,
                  "done": time.time()}))
"""


def profile_pull(bench: Bench, image: BenchImage, pulled: Dict[str, Result]) -> str:
    """Where a cold `uctr pull` spends its time, in fresh processes: markdown. PULLED holds
    this run's pull results for IMAGE (skopeo and the warm library call for comparison)."""
    steps, totals, counts, walls, warms = _phase_samples(bench, image, bench.runs)
    bare = _median_command([bench.python, "-c", "pass"], bench.runs)
    med = {name: _median(v) for name, v in steps.items()}
    wall = _median(walls)
    rows = [[name, fmt_time(v), _pct(v, wall)] for name, v in med.items()]
    rows.append(["**whole process** (medians of the phases need not add up exactly)",
                 f"**{fmt_time(wall)}**", "100 %"])
    inside = [[name, f"{_median(counts[name]):.0f}", fmt_time(_median(values))]
              for name, values in sorted(totals.items())]
    fresh = med[PULL_IMAGE_STEP]
    before = sum(v for n, v in med.items() if n not in (PULL_IMAGE_STEP, TEARDOWN_STEP))
    warm, skopeo = _median(warms), pulled["skopeo"].median
    reading = [
        f"- Start-up before the first request (interpreter to policy): {fmt_time(before)} of "
        f"the {fmt_time(wall)} process; `skopeo copy` took {fmt_time(skopeo)} in this run, so a "
        f"pull {PULL_TARGET:.0f}x faster must finish in {fmt_time(skopeo / PULL_TARGET)}.",
        f"- pull_image() costs {fmt_time(fresh)} the first time in a process and "
        f"{fmt_time(warm)} when the same process pulls again into an empty cache: "
        f"{fmt_time(fresh - warm)} of first-call cost (imports inside, thread pools, the first "
        "connection).",
        f"- `python -c pass` + the warm data path = {fmt_time(bare + warm)}, "
        f"{skopeo / (bare + warm):.1f}x faster than skopeo: what a Python CLI with this data "
        "path could reach with no other start-up cost.",
    ]
    text = [f"Fresh processes, {bench.runs} runs after one warm-up, median ({image.name}, "
            "empty cache); each phase is timed inside the process:\n\n",
            markdown_table(["phase", "median", "share"], rows),
            "\nInside pull_image() (summed over calls; layers download in parallel threads):\n\n",
            markdown_table(["call", "calls", "median total"], inside),
            "\nData-path floors for the same layer bytes, measured in this run (the curl floor is "
            "in the pull table):\n\n",
            markdown_table(["operation", "median"], _data_floor(bench, image)),
            "\n`python -X importtime -m uctr_batch pull` (top-level imports, cumulative):\n\n",
            markdown_table(["module", "cumulative"], _importtime(bench, image)),
            "\nReading:\n\n", "\n".join(reading), "\n"]
    return "".join(text)


def _phase_samples(bench: Bench, image: BenchImage, runs: int):
    """Run PHASES_SCRIPT RUNS times (after one warm-up) in fresh processes: per-phase seconds,
    per-call total seconds and call counts, whole-process wall times, and the times of a
    second pull in the same (warm) process."""
    cache = bench.work / "profile" / image.name
    warm_cache = bench.work / "profile" / (image.name + "-warm")
    env = bench.uctr_env(cache)
    warms: List[float] = []
    steps: Dict[str, List[float]] = {}
    totals: Dict[str, List[float]] = {}
    counts: Dict[str, List[int]] = {}
    walls: List[float] = []
    for run_no in range(runs + 1):  # the first run warms .pyc files and the page cache
        common.remove(cache)
        common.remove(warm_cache)
        spawned, started = time.time(), time.perf_counter()
        out = common.run_command([bench.python, "-c", PHASES_SCRIPT, image.ref, warm_cache], env,
                                 common.REPO, stdout=subprocess.PIPE)
        wall, exited = time.perf_counter() - started, time.time()
        if run_no == 0:
            continue
        data = json.loads(out.stdout)
        walls.append(wall - data["warm"])  # the second, warm pull is not part of `uctr pull`
        warms.append(data["warm"])
        steps.setdefault(STARTUP_STEP, []).append(data["born"] - spawned)
        for name, seconds in data["steps"]:
            steps.setdefault(name, []).append(seconds)
        for name, values in data["calls"].items():
            totals.setdefault(name, []).append(sum(values))
            counts.setdefault(name, []).append(len(values))
        steps.setdefault(TEARDOWN_STEP, []).append(exited - data["done"])
    return steps, totals, counts, walls, warms


def _data_floor(bench: Bench, image: BenchImage) -> List[List[str]]:
    import hashlib

    data = b"".join(layer.path.read_bytes() for layer in image.layers)
    target = bench.work / "profile" / "write-test"

    def write() -> None:
        with open(target, "wb") as f:
            f.write(data)

    hash_t = _median([common.time_call(lambda: hashlib.sha256(data).digest())
                      for _ in range(bench.runs)])
    write_t = _median([common.time_call(write) for _ in range(bench.runs)])
    common.remove(target)
    mb = len(data) / 1e6
    return [[f"sha256 of the {mb:.0f} MB of layers (hashlib, one core)", fmt_time(hash_t)],
            [f"write {mb:.0f} MB to tmpfs (one write)", fmt_time(write_t)]]


def _importtime(bench: Bench, image: BenchImage, top: int = 12) -> List[List[str]]:
    cache = bench.work / "profile" / "importtime"
    common.remove(cache)
    out = common.run_command([bench.python, "-X", "importtime", "-m", "uctr_batch", "pull",
                              image.ref], bench.uctr_env(cache), common.REPO)
    rows = []
    for line in out.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)  # top level only
        if match:
            rows.append((int(match.group(1)), match.group(2)))
    rows.sort(reverse=True)
    return [[name, f"{us / 1000:.1f} ms"] for us, name in rows[:top]]


def _median_command(argv: List[str], runs: int) -> float:
    run = common.command(argv)
    run()
    return _median([common.time_call(run) for _ in range(runs)])


def _median(values) -> float:
    import statistics

    return statistics.median(values)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f} %"


# -- report --------------------------------------------------------------------------------------
def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def image_table(images: List[BenchImage]) -> str:
    rows = [[i.name, len(i.layers), ", ".join(la.compression for la in i.layers), _mb(i.compressed),
             _mb(i.tar_bytes), i.members] for i in images]
    return markdown_table(["image", "layers", "compression", "compressed", "uncompressed",
                           "tar entries"], rows)


def make_results(kind: str, image: BenchImage, samples: Dict[str, List[float]],
                 tools: Dict[str, Tuple[str, str]]) -> Dict[str, Result]:
    out = {}
    for key, values in samples.items():
        label, note = tools[key]
        result = Result(f"{kind}.{key}.{image.name}", kind, label, values, note)
        basis = image.tar_bytes if kind == "unpack" else image.compressed
        result.extra["MB/s"] = f"{basis / 1e6 / result.median:.0f}"
        out[key] = result
    return out


def unpack_ratios(all_results: Dict[str, Dict[str, Result]],
                  images: Dict[str, BenchImage]) -> str:
    rows = []
    for name, res in all_results.items():
        tar = res["tar"]
        cells = [name]
        for key in ("uctr-lib", "uctr", "umoci", "udocker"):
            cells.append(fmt_ratio(ratio(tar, res[key])) if key in res else "n/a")
        whole = ratio(tar, res["uctr"])
        cells.append(fmt_ratio(ratio(res["umoci"], res["uctr"])))
        cells.append(fmt_ratio(ratio(res["udocker"], res["uctr"])) if "udocker" in res else "n/a")
        cells.append(_verdict(whole, UNPACK_TARGET, _startup_bound(images[name])))
        rows.append(cells)
    return markdown_table(
        ["image", "uctr lib / tar", "uctr create / tar", "umoci / tar", "udocker / tar",
         "uctr create vs umoci", "uctr create vs udocker", f"target >= {UNPACK_TARGET}x tar"],
        rows)


def pull_ratios(all_results: Dict[str, Dict[str, Result]],
                images: Dict[str, BenchImage]) -> str:
    rows = []
    for name, res in all_results.items():
        uctr = res["uctr"]
        rows.append([
            name,
            fmt_ratio(ratio(res["skopeo"], uctr)),
            fmt_ratio(ratio(res["skopeo"], res["uctr-lib"])),
            fmt_ratio(ratio(res["skopeo"], res["curl"])),
            fmt_ratio(ratio(res["curl"], uctr)),
            fmt_ratio(ratio(res["udocker"], uctr)) if "udocker" in res else "n/a",
            _verdict(ratio(res["skopeo"], uctr), PULL_TARGET, _startup_bound(images[name])),
        ])
    return markdown_table(
        ["image", "uctr pull vs skopeo", "uctr pull_image() vs skopeo", "curl floor vs skopeo",
         "uctr pull / floor", "uctr pull vs udocker", f"target >= {PULL_TARGET}x skopeo"], rows)


def _verdict(value: float, target: float, startup_bound: bool = False) -> str:
    if startup_bound:  # a throughput target means nothing for a 1 MB image
        return f"n/a: start-up bound ({fmt_ratio(value)})"
    return f"{'met' if value >= target else 'MISSED'} ({fmt_ratio(value)})"


def _startup_bound(image: BenchImage) -> bool:
    return image.compressed < STARTUP_BOUND_BYTES


def versions(bench: Bench) -> Dict[str, str]:
    out = {
        "GNU tar": common.tool_version(["tar", "--version"]),
        "umoci": common.tool_version(["umoci", "--version"]),
        "skopeo": common.tool_version(["skopeo", "--version"]),
        "curl": common.tool_version(["curl", "--version"]),
        "docker-registry": common.tool_version(["docker-registry", "--version"]),
    }
    out["udocker"] = (common.tool_version(bench.udocker_argv("version")) if bench.udocker
                      else "not installed (bench/setup_peers.sh)")
    try:
        import isal
        out["uctr inflate"] = f"isal {isal.__version__} (python-isal)"
    except ImportError:
        out["uctr inflate"] = "zlib (isal not installed)"
    return out


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="timed runs per case (default 5)")
    p.add_argument("--images", default=",".join(DEFAULT_IMAGES),
                   help="comma-separated test images (default: %(default)s; missing "
                        "mmdebstrap images are skipped unless --build-missing)")
    p.add_argument("--build-missing", action="store_true",
                   help="build missing mmdebstrap images (minutes, needs the Debian mirror)")
    p.add_argument("--workdir", default="/dev/shm", help="tmpfs to run in (default /dev/shm)")
    p.add_argument("--max-load", type=float, default=None,
                   help="wait for the 1-min load average to drop below this first "
                        "(default: half the CPUs)")
    p.add_argument("--wait", type=float, default=300, help="longest wait for --max-load (s)")
    p.add_argument("--skip", default="", help="comma-separated groups to skip: pull,unpack")
    p.add_argument("--no-udocker", action="store_true", help="leave udocker out")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="profile uctr pull (auto: when it misses its target)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return p.parse_args(argv)


def main(argv=None) -> int:
    common.reexec_in_venv()
    args = parse_args(argv)
    # A plain kill should still stop the registry and remove the tmpfs work directory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    skip = set(filter(None, args.skip.split(",")))
    nproc = len(os.sched_getaffinity(0))
    load = common.wait_for_quiet(args.max_load or nproc / 2, args.wait, say)
    work = Path(tempfile.mkdtemp(prefix="uctr-bench-image-", dir=args.workdir))
    use_udocker = not args.no_udocker and UDOCKER.exists()
    if not use_udocker and not args.no_udocker:
        say(f"udocker not found at {UDOCKER}: run bench/setup_peers.sh; comparing without it")
    bench = Bench(work, args.runs, use_udocker)
    try:
        info = common.machine_info(work)
        info["load at start"] += f" (waited for < {args.max_load or nproc / 2:.2f}; " \
                                 f"{load:.2f} when starting)"
        body = run_all(bench, args, skip, info)
    finally:
        bench.stop()
        common.remove(work)
    sys.stdout.write(f"{HEADING}\n\n{body}")
    if not args.no_write:
        common.replace_section(SECTION, body, HEADING)
        say(f"wrote the '{SECTION}' section of {common.RESULTS}")
    return 0


def profiled_image(images: List[BenchImage]) -> Optional[BenchImage]:
    """The image whose pull is profiled: the Debian minbase, else the first."""
    return next((i for i in images if i.name == "debian"), images[0] if images else None)


def wants_profile(mode: str, pulled: Dict[str, Result]) -> bool:
    if mode != "auto":
        return mode == "always"
    return ratio(pulled["skopeo"], pulled["uctr"]) < PULL_TARGET


def run_all(bench: Bench, args, skip, info: Dict[str, str]) -> str:
    started = time.monotonic()
    bench.start_registry()
    missing = []
    for name in filter(None, args.images.split(",")):
        source = cached_layout(name, args.build_missing, bench.work / "built")
        if source is None:
            missing.append(name)
            say(f"{name}: not in the test image cache; skipped (--build-missing builds it)")
            continue
        image = load_image(name, source, bench.work / "layouts" / name)
        bench.push(image)
        bench.images.append(image)
        say(f"{name}: {len(image.layers)} layer(s), {_mb(image.compressed)} compressed, "
            f"{_mb(image.tar_bytes)} uncompressed, pushed as {image.ref}")
    pulls: Dict[str, Dict[str, Result]] = {}
    unpacks: Dict[str, Dict[str, Result]] = {}
    profile = ""
    for image in bench.images:
        if "pull" not in skip:
            say(f"pull {image.name}:")
            samples = common.run_rounds(pull_cases(bench, image), bench.runs, say=say)
            pulls[image.name] = make_results("pull", image, samples, PULL_TOOLS)
            if image is profiled_image(bench.images) and wants_profile(args.profile,
                                                                       pulls[image.name]):
                say(f"profile of uctr pull {image.name} (right after its pull group):")
                profile = profile_pull(bench, image, pulls[image.name])
        if "unpack" not in skip:
            say(f"unpack {image.name}:")
            cases = unpack_cases(bench, image, bench.work / "pulled" / image.name)
            samples = common.run_rounds(cases, bench.runs, say=say)
            unpacks[image.name] = make_results("unpack", image, samples, UNPACK_TOOLS)
    info["load at end"] = "%.2f %.2f %.2f" % common.load_average()
    info["duration"] = f"{time.monotonic() - started:.0f} s"
    info["runs"] = f"{bench.runs} timed per case after 1 untimed warm-up round, cases interleaved"
    return report(bench, info, pulls, unpacks, profile, missing)


def report(bench: Bench, info, pulls, unpacks, profile: str, missing: List[str]) -> str:
    by_name = {image.name: image for image in bench.images}
    out = ["Measured in one run, on tmpfs, against a local Debian docker-registry; ratios "
           "compare medians of the same run. Regenerate: `python3 bench/bench_image.py`.\n\n",
           common.info_lines(info), common.info_lines(versions(bench)), "\n",
           "### Images\n\n", image_table(bench.images)]
    if missing:
        out.append(f"\nNot measured (not in the test image cache): {', '.join(missing)}.\n")
    if unpacks:
        out += ["\n### Unpack: layers already in the cache -> root filesystem\n\n",
                "Throughput ratio = GNU tar's median time / the tool's (higher is faster). "
                "MB/s counts uncompressed layer bytes.\n\n",
                unpack_ratios(unpacks, by_name), "\n",
                common.results_table([r for res in unpacks.values() for r in res.values()],
                                     ["MB/s"])]
    if pulls:
        out += ["\n### Pull: cold destination, same local registry\n\n",
                "Speed-up = skopeo's median time / the tool's (higher is faster). "
                "MB/s counts compressed blob bytes.\n\n",
                pull_ratios(pulls, by_name), "\n",
                common.results_table([r for res in pulls.values() for r in res.values()],
                                     ["MB/s"])]
    if profile:
        out += ["\n### Where a cold `uctr pull` spends its time\n\n", profile]
    return "".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
