#!/usr/bin/env python3
"""Benchmark the celery engine's scale-out: N small ImportImage tasks with 1, 2 and 4
worker processes ("machines", each --workers 1, own work directory).

For each worker count: a fresh PostgreSQL, RabbitMQ and SeaweedFS (the test
fixtures, tests/service/celery_fixtures.py), one `imaging-service serve --engine
celery` front-end, the workers; the VMDK (a small Linux disk) is uploaded once,
N ImportImage calls are made at once through boto3 and polled until all are
completed (the cache off, so every task converts; instance validation off).
Prints the wall time, tasks per minute, and the ratio against one worker; then, from
the database, each task's run time on its worker and the gap between two tasks of one
worker (the dispatch latency), and the CPU seconds each part used (the workers with the
toolkit's processes, the front-end, PostgreSQL, RabbitMQ, SeaweedFS) against the whole
machine's busy time (/proc/stat): what limits the scale-out.

    .venv/bin/python benchmarks/service_scale.py [--tasks 40] [--workers 1,2,4] [--size-mib 24]
"""

import argparse
import os
import statistics
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
TICK = os.sysconf("SC_CLK_TCK")


def machine_cpu():
    """(busy, total) jiffies of the whole machine, all cores (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def tree_cpu(pid):
    """CPU seconds of process `pid`: its own, its reaped children's (the toolkit's processes a
    worker waited for) and its live descendants'."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except OSError:
                continue
    total, todo, first = 0, [pid], True
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if first:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime of the top one
            first = False
        todo += children.get(current, [])
    return total / TICK


def roles(cluster, front):
    """pid of each part of the cluster, for the CPU split."""
    with open(os.path.join(cluster.pg.dir, "data", "postmaster.pid")) as f:
        postgres = int(f.readline())
    return {"workers": [w.process.pid for w in cluster.workers], "front-end": [front.process.pid],
            "postgresql": [postgres], "rabbitmq": [cluster.rabbit.process.pid],
            "seaweedfs": [cluster.seaweed.process.pid]}


def cpu_by_role(pids):
    return {role: sum(tree_cpu(p) for p in found) for role, found in pids.items()}


def timeline(db, ids):
    """Per task: (worker, started, finished, created) from the database, in seconds."""
    from imaging_service.models import Task
    with db.session() as s:
        rows = s.query(Task.worker_id, Task.created_at, Task.started_at, Task.finished_at).filter(
            Task.id.in_(ids)).all()
    return [(w.split("/")[1].split("-")[0], c.timestamp(), st.timestamp(), f.timestamp()) for w, c, st, f in rows]


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
        pids = roles(cluster, front)
        cpu_before, machine_before = cpu_by_role(pids), machine_cpu()
        started = time.monotonic()
        ids = [ec2.import_image(DiskContainers=[{"Format": "VMDK", "UserBucket": {
            "S3Bucket": bucket, "S3Key": "disk.vmdk"}}], Platform="Linux")["ImportTaskId"] for _ in range(tasks)]
        submitted = time.monotonic() - started
        while True:
            found = ec2.describe_import_image_tasks(ImportTaskIds=ids)["ImportImageTasks"]
            states = [t["Status"] for t in found]
            if all(s in ("completed", "deleted") for s in states):
                break
            time.sleep(2)  # the poll costs the front-end CPU the workers share
        elapsed = time.monotonic() - started
        cpu_after, machine_after = cpu_by_role(pids), machine_cpu()
        failed = [t for t in found if t["Status"] != "completed"]
        if failed:
            raise SystemExit(f"{len(failed)} tasks failed: {failed[0].get('StatusMessage')}")
        rows = timeline(db, ids)
        db.dispose()
        busy = (machine_after[0] - machine_before[0]) / max(1, machine_after[1] - machine_before[1])
        cpu = {role: cpu_after[role] - cpu_before[role] for role in pids}
        return elapsed, submitted, rows, busy, cpu


def report(rows, busy, cpu, elapsed, tasks):
    run = [f - st for _, _, st, f in rows]
    gaps = []
    for worker in {r[0] for r in rows}:
        mine = sorted((st, f) for w, _, st, f in rows if w == worker)
        gaps += [b[0] - a[1] for a, b in zip(mine, mine[1:])]
    per_worker = {w: sum(1 for r in rows if r[0] == w) for w in sorted({r[0] for r in rows})}
    ours = sum(cpu.values())
    print(f"    per task on a worker: {statistics.mean(run):.2f} s mean, {max(run):.2f} s max; "
          f"gap between a worker's tasks: {statistics.mean(gaps) if gaps else 0:.2f} s mean, "
          f"{max(gaps) if gaps else 0:.2f} s max; tasks per worker {list(per_worker.values())}")
    print(f"    CPU: machine {100 * busy:.0f} % busy of {os.cpu_count()} cores; ours "
          f"{ours:.1f} CPU-s = {ours / tasks:.2f} per import ("
          + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
          + f"); others on the machine {max(0.0, busy * os.cpu_count() * elapsed - ours):.1f} CPU-s", flush=True)
    print(f"    CPU-bound ceiling of this machine with nothing else running: {os.cpu_count()} cores / "
          f"{ours / tasks:.2f} CPU-s = {60 * os.cpu_count() * tasks / ours:.0f} imports/min; this round had "
          f"{100 * ours / max(1e-9, busy * os.cpu_count() * elapsed):.0f} % of the machine's busy time", flush=True)


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
              f"({os.path.getsize(vmdk) / MiB:.1f} MiB VMDK), cores: {os.cpu_count()}, "
              f"load average before: {os.getloadavg()[0]:.1f}")
        base = None
        for count in [int(x) for x in args.workers.split(",")]:
            elapsed, submitted, rows, busy, cpu = one_round(vmdk, args.tasks, count)
            base = base or elapsed
            print(f"workers={count}: {elapsed:6.1f} s, {60 * args.tasks / elapsed:5.1f} imports/min "
                  f"(submit {submitted:.1f} s), speed-up x{base / elapsed:.2f}", flush=True)
            report(rows, busy, cpu, elapsed, args.tasks)


if __name__ == "__main__":
    main()
