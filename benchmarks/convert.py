#!/usr/bin/env python3
"""Benchmark the converters: a 1 GiB-class streamOptimized VMDK -> raw through
euca-image-process (element convert-qemu), against bare `qemu-img convert` on
the same file, run alternately in this one script (benchmarks/compare.py).

Targets (issue 5): wall time overhead <= 5 % (ratio printed) and output
allocation <= 1.05 x that of qemu-img's output.  Where our time goes beyond
qemu-img convert is printed by stage, from the runs' event streams.

The VMDK is built here: a 2 GiB disk whose ext4 partition holds the cached
Debian 12 root (tests/images/mkdebian) and 1 GiB of data that compresses like
packed files (3/4 random), so the VMDK itself is about 1 GiB.

    .venv/bin/python benchmarks/convert.py [--runs N] [--keep DIR]
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.compare import alternate, load, report  # noqa: E402
from tests import imagebuild  # noqa: E402

MiB = imagebuild.MiB
DISK_MIB = 2048      # virtual size of the disk
DATA_MIB = 1024      # bulk data beside the Debian root: the VMDK comes to about 1 GiB


def build_vmdk(tmp):
    tree = imagebuild.debian_tree(os.path.join(tmp, "tree"))
    rng = random.Random(1)
    text = (b"imaging elements " * 1000)[:16 << 10]
    with open(os.path.join(tree, "var", "tmp", "data.bin"), "wb") as f:
        for _ in range(DATA_MIB * 16):   # 64 KiB blocks: 48 KiB random (like packed files), 16 KiB text
            f.write(rng.randbytes(48 << 10) + text)
    fs = imagebuild.make_fs(os.path.join(tmp, "fs.ext4"), tree, size=DISK_MIB * MiB - MiB, label="rootfs")
    shutil.rmtree(tree)
    disk = imagebuild.make_disk(os.path.join(tmp, "disk.raw"), [{"image": fs, "bootable": True}],
                                size=DISK_MIB * MiB)
    os.unlink(fs)
    vmdk = imagebuild.qemu_convert(disk, os.path.join(tmp, "disk.vmdk"), "vmdk", "subformat=streamOptimized")
    os.unlink(disk)
    return vmdk


def timed(argv):
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


STAGES = ("start-up (launch to process-start)", "work dir, input type (to phase-start convert)",
          "required-capacity (to hook-start)", "hook start, qemu-img info/map, sandbox (to first progress)",
          "qemu-img convert (first to last progress)", "end (last progress to exit)")


def stages(launched, exited, events_file):
    """Seconds spent in each of STAGES by one run, from its event stream (--status-file)."""
    with open(events_file) as f:
        events = [json.loads(line) for line in f]

    def when(name, **match):
        return [e["time"] for e in events if e["event"] == name
                and all(e.get(k) == v for k, v in match.items())]
    progress = when("progress", phase="convert")
    marks = [launched, when("process-start")[0], when("phase-start", phase="convert")[0],
             when("hook-start", phase="convert")[0], progress[0], progress[-1], exited]
    return [b - a for a, b in zip(marks, marks[1:])]


def allocated(path):
    return os.stat(path).st_blocks * 512


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", help="build (or reuse) the VMDK in this directory")
    args = parser.parse_args()
    tmp = args.keep or tempfile.mkdtemp(prefix="bench-convert-")
    os.makedirs(tmp, exist_ok=True)
    try:
        vmdk = os.path.join(tmp, "disk.vmdk")
        if not os.path.exists(vmdk):
            print("building the VMDK ...", flush=True)
            vmdk = build_vmdk(tmp)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", vmdk], check=True,
                                         stdout=subprocess.PIPE).stdout)
        print(f"input: streamOptimized VMDK, {os.path.getsize(vmdk) / MiB:.0f} MiB file, "
              f"{info['virtual-size'] / MiB:.0f} MiB virtual")
        bare_out, ours_out = os.path.join(tmp, "bare.raw"), os.path.join(tmp, "ours.raw")
        bare_argv = ["qemu-img", "convert", "-f", "vmdk", "-O", "raw", vmdk, bare_out]
        events_file = os.path.join(tmp, "events.jsonl")
        ours_argv = [sys.executable, os.path.join(ROOT, "bin", "euca-image-process"), "-q",
                     "--work-dir", os.path.join(tmp, "work"), "--status-file", events_file,
                     "-i", vmdk, "-o", ours_out, "-T", "raw", "convert-qemu"]
        ours_stages = []
        # Warm the page cache once so that neither side pays for the first read.
        subprocess.run(["cat", vmdk], stdout=subprocess.DEVNULL, check=True)

        def side(argv, out):
            def run():
                if os.path.exists(out):
                    os.unlink(out)
                os.sync()   # neither side waits for the other's dirty pages
                launched = time.time()
                seconds = timed(argv)
                if argv is ours_argv:
                    ours_stages.append(stages(launched, time.time(), events_file))
                return seconds
            return run

        print(load() + " (before)")
        ours, bare = alternate(side(ours_argv, ours_out), side(bare_argv, bare_out), args.runs, warmup=0)
        ratio = report("VMDK -> raw, start to exit", "euca-image-process", ours, "qemu-img convert", bare,
                       unit="s", scale=1, digits=2)
        print(load() + " (after)")
        subprocess.run(["cmp", bare_out, ours_out], check=True)
        b, o = statistics.median(bare), statistics.median(ours)
        print(f"fixed cost {o - b:+.2f} s; overhead ratio {ratio:.3f} ({(ratio - 1) * 100:+.1f} %; "
              f"target <= 1.05: {'ok' if ratio <= 1.05 else 'OVER TARGET'})")
        print("where euca-image-process's time goes, median (min-max) s:")
        for index, stage in enumerate(STAGES):
            values = [run[index] for run in ours_stages]
            print(f"  {stage:<62} {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})")
        alloc_ratio = allocated(ours_out) / allocated(bare_out)
        print(f"allocation: qemu-img {allocated(bare_out) / MiB:.1f} MiB, euca-image-process "
              f"{allocated(ours_out) / MiB:.1f} MiB; ratio {alloc_ratio:.3f} (target <= 1.05: "
              f"{'ok' if alloc_ratio <= 1.05 else 'OVER TARGET'})")
        print("outputs identical (cmp)")
    finally:
        for name in ("bare.raw", "ours.raw", "events.jsonl"):
            if os.path.exists(os.path.join(tmp, name)):
                os.unlink(os.path.join(tmp, name))
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
