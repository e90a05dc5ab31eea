#!/usr/bin/env python3
"""Squashfs images: what a node pays to start from an enroot .sqsh file, against enroot's own
way (unsquashfs), a squashfuse mount, and unpacking the same image from its registry layers.

    python3 bench/bench_squashfs.py [--runs 3] [--no-write]

The image is the cached Debian test image (tests/harness/debian.py, ~120 MiB unpacked). Its
rootfs is made into a squashfs with enroot's options (-all-root -comp lzo -noD when lzo is
there). Cases, each into fresh directories, interleaved round by round:

  unsquashfs       `unsquashfs -d DEST` (enroot create; no checks on what it writes)
  squashfuse       mount with squashfuse and list /usr/bin (enroot start X.sqsh; no unpack)
  uctr-first-node  uctr's cold path: sqfs2tar into the shared cache, then the checked unpack
  uctr-next-node   the conversion already in the shared cache: the checked unpack only
  layers           the same image from its registry layers (gzip) already in the cache

Ratios of medians go to bench/RESULTS.md, section "Squashfs images".
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402


def main() -> int:
    common.reexec_in_venv()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    from tests.harness.debian import cached_debian_layout
    from uctr_batch.image import archive, rootfs, squashfs
    from uctr_batch.image.store import Store

    work = Path(tempfile.mkdtemp(prefix="uctr-bench-sqsh-", dir="/var/tmp"))
    try:
        layout = cached_debian_layout()
        layer_store = Store(work / "layer-cache")
        record = archive.ensure_local(f"oci:{layout}", layer_store)
        source = rootfs.create(record, layer_store, dest=work / "source")
        image = work / "debian.sqsh"
        options = ["-comp", "lzo", "-noD"] if _has_lzo() else []
        common.run_command(["mksquashfs", source, image, "-all-root", "-noappend", "-quiet",
                            "-no-progress", *options])
        size = image.stat().st_size
        warm_store = Store(work / "warm-cache")
        squashfs.ensure_local(str(image), warm_store)  # the first node's conversion

        dest = work / "dest"
        mnt = work / "mnt"

        def fresh():
            common.remove(dest)

        def unsquash():
            common.run_command(["unsquashfs", "-no-xattrs", "-d", dest, image])

        def fuse():
            mnt.mkdir(exist_ok=True)
            common.run_command(["squashfuse", image, mnt])
            try:
                common.run_command(["ls", mnt / "usr" / "bin"])
            finally:
                unmount = shutil.which("fusermount") or shutil.which("fusermount3")
                subprocess.run([unmount, "-u", str(mnt)] if unmount else ["umount", str(mnt)],
                               check=False)

        def first_node():
            cold = Store(dest / "cache")
            rec = squashfs.ensure_local(str(image), cold)
            rootfs.create(rec, cold, dest=dest / "bundle")

        def next_node():
            rec = squashfs.ensure_local(str(image), warm_store)
            rootfs.create(rec, warm_store, dest=dest / "bundle")

        def layers():
            rootfs.create(record, layer_store, dest=dest / "bundle")

        cases = [common.Case("unsquashfs", unsquash, fresh, fresh),
                 common.Case("uctr-first-node", first_node, fresh, fresh),
                 common.Case("uctr-next-node", next_node, fresh, fresh),
                 common.Case("layers", layers, fresh, fresh)]
        if shutil.which("squashfuse") and os.path.exists("/dev/fuse"):
            cases.append(common.Case("squashfuse", fuse))
        samples = common.run_rounds(cases, args.runs, say=print)
    finally:
        common.remove(work)

    results = {name: common.Result(name, "squashfs", name, s) for name, s in samples.items()}
    base = results["unsquashfs"]
    lines = [common.results_table(list(results.values())), "",
             f"- image: the Debian test image, squashfs {size / 2**20:.1f} MiB "
             f"({'lzo -noD, as enroot' if options else 'gzip'})"]
    for name in ("uctr-first-node", "uctr-next-node", "layers", "squashfuse"):
        if name in results:
            value = common.ratio(results[name], base)
            lines.append(f"- {name} / unsquashfs: "
                         + (f"{value:.4f}x" if value < 0.01 else common.fmt_ratio(value)))
    lines.append(f"- uctr-next-node / layers: "
                 f"{common.fmt_ratio(common.ratio(results['uctr-next-node'], results['layers']))}")
    lines.append("- reading: uctr's per-node cost for a .sqsh is its checked layer unpack, the "
                 "same as for registry layers; unsquashfs (no checks) is the floor; squashfuse "
                 "only mounts (reads are paid later, through FUSE, and uctr's modes need a "
                 "directory they can write identity files and mount points into)")
    body = "\n".join(lines) + "\n\n" + common.info_lines(common.machine_info(Path("/var/tmp")))
    print(body)
    if not args.no_write:
        common.replace_section("squashfs", body,
                               heading="## Squashfs images (bench/bench_squashfs.py)")
    return 0


def _has_lzo() -> bool:
    done = subprocess.run(["mksquashfs", "-help"], capture_output=True, text=True)
    return "lzo" in (done.stdout + done.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
