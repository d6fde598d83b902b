#!/usr/bin/env python3
"""Benchmark euca-bundle-image and euca-unbundle on a 1 GiB image.

The image is the issue's: 512 MiB random then 512 MiB zeros, written here
(so it is in the page cache, as it was for the baseline). Each driver runs as
its own process from bin/, timed wall clock, its peak RSS taken from wait4;
the unbundled image must equal the original.

Targets (issue 6): bundle >= 300 MB/s, unbundle >= 400 MB/s, peak RSS <= 100 MB.
Baseline, measured for the same file on this machine kind: euca2ools 3.4's
euca-bundle-image 44.6 MB/s (73.6 with pigz), euca-unbundle 128 MB/s.
MB is 10^6 bytes.

    python3 benchmarks/bundle.py [--runs N] [--size-mib N] [--dir DIR]
"""

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin")
MiB = 1024 * 1024
BASELINE = {"bundle": 44.6, "unbundle": 128.0}
TARGET = {"bundle": 300.0, "unbundle": 400.0}
RSS_TARGET = 100 * 10 ** 6


def run(argv):
    """(wall seconds, peak RSS in bytes, CPU seconds) of one driver run."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(argv)} failed: {process.stderr.read().decode()}")
    process.stderr.close()
    return elapsed, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def sha1(path):
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while data := f.read(4 * MiB):
            digest.update(data)
    return digest.hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5,
                        help="runs of each driver (the median is reported, and the best run)")
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (half random, half zeros)")
    parser.add_argument("--dir", default="/var/tmp", help="where to write the image and the bundle")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="bench-bundle-", dir=args.dir)
    try:
        keys = {}
        for who in ("user", "cloud"):
            keys[who] = (os.path.join(tmp, f"{who}-pk.pem"), os.path.join(tmp, f"{who}-cert.pem"))
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                            "-subj", f"/CN=bench-{who}", "-keyout", keys[who][0], "-out", keys[who][1]],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        image = os.path.join(tmp, "bench.img")
        with open(image, "wb") as f:
            for _ in range(args.size_mib // 2):
                f.write(os.urandom(MiB))
            zeros = bytes(MiB)
            for _ in range(args.size_mib - args.size_mib // 2):
                f.write(zeros)
        size = os.path.getsize(image)
        bundle_dir, out_dir = os.path.join(tmp, "bundle"), os.path.join(tmp, "out")

        results = {"bundle": [], "unbundle": []}
        for _ in range(args.runs):
            shutil.rmtree(bundle_dir, ignore_errors=True)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.mkdir(out_dir)
            results["bundle"].append(run([
                os.path.join(BIN, "euca-bundle-image"), "-i", image, "-r", "x86_64", "-u", "111122223333",
                "-k", keys["user"][0], "-c", keys["user"][1], "--ec2cert", keys["cloud"][1], "-d", bundle_dir]))
            results["unbundle"].append(run([
                os.path.join(BIN, "euca-unbundle"), "-m", os.path.join(bundle_dir, "bench.img.manifest.xml"),
                "-s", bundle_dir, "-d", out_dir, "-k", keys["cloud"][0]]))
        if sha1(os.path.join(out_dir, "bench.img")) != sha1(image):
            sys.exit("the unbundled image differs from the original")
        bundled = sum(os.path.getsize(os.path.join(bundle_dir, n)) for n in os.listdir(bundle_dir))

        print(f"image: {size / 10 ** 6:.0f} MB ({args.size_mib // 2} MiB random, then zeros); "
              f"bundle: {bundled / 10 ** 6:.0f} MB; median of {args.runs} runs; load average before: "
              f"{load:.2f} on {os.cpu_count()} CPUs (other work on the machine slows the wall clock)")
        ok = True
        for name in ("bundle", "unbundle"):
            seconds = statistics.median(t for t, _, _ in results[name])
            best = min(t for t, _, _ in results[name])
            cpu = statistics.median(c for _, _, c in results[name])
            rss = max(r for _, r, _ in results[name])
            rate = size / seconds / 10 ** 6
            ok &= rate >= TARGET[name] and rss <= RSS_TARGET
            print(f"{name:>9}: {seconds:6.2f} s  {rate:6.0f} MB/s  (target >= {TARGET[name]:.0f}; "
                  f"euca2ools {BASELINE[name]:.1f} MB/s: x{rate / BASELINE[name]:.1f}; "
                  f"best run {size / best / 10 ** 6:.0f} MB/s)  "
                  f"peak RSS {rss / 10 ** 6:.0f} MB (target <= {RSS_TARGET / 10 ** 6:.0f}); "
                  f"CPU {cpu:.2f} s")
        print("all targets met" if ok else "TARGET MISSED")
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
