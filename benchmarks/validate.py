#!/usr/bin/env python3
"""Benchmark: mount + every validator + the inspection report on a real Debian 12
disk image in a streamOptimized VMDK, against libguestfs' virt-inspector.

    .venv/bin/python benchmarks/validate.py [--runs 5] [--baseline-runs 1] [--no-baseline]

Each run is `euca-image-process -i debian12.vmdk mounters validate-linux inspect`.
Printed per run and as the median of --runs:
  mount+validate  the mount and validate phases (mount, all validators, the report),
                  from the process's own status events: the target is <= 2 s;
  process         the whole command, start to exit (with start-up and unwinding).
The anchor is `virt-inspector` on the same VMDK, timed the same way and
alternated with ours (benchmarks/compare.py) when libguestfs-tools is
installed; it boots an appliance, which needs KVM to be fair (TCG here).
The image is tests/images/mkdebian's root, built once and cached
(tests/guestimages.debian_vmdk).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.compare import alternate, report  # noqa: E402
from tests.guestimages import debian_vmdk, virt_inspector_env  # noqa: E402

TARGET = 2.0


def run_ours(image):
    with tempfile.TemporaryDirectory() as tmp:
        status = os.path.join(tmp, "status.jsonl")
        started = time.monotonic()
        result = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "euca-image-process"), "-i", image,
                                 "--status-file", status, "-q", "mounters", "validate-linux", "inspect"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        total = time.monotonic() - started
        if result.returncode:
            sys.exit(f"euca-image-process failed (exit {result.returncode}):\n{result.stderr}")
        phases = {}
        with open(status) as f:
            for line in f:
                event = json.loads(line)
                if event.get("event") == "phase-end":
                    phases[event["phase"]] = event["duration"]
    return phases.get("mount", 0) + phases.get("validate", 0), total, phases


def run_baseline(image, env):
    started = time.monotonic()
    subprocess.run(["virt-inspector", "--format=vmdk", "-a", image], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.monotonic() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline-runs", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (loop devices and mounts)")
    image = debian_vmdk()
    print(f"image: {image} ({os.path.getsize(image) / 2**20:.0f} MiB streamOptimized VMDK)")
    run_ours(image)  # warm-up: page cache and Python bytecode, as for the baseline's appliance cache
    window, totals = [], []
    for i in range(args.runs):
        ours, total, phases = run_ours(image)
        window.append(ours)
        totals.append(total)
        print(f"run {i + 1}: mount+validate {ours:.2f} s (mount {phases.get('mount', 0):.2f} s, "
              f"validate {phases.get('validate', 0):.2f} s), process {total:.2f} s")
    median, median_total = statistics.median(window), statistics.median(totals)
    verdict = "meets" if median <= TARGET else "misses"
    print(f"euca-image-process: median of {args.runs}: mount+validate {median:.2f} s ({verdict} the "
          f"{TARGET:.0f} s target), whole process {median_total:.2f} s")
    env = None if args.no_baseline else virt_inspector_env()
    if env is None:
        print("anchor: virt-inspector not run" + ("" if args.no_baseline else
              " (libguestfs-tools not installed; it needs KVM to be fair, and this machine has none)"))
        return
    print("anchor: virt-inspector under TCG (no KVM here: unfair to libguestfs)")
    run_baseline(image, env)  # warm-up: builds libguestfs' appliance once
    ours, theirs = alternate(lambda: run_ours(image)[0], lambda: run_baseline(image, env), args.baseline_runs,
                             warmup=0)
    report("mount + validate + inspect", "euca-image-process", ours, "virt-inspector", theirs, unit="s", scale=1,
           digits=2)

if __name__ == "__main__":
    main()
