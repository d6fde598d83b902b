#!/usr/bin/env python3
"""Benchmark the foundation: hook running, element-info, dependency resolution.

Prints each figure, its target and the ratio against the baseline measured
for diskimage-builder on this machine kind (dib-run-parts: 539 ms for 50
hooks; its resolver: 92 ms end to end for 17 elements, 267 ms for a
2000-element chain), and a bare bash loop over the same 50 hooks, run here.

    python3 benchmarks/runner.py
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from imaging_elements import elements  # noqa: E402
from tests.test_elements import chain_library  # noqa: E402

RUNS = 7


def median_ms(fn, runs=RUNS):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def report(name, ms, target_ms, baseline_ms, baseline_name):
    verdict = "ok" if ms <= target_ms else "OVER TARGET"
    print(f"{name}: {ms:.1f} ms (target <= {target_ms} ms, {verdict}); "
          f"{baseline_name} {baseline_ms} ms; ratio {ms / baseline_ms:.2f}")


def fifty_hooks(tmp):
    hook_dir = os.path.join(tmp, "elements", "fifty", "mount.d")
    os.makedirs(hook_dir)
    with open(os.path.join(tmp, "elements", "fifty", "README.md"), "w") as f:
        f.write("# fifty: 50 trivial hooks\n")
    for i in range(50):
        path = os.path.join(hook_dir, f"{i:02d}-trivial")
        with open(path, "w") as f:
            f.write("#!/bin/bash\ntrue\n")
        os.chmod(path, 0o755)
    events = os.path.join(tmp, "events.jsonl")
    argv = [sys.executable, os.path.join(ROOT, "bin", "euca-image-process"), "-q",
            "--status-file", events, "--work-dir", os.path.join(tmp, "work"), "fifty"]
    env = dict(os.environ, ELEMENTS_PATH=os.path.join(tmp, "elements"))
    phase_ms, hook_ms = [], []
    for _ in range(RUNS):
        subprocess.run(argv, env=env, check=True)
        with open(events) as f:
            records = [json.loads(line) for line in f]
        phase_ms.append(next(r["duration"] for r in records if r["event"] == "phase-end") * 1000)
        hook_ms.append(sum(r["duration"] for r in records if r["event"] == "hook-end") * 1000)
    bash_loop = median_ms(lambda: subprocess.run(
        ["bash", "-c", f'for h in {hook_dir}/*; do "$h"; done'], check=True))
    report("50 trivial hooks through the runner (whole phase)", statistics.median(phase_ms), 100,
           539, "dib-run-parts")
    print(f"  sum of per-hook times {statistics.median(hook_ms):.1f} ms; bare bash loop here "
          f"{bash_loop:.1f} ms (ratio {statistics.median(phase_ms) / bash_loop:.2f})")


def element_info():
    stock = sorted(elements.find_elements("").keys())
    argv = [sys.executable, os.path.join(ROOT, "bin", "element-info"), "--expand-dependencies",
            *stock]
    env = dict(os.environ, ELEMENTS_PATH="")
    ok = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if ok.returncode:  # stock elements that conflict with each other: expand one at a time
        argv = argv[:3] + stock[:1]
    python_alone = median_ms(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))
    ms = median_ms(lambda: subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True))
    report(f"element-info --expand-dependencies ({len(stock)} stock elements), end to end", ms, 50, 92,
           "dib resolver")
    print(f"  of which Python's own start-up: {python_alone:.1f} ms")


def chain():
    library = chain_library(2000)
    ms = median_ms(lambda: elements.resolve(["e0"], library))
    report("2000-element dependency chain, in process", ms, 50, 267, "dib resolver")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        fifty_hooks(tmp)
    element_info()
    chain()


if __name__ == "__main__":
    main()
