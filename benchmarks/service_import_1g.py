#!/usr/bin/env python3
"""Benchmark one large import end to end through the service, in MB/s.

A Linux raw disk of --size-mib MiB (default 1 GiB, its filesystem mostly
random data) is uploaded in 10 MiB parts with an import manifest, as
euca-import-volume does; ImportVolume is called; the task is polled with
DescribeConversionTasks until completed (fetch, validate, convert, store).
Against it: the sum of the same stages run bare on the same machine and the
same store: a GET of every part, euca-image-process with the same elements,
and the upload of the result. MB is 10^6 bytes.

    python3 benchmarks/service_import_1g.py [--size-mib 1024] [--dir DIR]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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
                        help="the service's --nice for its toolkit (the bare run has the caller's)")
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

        started = time.perf_counter()
        task_id = ec2.import_volume(AvailabilityZone="us-east-1a", Volume={"Size": -(-size // 1024 ** 3)},
                                    Image={"Format": "RAW", "Bytes": size, "ImportManifestUrl": url}
                                    )["ConversionTask"]["ConversionTaskId"]
        db = Database("sqlite:///" + os.path.join(service.state_dir, "service.db"))
        steps, last = [], None
        while True:
            task = ec2.describe_conversion_tasks(ConversionTaskIds=[task_id])["ConversionTasks"][0]
            with db.session() as s:
                row = s.get(tasks.Task, task_id)
                if (row.state, row.step) != last:
                    last = (row.state, row.step)
                    steps.append((time.perf_counter() - started, row.step or row.state))
            if task["State"] in ("completed", "cancelled"):
                break
            time.sleep(0.2)
        db.dispose()
        print("steps: " + ", ".join(f"{name} {b[0] - a[0]:.1f} s" for a, b, name in
                                    zip(steps, steps[1:], [n for _, n in steps])), flush=True)
        served = time.perf_counter() - started
        if task["State"] != "completed":
            sys.exit(f"the import failed: {task.get('StatusMessage')}")
        print(f"service: ImportVolume to completed: {served:.1f} s ({mb / served:.0f} MB/s); end to end with "
              f"the upload: {upload + served:.1f} s ({mb / (upload + served):.0f} MB/s)", flush=True)

        fetched_path = os.path.join(work, "fetched.raw")
        get, _ = timed(fetch.fetch, {"manifest_url": url}, fetched_path, allowed_endpoints=[store.endpoint_url])
        out = os.path.join(work, "bare.raw")
        convert, _ = timed(subprocess.run, [sys.executable, os.path.join(ROOT, "bin", "euca-image-process"), "-q",
                                            "-i", fetched_path, "-t", "raw", "-o", out, "-T", "raw",
                                            "--platform", "linux", *ELEMENTS],
                           check=True, env=dict(os.environ, TMPDIR=work), stdout=subprocess.DEVNULL)
        put, _ = timed(store.put_file, out, bucket, "bare/result.raw")
        bare = get + convert + put
        print(f"bare stages: fetch {get:.1f} s + euca-image-process {convert:.1f} s + store {put:.1f} s = "
              f"{bare:.1f} s ({mb / bare:.0f} MB/s)")
        print(f"service over the bare stages: {100 * (served / bare - 1):+.1f} %")
    finally:
        service.cleanUp()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
