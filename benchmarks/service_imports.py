#!/usr/bin/env python3
"""Benchmark the service's workers: N ImportImage tasks of one VMDK submitted at once.

The image: a Linux disk (tests.guestimages.linux_disk) whose filesystem holds
random data, as a VMDK of about --size-mib MiB. The service runs as
`imaging-service serve` (embedded SeaweedFS and workers, --workers 2, the
cache off so that every task converts, instance validation off); the VMDK is
uploaded once, then N ImportImage calls are made at once and polled with
DescribeImportImageTasks until all are completed. The database is sampled
every 0.1 s for the number of converting tasks (must never exceed --workers).

Baseline: the same N conversions as plain `euca-image-process` runs (the
same elements: mounters validate-linux inspect convert-qemu), --workers at a
time; and the same again with each result uploaded to the same object store
(the stages the service runs, without the service). Target (issue 12):
service total <= 1.10 x the bare runs.

    python3 benchmarks/service_imports.py [--tasks 20] [--workers 2] [--size-mib 64] [--dir DIR]
"""

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from imaging_service import tasks
from imaging_service.db import Database
from imaging_service.objectstore import ObjectStore, ObjectStoreError
from imaging_service.seaweed import free_port_pair
from tests.guestimages import linux_disk
from tests.imagebuild import MiB, qemu_convert
from tests.service import fixtures as sf

ELEMENTS = ["mounters", "validate-linux", "inspect", "convert-qemu"]


def make_vmdk(work, size_mib):
    data = os.urandom((size_mib - 4) * MiB)
    raw = linux_disk(os.path.join(work, "disk.raw"), work, size=(size_mib + 32) * MiB,
                     extra={"var/lib/data.bin": data})
    return qemu_convert(raw, os.path.join(work, "disk.vmdk"), "vmdk")


def baseline(vmdk, work, count, workers, store=None, bucket=None):
    """N bare euca-image-process runs, `workers` at a time; with a store, each result is
    then uploaded as the service does (the same stages, without the service)."""
    def one(i):
        out = os.path.join(work, f"base-{i}.raw")
        subprocess.run([sys.executable, os.path.join(ROOT, "bin", "euca-image-process"), "-q", "-i", vmdk,
                        "-t", "vmdk", "-o", out, "-T", "raw", "--platform", "linux", *ELEMENTS],
                       check=True, env=dict(os.environ, TMPDIR=work), stdout=subprocess.DEVNULL)
        if store is not None:
            store.put_file(out, bucket, f"bare/{i}.raw")
        os.unlink(out)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))
    return time.perf_counter() - started


def service_run(vmdk, work, count, workers):
    s3_port = free_port_pair()
    service = sf.Service(engine="embedded", state_dir=os.path.join(work, "state"), start_timeout=120, args=[
        "--workers", str(workers), "--cache", "false", "--instance-validation", "false",
        "--heartbeat", "1s", "--s3-port", str(s3_port)])
    service.setUp()
    try:
        access, secret, account = service.credential()
        ec2 = service.client(access, secret)
        store = ObjectStore(f"http://127.0.0.1:{s3_port}", "us-east-1", access, secret)
        bucket = f"{account}-bench"
        for _ in range(100):
            try:
                store.ensure_bucket(bucket)
                break
            except ObjectStoreError:  # the new key reaches the store within seconds
                time.sleep(0.2)
        store.put_file(vmdk, bucket, "disk.vmdk")
        staged = baseline(vmdk, work, count, workers, store, bucket)
        print(f"euca-image-process + upload of the result x{count}: {staged:.1f} s", flush=True)
        db = Database("sqlite:///" + os.path.join(service.state_dir, "service.db"))
        peak = {"converting": 0}
        done = threading.Event()

        def sample():
            while not done.wait(0.1):
                with db.session() as s:
                    n = s.query(tasks.Task).filter(tasks.Task.state == "converting").count()
                peak["converting"] = max(peak["converting"], n)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        ids = [ec2.import_image(DiskContainers=[{"Format": "VMDK", "UserBucket": {
            "S3Bucket": bucket, "S3Key": "disk.vmdk"}}], Platform="Linux")["ImportTaskId"] for _ in range(count)]
        while True:
            found = ec2.describe_import_image_tasks(ImportTaskIds=ids)["ImportImageTasks"]
            states = [t["Status"] for t in found]
            if all(state in ("completed", "deleted") for state in states):
                break
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        db.dispose()
        failed = [t for t in found if t["Status"] != "completed"]
        if failed:
            sys.exit(f"{len(failed)} task(s) failed: {failed[0].get('StatusMessage')}")
        return elapsed, peak["converting"], staged
    finally:
        service.cleanUp()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="service-imports-", dir=args.dir)
    try:
        vmdk = make_vmdk(work, args.size_mib)
        print(f"image: {os.path.getsize(vmdk) / MiB:.1f} MiB VMDK; {args.tasks} imports, "
              f"{args.workers} at a time", flush=True)
        bare = baseline(vmdk, work, args.tasks, args.workers)
        print(f"euca-image-process x{args.tasks}: {bare:.1f} s", flush=True)
        served, peak, staged = service_run(vmdk, work, args.tasks, args.workers)
        print(f"service x{args.tasks}: {served:.1f} s (submit to last completed), "
              f"at most {peak} converting at once", flush=True)
        ratio = served / bare
        print(f"overhead: {100 * (ratio - 1):+.1f} % (target <= +10 %): {'met' if ratio <= 1.10 else 'NOT met'}; "
              f"against the same stages bare (convert + upload): {100 * (served / staged - 1):+.1f} %; "
              f"concurrency limit {'held' if peak <= args.workers else 'EXCEEDED'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
