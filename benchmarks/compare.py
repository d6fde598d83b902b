"""The one way the benchmarks compare: run ours and an anchor alternately in
the same run, then print both medians, min-max and the ratio.

    from benchmarks.compare import alternate, report
    ours, anchor = alternate(run_ours, run_anchor, runs=7)
    report("50 hooks", "ours", ours, "dib-run-parts", anchor, unit="ms")

Each function returns a number (seconds, or whatever unit the caller
reports); alternate() swaps the order every run so that neither side always
runs right after the other (page cache, CPU frequency, the other helpers'
load).  Also here: the machine's load, a process's CPU seconds, and the diskimage-builder virtualenv
the anchors run from.
"""

import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("IMG_BENCH_CACHE", "/var/cache/imaging-elements/bench")
DIB_VERSION = "3.43.0"


def alternate(a, b, runs, warmup=1):
    """Lists of a() and b() results, run alternately (ABBA...), after `warmup` of each."""
    for _ in range(warmup):
        a()
        b()
    results_a, results_b = [], []
    for i in range(runs):
        pairs = [(a, results_a), (b, results_b)]
        for fn, results in pairs if i % 2 == 0 else pairs[::-1]:
            results.append(fn())
    return results_a, results_b


def timed(fn):
    """fn() -> its wall time in seconds."""
    def run():
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    return run


def process(argv, env=None):
    """A function that runs argv (its output discarded) and returns (wall seconds, CPU
    seconds): user + system time of the process and of the children it waited for
    (os.wait4), which the machine's load disturbs much less than the wall time."""
    def run():
        started = time.perf_counter()
        child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise subprocess.CalledProcessError(child.returncode, argv)
        return wall, usage.ru_utime + usage.ru_stime
    return run


def report_process(what, name_a, a, name_b, b):
    """report() of the wall times and of the CPU times of process() results; the wall ratio."""
    ratio = report(what, name_a, [wall for wall, _ in a], name_b, [wall for wall, _ in b])
    report(what + ", CPU time", name_a, [cpu for _, cpu in a], name_b, [cpu for _, cpu in b])
    return ratio


def spread(values, scale=1.0, digits=1):
    values = [v * scale for v in values]
    return (f"median {statistics.median(values):.{digits}f} "
            f"(min-max {min(values):.{digits}f}-{max(values):.{digits}f})")


def report(what, name_a, a, name_b, b, unit="ms", scale=1000.0, digits=1, higher_is_better=False):
    """Print both medians, min-max and the ratio a/b; returns the ratio."""
    ratio = statistics.median(a) / statistics.median(b)
    better = "higher" if higher_is_better else "lower"
    print(f"{what} ({len(a)} runs each, alternated; {better} is better):")
    print(f"  {name_a:<28} {spread(a, scale, digits)} {unit}")
    print(f"  {name_b:<28} {spread(b, scale, digits)} {unit}")
    print(f"  ratio {name_a} / {name_b}: {ratio:.2f}", flush=True)
    return ratio


def cpu_seconds(pid, children=False):
    """User + system CPU seconds of a process (with `children`: of its reaped children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = [int(x) for x in (fields[13:15] if children else fields[11:13])]
    return sum(ticks) / os.sysconf("SC_CLK_TCK")


def load():
    with open("/proc/loadavg") as f:
        return f"load average {' '.join(f.read().split()[:3])} on {os.cpu_count()} CPUs"


def dib_venv():
    """A virtualenv with diskimage-builder from PyPI, made once under CACHE; its path."""
    venv = os.path.join(CACHE, f"dib-{DIB_VERSION}")
    if not os.path.exists(os.path.join(venv, ".done")):
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check",
                        f"diskimage-builder=={DIB_VERSION}"], check=True)
        open(os.path.join(venv, ".done"), "w").close()
    return venv


def dib_site(venv):
    """The site-packages directory of the dib virtualenv (to import its resolver here)."""
    return subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                           "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
