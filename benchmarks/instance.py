#!/usr/bin/env python3
"""Benchmark: boot + every stock instance validator + power-off of a Debian 12 disk.

    .venv/bin/python benchmarks/instance.py [--runs 3] [--no-baseline] [--image DISK]

Each run is `imaging_elements.instance.instance.run_phase` with the hooks of
elements/instance-validate-linux on tests.imagebuild.debian_boot_disk() (a
real Debian 12 from tests/images/mkdebian, extlinux, cached), as the runner
calls it. Printed per run and as the median of --runs:
  total      run_phase start to return: overlay, injection, boot, all the
             validators, power-off, cleanup.  The target is <= 30 s (TCG,
             2 cores; issue 7).
  up         qemu start to the agent's first line (the guest has booted);
  checks     the validators, inside the guest;
  off        the last result to qemu's exit.
The baseline is a plain boot of the same disk with qemu (same machine, TCG,
-snapshot) to its serial login prompt, alternated with ours in the same run;
the ratio is total / baseline, the cost of validating over just booting.  The machine's load average is printed: on a
shared machine, other work slows TCG down a lot.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from imaging_elements.engine import hooks as hooks_mod  # noqa: E402
from imaging_elements.instance import instance  # noqa: E402
from imaging_elements.sdk.journal import Journal  # noqa: E402
from benchmarks.compare import alternate, load, report  # noqa: E402
from tests.imagebuild import debian_boot_disk  # noqa: E402

TARGET = 30.0
ELEMENT = os.path.join(ROOT, "elements", "instance-validate-linux", "instance-validate.d")


def run_ours(image, accel):
    names = sorted(os.listdir(ELEMENT), key=hooks_mod.sort_key)
    hooks = [(name, os.path.join(ELEMENT, name)) for name in names]
    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        for sub in ("scratch", "logs"):
            os.makedirs(os.path.join(work, sub))
        journal = Journal(os.path.join(work, "journal.jsonl"))
        env = {"IMG_IMAGE": image, "IMG_IMAGE_TYPE": "raw", "IMG_WORK_DIR": work, "IMG_PLATFORM": "linux",
               "IMG_SCRATCH_DIR": os.path.join(work, "scratch"), "IMG_JOURNAL": journal.path}
        if accel:
            env["IMG_INSTANCE_ACCEL"] = accel
        said = []
        started = time.monotonic()
        try:
            results = instance.run_phase(hooks, env, journal, said.append)
        finally:
            journal.unwind()
        total = time.monotonic() - started
    failed = [f"{r['hook']}: {r['description']}" for r in results if not r["ok"]]
    if failed:
        sys.exit("instance validators failed: " + "; ".join(failed))
    text = " ".join(m.get("describe", "") for m in said)
    up = re.search(r"runs the validators ([\d.]+) s after", text)
    ran = re.search(r"validator\(s\) in ([\d.]+) s and powered off in ([\d.]+) s", text)
    how = re.search(r"under qemu \((\w+):", text)
    return {"total": total, "up": float(up.group(1)) if up else None,
            "checks": float(ran.group(1)) if ran else None, "off": float(ran.group(2)) if ran else None,
            "accel": how.group(1) if how else "?"}


def run_baseline(image):
    """qemu alone: boot the disk (-snapshot) until the serial console shows a login prompt."""
    with tempfile.TemporaryDirectory() as tmp:
        console = os.path.join(tmp, "console")
        started = time.monotonic()
        process = subprocess.Popen(
            ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "pc", "-accel", "tcg",
             "-cpu", "max", "-m", "1024", "-smp", str(min(2, os.cpu_count() or 1)), "-no-reboot",
             "-drive", f"file={image},format=raw,if=virtio,snapshot=on",
             "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0,addr=0x3",
             "-serial", f"file:{console}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while time.monotonic() - started < 600:
                time.sleep(0.1)
                with open(console, "rb") as f:
                    if b"login: " in f.read():
                        return time.monotonic() - started
            sys.exit("baseline: no login prompt within 600 s")
        finally:
            process.kill()
            process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--image", help="a bootable raw disk (default: the test Debian 12 disk)")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the injection mounts the image's overlay")
    image = args.image or debian_boot_disk()
    print(f"image: {image}")
    print(f"cpus: {os.cpu_count()}, load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    runs = []

    def ours():
        run = run_ours(image, args.accel)
        runs.append(run)
        print(f"run {len(runs)}: total {run['total']:.1f} s (accel {run['accel']}: up {run['up']} s, "
              f"checks {run['checks']} s, off {run['off']} s); load {os.getloadavg()[0]:.2f}", flush=True)
        return run["total"]

    if args.no_baseline:
        totals = [ours() for _ in range(args.runs)]
    else:
        # The anchor, a plain boot of the same disk, alternates with ours (benchmarks/compare.py).
        totals, base = alternate(ours, lambda: run_baseline(image), args.runs, warmup=0)
        report("boot + instance validators + power-off, against a plain boot to the login prompt",
               "instance-validate", totals, "qemu boot to login", base, unit="s", scale=1)
    median = statistics.median(totals)
    parts = {k: statistics.median(r[k] for r in runs if r[k] is not None) for k in ("up", "checks", "off")}
    print(f"boot + instance validators + power-off, median of {len(runs)}: {median:.1f} s "
          f"(up {parts['up']:.1f} s, checks {parts['checks']:.1f} s, off {parts['off']:.1f} s)")
    print(f"target {TARGET:.0f} s: {'met' if median <= TARGET else 'NOT met'} (ratio {median / TARGET:.2f})")
    print(load() + " (after)")

if __name__ == "__main__":
    main()
