#!/usr/bin/env python3
"""Benchmark the celery engine's scale-out: N small ImportImage tasks with 1, 2 and 4
worker processes ("machines", each --workers 1, own work directory).

For each worker count: a fresh PostgreSQL, RabbitMQ and SeaweedFS (the test
fixtures, tests/service/celery_fixtures.py), one `imaging-service serve --engine
celery` front-end, the workers; the VMDK (a small Linux disk) is uploaded once,
N ImportImage calls are made at once through boto3 and polled until all are
completed (the cache off, so every task converts; instance validation off).
Prints the wall time, tasks per minute, and the ratio against one worker.

    python3 benchmarks/service_scale.py [--tasks 40] [--workers 1,2,4] [--size-mib 24]
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fixtures

from imaging_service.objectstore import ObjectStore
from tests.guestimages import linux_disk
from tests.imagebuild import MiB, qemu_convert
from tests.service.celery_fixtures import Cluster

ARGS = ["--instance-validation", "false", "--cache", "false", "--heartbeat", "1s", "--upload-poll", "1s",
        "--log-level", "warning", "--max-active-tasks", "100"]


def one_round(vmdk, tasks, workers):
    with fixtures.Fixture() as holder:
        cluster = holder.useFixture(Cluster(ARGS))
        for _ in range(workers):
            cluster.worker("--workers", "1")
        front = cluster.frontend()
        access, secret, account = cluster.user
        store = ObjectStore(cluster.seaweed.endpoint_url, "us-east-1", access, secret)
        bucket = f"{account}-images"
        store.ensure_bucket(bucket)
        store.put_file(vmdk, bucket, "disk.vmdk")
        ec2 = front.client(access, secret)
        # Every worker announces itself before the clock starts.
        from imaging_service import celery_engine
        from imaging_service.db import Database
        db = Database(cluster.pg.url)
        while len(celery_engine.live_workers(db, 10)) < workers:
            time.sleep(0.2)
        started = time.monotonic()
        ids = [ec2.import_image(DiskContainers=[{"Format": "VMDK", "UserBucket": {
            "S3Bucket": bucket, "S3Key": "disk.vmdk"}}], Platform="Linux")["ImportTaskId"] for _ in range(tasks)]
        submitted = time.monotonic() - started
        while True:
            found = ec2.describe_import_image_tasks(ImportTaskIds=ids)["ImportImageTasks"]
            states = [t["Status"] for t in found]
            if all(s in ("completed", "deleted") for s in states):
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        db.dispose()
        failed = [t for t in found if t["Status"] != "completed"]
        if failed:
            raise SystemExit(f"{len(failed)} tasks failed: {failed[0].get('StatusMessage')}")
        return elapsed, submitted


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--size-mib", type=int, default=24)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = linux_disk(os.path.join(tmp, "disk.raw"), tmp, size=args.size_mib * MiB)
        vmdk = qemu_convert(raw, os.path.join(tmp, "disk.vmdk"), "vmdk")
        print(f"{args.tasks} imports of a {os.path.getsize(raw) // MiB} MiB disk "
              f"({os.path.getsize(vmdk) / MiB:.1f} MiB VMDK), cores: {os.cpu_count()}")
        base = None
        for count in [int(x) for x in args.workers.split(",")]:
            elapsed, submitted = one_round(vmdk, args.tasks, count)
            base = base or elapsed
            print(f"workers={count}: {elapsed:6.1f} s, {60 * args.tasks / elapsed:5.1f} imports/min "
                  f"(submit {submitted:.1f} s), speed-up x{base / elapsed:.2f}", flush=True)


if __name__ == "__main__":
    main()
