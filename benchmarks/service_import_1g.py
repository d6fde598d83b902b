#!/usr/bin/env python3
"""Benchmark one large import end to end through the service, in MB/s.

A Linux raw disk of --size-mib MiB (default 1 GiB, its filesystem mostly
random data) is uploaded in 10 MiB parts with an import manifest, as
euca-import-volume does; ImportVolume is called; the task is polled with
DescribeConversionTasks until completed (fetch, validate, convert, store).
Against it, alternated with it (ABBA, --runs of each): the sum of the same
stages run bare on the same machine and the same store: a GET of every part
(fetch.fetch), euca-image-process with the same elements at the same
niceness (to the service's store format, qcow2), and the upload of the result
with boto3. MB is 10^6 bytes.

    .venv/bin/python benchmarks/service_import_1g.py [--size-mib 1024] [--runs 2] [--dir DIR]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.compare import alternate, load, report
from imaging_service import fetch, manifest, tasks
from imaging_service.db import Database
from imaging_service.objectstore import ObjectStore, ObjectStoreError
from imaging_service.seaweed import free_port_pair
from tests.guestimages import linux_disk
from tests.imagebuild import MiB, random_file
from tests.service import fixtures as sf

ELEMENTS = ["mounters", "validate-linux", "inspect", "convert-qemu"]


def make_disk(work, size_mib):
    data = random_file(os.path.join(work, "data.bin"), size_mib - 64, seed=12)
    with open(data, "rb") as f:
        content = f.read()
    os.unlink(data)
    return linux_disk(os.path.join(work, "disk.raw"), work, size=size_mib * MiB,
                      extra={"var/lib/data.bin": content})


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--nice", type=int, default=10,
                        help="niceness of the toolkit, in the service and in the bare run")
    parser.add_argument("--runs", type=int, default=2, help="runs of each, alternated (ABBA)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="service-1g-", dir=args.dir)
    s3_port = free_port_pair()
    service = sf.Service(engine="embedded", state_dir=os.path.join(work, "state"), start_timeout=120, args=[
        "--cache", "false", "--instance-validation", "false", "--upload-poll", "1s", "--s3-port", str(s3_port),
        "--elements-linux", " ".join(ELEMENTS), "--nice", str(args.nice)])
    try:
        disk = make_disk(work, args.size_mib)
        size = os.path.getsize(disk)
        mb = size / 1e6
        service.setUp()
        access, secret, account = service.credential()
        ec2 = service.client(access, secret)
        store = ObjectStore(f"http://127.0.0.1:{s3_port}", "us-east-1", access, secret)
        bucket = f"{account}-bench"
        for _ in range(100):
            try:
                store.ensure_bucket(bucket)
                break
            except ObjectStoreError:
                time.sleep(0.2)
        upload, (_, url) = timed(manifest.upload, store, disk, bucket, "big/", "RAW")
        print(f"image: {size / MiB:.0f} MiB raw; upload of the parts and manifest: {upload:.1f} s "
              f"({mb / upload:.0f} MB/s)", flush=True)

        db = Database("sqlite:///" + os.path.join(service.state_dir, "service.db"))

        def served():
            started = time.perf_counter()
            task_id = ec2.import_volume(AvailabilityZone="us-east-1a", Volume={"Size": -(-size // 1024 ** 3)},
                                        Image={"Format": "RAW", "Bytes": size, "ImportManifestUrl": url}
                                        )["ConversionTask"]["ConversionTaskId"]
            while True:
                task = ec2.describe_conversion_tasks(ConversionTaskIds=[task_id])["ConversionTasks"][0]
                if task["State"] in ("completed", "cancelled"):
                    break
                time.sleep(0.2)
            elapsed = time.perf_counter() - started
            if task["State"] != "completed":
                sys.exit(f"the import failed: {task.get('StatusMessage')}")
            with db.session() as s:
                row = s.get(tasks.Task, task_id)
                steps = dict(row.result.get("step_seconds") or {})
                steps["queue"] = (row.started_at - row.created_at).total_seconds()
            print(f"  service: ImportVolume to completed {elapsed:.1f} s ({mb / elapsed:.0f} MB/s): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()) + f" ({load()})", flush=True)
            return elapsed

        def bare():
            fetched_path, out = os.path.join(work, "fetched.raw"), os.path.join(work, "bare.qcow2")
            get, _ = timed(fetch.fetch, {"manifest_url": url}, fetched_path, allowed_endpoints=[store.endpoint_url])
            convert, _ = timed(subprocess.run, ["nice", "-n", str(args.nice), sys.executable,
                                                os.path.join(ROOT, "bin", "euca-image-process"), "-q",
                                                "-i", fetched_path, "-t", "raw", "-o", out, "-T", "qcow2",
                                                "--platform", "linux", *ELEMENTS],
                               check=True, env=dict(os.environ, TMPDIR=work), stdout=subprocess.DEVNULL)
            put, _ = timed(store.put_file, out, bucket, "bare/result.qcow2")
            os.unlink(fetched_path)
            os.unlink(out)
            total = get + convert + put
            print(f"  bare stages: fetch {get:.1f} s + euca-image-process {convert:.1f} s + store {put:.1f} s = "
                  f"{total:.1f} s ({mb / total:.0f} MB/s) ({load()})", flush=True)
            return total

        ours, anchor = alternate(served, bare, runs=args.runs, warmup=0)
        db.dispose()
        report(f"{size / MiB:.0f} MiB import", "service", ours, "bare stages", anchor, unit="s", scale=1.0)
        print(f"service: {mb / statistics.median(ours):.0f} MB/s; end to end with the upload of the parts: "
              f"{mb / (upload + statistics.median(ours)):.0f} MB/s; bare stages "
              f"{mb / statistics.median(anchor):.0f} MB/s")
        print(f"service over the bare stages: {100 * (statistics.median(ours) / statistics.median(anchor) - 1):+.1f} %")
        print(load())
    finally:
        service.cleanUp()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
