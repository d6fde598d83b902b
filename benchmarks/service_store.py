#!/usr/bin/env python3
"""What storing costs the embedded object store: weed's CPU seconds per GiB written.

The service writes its results through the filer (`EmbeddedSeaweed.put_file`,
sendfile); users' objects and an external store go through the S3 gateway
(boto3's upload_file, as `ObjectStore.put_file` without the filer). Both run
alternately on the same file (--mib MiB of random data, --count objects a
round) into one `weed mini` started as the service starts it; the ratio is
filer / gateway. CPU seconds, not wall time: the machine's load moves the
wall time, hardly the CPU a byte costs.

    .venv/bin/python benchmarks/service_store.py [--mib 61] [--count 10] [--rounds 3]
"""

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.compare import cpu_seconds, load
from imaging_service.objectstore import ObjectStore
from imaging_service.seaweed import EmbeddedSeaweed

OPERATOR = ("BENCHOPERATOR0000001", "bench-operator-secret-0001", "000000000000", True)


def own_cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=61, help="object size (the import benchmark's result)")
    parser.add_argument("--count", type=int, default=10, help="objects written per round and path")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(load(), flush=True)
    work = tempfile.mkdtemp(prefix="service-store-", dir="/var/tmp")
    seaweed = EmbeddedSeaweed(work)
    try:
        source = os.path.join(work, "object")
        with open(source, "wb") as f:
            f.write(os.urandom(args.mib << 20))
        seaweed.write_identities([OPERATOR])
        seaweed.start()
        gateway = ObjectStore(seaweed.endpoint_url, "us-east-1", OPERATOR[0], OPERATOR[1])
        filer = ObjectStore(seaweed.endpoint_url, "us-east-1", OPERATOR[0], OPERATOR[1], put_file=seaweed.put_file)
        gateway.ensure_bucket("bench-store")
        paths = {"S3 gateway (boto3 upload_file)": gateway, "filer (sendfile)": filer}
        gib = args.count * args.mib / 1024
        results = {name: {"weed": [], "client": []} for name in paths}
        gateway.put_file(source, "bench-store", "warm-up")  # the first write makes the volumes
        for i in range(args.rounds):
            for name, store in (paths.items() if i % 2 == 0 else reversed(paths.items())):
                weed, me = cpu_seconds(seaweed.process.pid), own_cpu()
                for n in range(args.count):
                    store.put_file(source, "bench-store", f"{i}/{n}")
                results[name]["weed"].append((cpu_seconds(seaweed.process.pid) - weed) / gib)
                results[name]["client"].append((own_cpu() - me) / gib)
        print(f"{args.count} x {args.mib} MiB a round, {args.rounds} rounds alternated; CPU s per GiB, "
              "median (min-max):")
        for name, r in results.items():
            print(f"  {name:<32} weed {statistics.median(r['weed']):.2f} ({min(r['weed']):.2f}-{max(r['weed']):.2f}), "
                  f"client {statistics.median(r['client']):.2f}")
        (g, f) = (results[n] for n in paths)
        total = [statistics.median(r["weed"]) + statistics.median(r["client"]) for r in (f, g)]
        print(f"filer / gateway: weed {statistics.median(f['weed']) / statistics.median(g['weed']):.2f}, "
              f"weed + client {total[0] / total[1]:.2f}")
        print(load())
    finally:
        seaweed.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
