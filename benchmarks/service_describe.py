#!/usr/bin/env python3
"""Benchmark the service's describe calls under 100 concurrent boto3 callers.

The database gets 100 accounts with, each, 10 conversion tasks (ImportVolume /
ImportInstance, the legacy calls) and 10 ImportImage tasks, in mixed states:
2,000 tasks. Then `imaging-service serve --engine none` runs on it (SQLite by
default, or --database-url), and 100 callers (one account each, in 4
processes of 25 threads, so that the clients' own Python does not serialise
on one interpreter) call at once, each --calls times:

1. DescribeConversionTasks (each account sees its 10 tasks);
2. DescribeImportImageTasks for one of its task ids.

Every call's wall time is taken at the client (signing, HTTP, parsing
included); p50 and p99 over all calls. Target (issue 12): p99 <= 50 ms.
The clients share the machine with the service, so a third figure shows the
service alone: the same 100 callers sending requests signed once beforehand
(botocore's signer) over plain http.client, no boto3 per call.

    .venv/bin/python benchmarks/service_describe.py [--calls N] [--database-url URL]
"""

import argparse
import http.client
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from imaging_service import tasks
from imaging_service.credentials import Credentials
from imaging_service.db import Database
from tests.service.fixtures import Service

ACCOUNTS, PER_ACCOUNT, PROCESSES = 100, 10, 4
TARGET_P99_MS = 50.0


def populate(db, key_file):
    """100 accounts, 10 legacy and 10 image tasks each: [(access, secret, image task id)]."""
    creds = Credentials(db, key_file)
    rng = random.Random(12)
    callers = []
    for n in range(ACCOUNTS):
        access, secret, account = creds.create(name=f"bench-{n}")
        image_ids = []
        for i in range(PER_ACCOUNT):
            legacy = tasks.submit(db, account, "import-volume" if i % 2 else "import-instance", {
                "source": {"manifest_url": f"http://127.0.0.1:9/{account}-up/d{i}.manifest.xml"},
                "format": "vmdk", "bytes": 10 ** 9, "volume_size": 1, "availability_zone": "us-east-1a",
                "platform": "linux", "platform_shown": "Linux"}, wait_for_upload=rng.random() < 0.3)
            image = tasks.submit(db, account, "import-image", {
                "source": {"bucket": f"{account}-images", "key": f"disk{i}.vmdk"}, "format": "vmdk",
                "platform": "linux", "architecture": "x86_64"})
            image_ids.append(image.id)
            del legacy
        callers.append((access, secret, rng.choice(image_ids)))
    # Mixed states: some running with progress, some completed, some failed.
    while (task := tasks.claim(db, "bench-worker")) is not None:
        roll = rng.random()
        if roll < 0.4:
            tasks.progress(db, task.id, "bench-worker", step="convert", progress=rng.randrange(100),
                           bytes_done=rng.randrange(10 ** 9), bytes_total=10 ** 9)
        elif roll < 0.8:
            tasks.complete(db, task.id, "bench-worker", {"platform": "linux"}, [
                {"kind": "image" if task.kind == "import-image" else "volume", "bucket": "svc",
                 "key": f"{task.id}.raw", "size": 10 ** 9, "format": "raw"}])
        else:
            tasks.fail(db, task.id, "bench-worker", "validate: validate-linux/50-fstab: a missing UUID")
    return callers


def _caller(url, access, secret, image_task, calls, action, start_at, out):
    import boto3
    import botocore.config
    ec2 = boto3.session.Session().client(
        "ec2", endpoint_url=url, region_name="us-east-1", aws_access_key_id=access,
        aws_secret_access_key=secret, config=botocore.config.Config(
            retries={"max_attempts": 1}, max_pool_connections=2, read_timeout=60))
    ec2.describe_conversion_tasks()  # connect and warm the client outside the measurement
    time.sleep(max(0.0, start_at - time.time()))
    for _ in range(calls):
        started = time.perf_counter()
        if action == "DescribeConversionTasks":
            found = ec2.describe_conversion_tasks()["ConversionTasks"]
            assert len(found) == PER_ACCOUNT, len(found)
        else:
            found = ec2.describe_import_image_tasks(ImportTaskIds=[image_task])["ImportImageTasks"]
            assert [t["ImportTaskId"] for t in found] == [image_task]
        out.append(time.perf_counter() - started)


