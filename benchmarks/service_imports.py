#!/usr/bin/env python3
"""Benchmark the service's workers: N ImportImage tasks of one VMDK submitted at once.

The image: a Linux disk (tests.guestimages.linux_disk) whose filesystem holds
random data, as a VMDK of about --size-mib MiB. The service runs as
`imaging-service serve` (embedded SeaweedFS and workers, --workers 2, the
cache off so that every task converts, instance validation off); the VMDK is
uploaded once, then N ImportImage calls are made at once and polled with
the database (not the API: its polling would load the same two cores) until
all are completed, then DescribeImportImageTasks checks them. The database is
sampled every 0.1 s: the tasks converting (download, validate, convert: must never
exceed --workers) and the tasks in the service's hands at all (a task in its
store step holds a store slot, not a conversion slot).

Anchors, run in the same run, alternated with the service (ABBA by round):
  (a) the issue's anchor: the same N conversions as plain `euca-image-process`
      runs (the same elements: mounters validate-linux inspect convert-qemu,
      to the service's store format), one after another, as N runs of the
      command are; and --workers at a time;
  (b) the same stages run bare, --workers at a time: a GET of the VMDK from
      the same store into a file, euca-image-process, the upload of the result.
The toolkit runs at the service's --nice on both sides (the service's
default is 10). Target (issue 12): service <= 1.10 x anchor (a), the N runs.
Against (a) at --workers at a time the service cannot come near on 2 cores:
it also downloads every source and stores every result, work that costs the
machine about as much CPU as the conversion itself (the CPU line of each run
shows it); (b) does that work too, without the service.

    .venv/bin/python benchmarks/service_imports.py [--tasks 20] [--workers 2] [--size-mib 64] [--rounds 2] [--dir DIR]
"""

import argparse
import concurrent.futures
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.compare import cpu_seconds, load, spread
from imaging_service import tasks
from imaging_service.db import Database
from imaging_service.objectstore import ObjectStore, ObjectStoreError
from imaging_service.seaweed import free_port_pair
from tests.guestimages import linux_disk
from tests.imagebuild import MiB, qemu_convert
from tests.service import fixtures as sf

ELEMENTS = ["mounters", "validate-linux", "inspect", "convert-qemu"]
STORE_FORMAT = "qcow2"  # the service's default store_format: both sides make the same file
STEPS = ("queue", "reserve", "download", "validate", "convert", "store-wait", "store", "register", "rest")


def make_vmdk(work, size_mib):
    data = os.urandom((size_mib - 4) * MiB)
    raw = linux_disk(os.path.join(work, "disk.raw"), work, size=(size_mib + 32) * MiB,
                     extra={"var/lib/data.bin": data})
    return qemu_convert(raw, os.path.join(work, "disk.vmdk"), "vmdk")


def toolkit(source, out, work, nice):
    subprocess.run(["nice", "-n", str(nice), sys.executable, os.path.join(ROOT, "bin", "euca-image-process"),
                    "-q", "-i", source, "-t", "vmdk", "-o", out, "-T", STORE_FORMAT, "--platform", "linux", *ELEMENTS],
                   check=True, env=dict(os.environ, TMPDIR=work), stdout=subprocess.DEVNULL)


def in_parallel(fn, count, workers):
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, range(count)))
    return time.perf_counter() - started


def bare(vmdk, work, count, workers, nice):
    """Anchor (a): N euca-image-process runs, `workers` at a time."""
    def one(i):
        out = os.path.join(work, f"bare-{i}.{STORE_FORMAT}")
        toolkit(vmdk, out, work, nice)
        os.unlink(out)
    return in_parallel(one, count, workers)


def staged(store, bucket, key, work, count, workers, nice):
    """Anchor (b): the service's stages without the service: GET (SHA-256 on the way, as the
    service's fetch), euca-image-process, upload of the result."""
    def one(i):
        src, out = os.path.join(work, f"staged-{i}.vmdk"), os.path.join(work, f"staged-{i}.{STORE_FORMAT}")
        digest = hashlib.sha256()
        _, chunks = store.get_stream(bucket, key)
        with open(src, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
        toolkit(src, out, work, nice)
        store.put_file(out, bucket, f"staged/{i}.{STORE_FORMAT}")
        os.unlink(src)
        os.unlink(out)
    return in_parallel(one, count, workers)


class CPU:
    """CPU seconds spent by each party during a run: the service's own process, the toolkits
    (the service's reaped children, or this script's for the anchors), the object store, and
    this script (its polling, its GETs and PUTs in anchor (b))."""

    def __init__(self, service_pid, weed_pid):
        self.pids = {"service": service_pid, "store": weed_pid}

    def snapshot(self):
        me = os.times()
        return {"service": cpu_seconds(self.pids["service"]),
                "toolkit": cpu_seconds(self.pids["service"], True) + me.children_user + me.children_system,
                "store": cpu_seconds(self.pids["store"]), "script": me.user + me.system}

    def measure(self, fn):
        before = self.snapshot()
        elapsed = fn()
        after = self.snapshot()
        return elapsed, {k: after[k] - before[k] for k in after}


def service_batch(ec2, db, bucket, key, count):
    """N ImportImage calls at once, until all complete: (seconds, peaks, per-task step seconds)."""
    peak = {"converting": 0, "running": 0}
    done = threading.Event()

    def sample():
        while not done.wait(0.1):
            with db.session() as s:
                rows = s.query(tasks.Task.id, tasks.Task.state, tasks.Task.step).filter(
                    tasks.Task.id.in_(ids)).all() if ids else []
            steps = [step for _, state, step in rows if state == "converting"]
            peak["converting"] = max(peak["converting"], sum(step != "store" for step in steps))
            peak["running"] = max(peak["running"], len(steps))
            if len(rows) == count and all(state in ("completed", "failed", "cancelled") for _, state, _ in rows):
                finished.set()
    ids = []
    finished = threading.Event()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    ids.extend(ec2.import_image(DiskContainers=[{"Format": "VMDK", "UserBucket": {"S3Bucket": bucket, "S3Key": key}}],
                                Platform="Linux")["ImportTaskId"] for _ in range(count))
    # Completion is watched in the database: polling the API 20 tasks at a time would put the
    # Describe calls' CPU (both sides) on the same two cores as the imports.
    finished.wait()
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    found = ec2.describe_import_image_tasks(ImportTaskIds=ids)["ImportImageTasks"]
    failed = [t for t in found if t["Status"] != "completed"]
    if failed:
        sys.exit(f"{len(failed)} task(s) failed: {failed[0].get('StatusMessage')}")
    per_task = []
    with db.session() as s:
        for task_id in ids:
            task = s.get(tasks.Task, task_id)
            steps = dict(task.result.get("step_seconds") or {})
            steps["queue"] = (task.started_at - task.created_at).total_seconds()
            # rest: from the claim to the first step, and the final write of the completion.
            ran = (task.finished_at - task.started_at).total_seconds()
            steps["rest"] = max(0.0, ran - sum(v for k, v in steps.items() if k != "queue"))
            per_task.append(steps)
    return elapsed, peak, per_task


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the four runs, order reversed each round")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the toolkit, service and anchors")
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    print(load(), flush=True)
    work = tempfile.mkdtemp(prefix="service-imports-", dir=args.dir)
    s3_port = free_port_pair()
    service = sf.Service(engine="embedded", state_dir=os.path.join(work, "state"), start_timeout=120, args=[
        "--workers", str(args.workers), "--cache", "false", "--instance-validation", "false",
        "--heartbeat", "1s", "--s3-port", str(s3_port), "--nice", str(args.nice)])
    try:
        vmdk = make_vmdk(work, args.size_mib)
        print(f"image: {os.path.getsize(vmdk) / MiB:.1f} MiB VMDK; {args.tasks} imports, "
              f"{args.workers} at a time; toolkit at nice {args.nice}", flush=True)
        service.setUp()
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
        db = Database("sqlite:///" + os.path.join(service.state_dir, "service.db"))
        weed = subprocess.run(["pgrep", "-f", f"weed .*mini -dir={service.state_dir}/"], stdout=subprocess.PIPE,
                              text=True, check=True).stdout.split()[0]
        cpu = CPU(service.process.pid, int(weed))
        cpu_of = {}
        results = {"service": [], "bare, 1 at a time": [], f"bare, {args.workers} at a time": [],
                   f"bare stages, {args.workers} at a time": []}
        peaks, per_task = [], []

        def run_service():
            elapsed, peak, steps = service_batch(ec2, db, bucket, "disk.vmdk", args.tasks)
            peaks.append(peak)
            per_task.extend(steps)
            return elapsed
        runs = [("service", run_service),
                (f"bare, {args.workers} at a time", lambda: bare(vmdk, work, args.tasks, args.workers, args.nice)),
                ("bare, 1 at a time", lambda: bare(vmdk, work, args.tasks, 1, args.nice)),
                (f"bare stages, {args.workers} at a time",
                 lambda: staged(store, bucket, "disk.vmdk", work, args.tasks, args.workers, args.nice))]
        # Warm-up, not counted: the store makes its volumes at the first writes of a bucket.
        service_batch(ec2, db, bucket, "disk.vmdk", args.workers)
        staged(store, bucket, "disk.vmdk", work, args.workers, args.workers, args.nice)
        for i in range(args.rounds):
            for name, fn in runs if i % 2 == 0 else runs[::-1]:
                elapsed, used = cpu.measure(fn)
                results[name].append(elapsed)
                cpu_of.setdefault(name, []).append(used)
                print(f"  round {i + 1}: {name}: {elapsed:.1f} s; CPU s: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in used.items()) + f" ({load()})", flush=True)
        db.dispose()

        print(f"\n{args.tasks} imports, {args.rounds} run(s) of each, alternated; s:")
        for name, values in results.items():
            used = {k: statistics.median([u[k] for u in cpu_of[name]]) for k in cpu_of[name][0]}
            print(f"  {name:<32} {spread(values)}; CPU s (median): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in used.items()) + f", all {sum(used.values()):.1f}")
        served = statistics.median(results["service"])
        peak = max(p["converting"] for p in peaks)
        print(f"  at most {peak} converting at once (limit {args.workers}: "
              f"{'held' if peak <= args.workers else 'EXCEEDED'}), at most "
              f"{max(p['running'] for p in peaks)} tasks running (converting or storing)")
        print("per task, median (max) s: " + ", ".join(
            f"{step} {statistics.median([t.get(step, 0.0) for t in per_task]):.2f} "
            f"({max(t.get(step, 0.0) for t in per_task):.2f})" for step in STEPS))
        for name, values in results.items():
            if name != "service":
                print(f"service over {name}: {100 * (served / statistics.median(values) - 1):+.1f} %")
        anchor = statistics.median(results["bare, 1 at a time"])
        print(f"target (issue 12, against the {args.tasks} runs of euca-image-process, one after another): "
              f"service <= +10 %: {'met' if served <= 1.10 * anchor else 'NOT met'}")
        print(load())
    finally:
        service.cleanUp()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