def _process(url, callers, calls, action, start_at, queue):
    latencies = []
    threads = [threading.Thread(target=_caller, args=(url, *c, calls, action, start_at, latencies))
               for c in callers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put(latencies)


def measure(url, callers, calls, action):
    """Latencies of every call, and calls per second over the whole run."""
    queue = multiprocessing.get_context("spawn").Queue()
    start_at = time.time() + 8  # every client made and warm by then
    processes = min(PROCESSES, len(callers))
    chunk = len(callers) // processes
    procs = [multiprocessing.get_context("spawn").Process(
        target=_process, args=(url, callers[i * chunk:(i + 1) * chunk], calls, action, start_at, queue))
        for i in range(processes)]
    for p in procs:
        p.start()
    latencies = []
    for _ in procs:
        latencies += queue.get(timeout=600)
    elapsed = time.time() - start_at
    for p in procs:
        p.join()
    if len(latencies) != len(callers) * calls:
        raise SystemExit(f"{action}: {len(callers) * calls - len(latencies)} calls failed")
    latencies.sort()
    return {"calls": len(latencies), "p50": statistics.median(latencies) * 1000,
            "p99": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000, "max": latencies[-1] * 1000,
            "rate": len(latencies) / elapsed}


def measure_raw(url, callers, calls):
    """The service alone: pre-signed DescribeConversionTasks requests from 100 threads."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials
    host = urllib.parse.urlsplit(url).netloc
    body = b"Action=DescribeConversionTasks&Version=2016-11-15"
    latencies, barrier = [], threading.Barrier(len(callers) + 1)

    def caller(access, secret, _image_task):
        request = AWSRequest(method="POST", url=url + "/", data=body, headers={
            "Content-Type": "application/x-www-form-urlencoded; charset=utf-8", "Host": host})
        SigV4Auth(BotoCredentials(access, secret), "ec2", "us-east-1").add_auth(request)
        headers = dict(request.headers.items())
        conn = http.client.HTTPConnection(host, timeout=60)
        conn.request("POST", "/", body, headers)
        conn.getresponse().read()
        barrier.wait()
        for _ in range(calls):
            started = time.perf_counter()
            conn.request("POST", "/", body, headers)
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            latencies.append(time.perf_counter() - started)
        conn.close()

    threads = [threading.Thread(target=caller, args=c) for c in callers]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"calls": len(latencies), "p50": statistics.median(latencies) * 1000,
            "p99": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000, "rate": len(latencies) / elapsed}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10, help="calls per caller and action (default 10)")
    p.add_argument("--database-url", help="default: SQLite in the state directory")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="service-bench-") as tmp:
        state = os.path.join(tmp, "state")
        os.makedirs(state, mode=0o700)
        url = args.database_url or f"sqlite:///{state}/service.db"
        db = Database(url)
        db.upgrade()
        started = time.perf_counter()
        callers = populate(db, os.path.join(state, "secret.key"))
        db.dispose()
        print(f"populated {ACCOUNTS} accounts, {ACCOUNTS * PER_ACCOUNT * 2} tasks in "
              f"{time.perf_counter() - started:.1f} s")
        extra = ["--s3-endpoint", "http://127.0.0.1:9", "--log-level", "warning"]
        if args.database_url:
            extra += ["--database-url", args.database_url]
        service = Service(engine="none", args=extra, state_dir=state)
        service.setUp()
        try:
            ok = True
            for action in ("DescribeConversionTasks", "DescribeImportImageTasks"):
                alone = measure(service.url, callers[:1], 50, action)
                print(f"{action:26s} one caller alone: p50 {alone['p50']:.1f} ms, p99 {alone['p99']:.1f} ms")
                r = measure(service.url, callers, args.calls, action)
                ok = ok and r["p99"] <= TARGET_P99_MS
                print(f"{action:26s} {r['calls']} calls by {len(callers)} concurrent callers: "
                      f"p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, max {r['max']:.1f} ms, "
                      f"{r['rate']:.0f} calls/s (target p99 <= {TARGET_P99_MS:.0f} ms)")
            raw = measure_raw(service.url, callers, args.calls)
            print(f"{'service alone':26s} {raw['calls']} pre-signed DescribeConversionTasks by {len(callers)} "
                  f"threads: p50 {raw['p50']:.1f} ms, p99 {raw['p99']:.1f} ms, {raw['rate']:.0f} calls/s")
        finally:
            service.cleanUp()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
