#!/usr/bin/env python3
"""Benchmark: mount + unmount a 1 GiB-class streamOptimized VMDK, against guestmount.

    .venv/bin/python benchmarks/mount.py [--runs 5] [--baseline-runs 3] [--no-baseline]

The VMDK (built once, cached beside the Debian root): a 1 GiB MBR disk with
/boot (ext4, by UUID in the guest fstab) and / (ext4) holding the Debian 12
root of tests/images/mkdebian.  Target (issue 3): median of 5 <= 0.5 s.

Printed per run and as medians:
  hooks    the stock mounters (`mounters`) run as euca-image-process runs
           them: qemu-storage-daemon FUSE export, partition table, root and
           /boot mounted; then the cleanup journal unwound.  This is the
           issue's figure: mount + unmount.
  process  `euca-image-process --phases mount -i VMDK mounters`, start to
           exit: adds the runner's start-up and bookkeeping.  On this machine
           kind PID 1 reaps orphans only about once a second, and the journal
           waits for the killed qemu-storage-daemon to be reaped, which adds
           1 to 1.5 s here that a host with a prompt init does not pay (the
           `hooks` figure runs as the daemon's subreaper, so the journal's
           own waitpid reaps it at once; the same run under a reaping
           subreaper takes about 0.3 s).
The anchor is libguestfs' `guestmount -i --ro` + `guestunmount` on the same
file, waiting for guestmount's process to exit, alternated with the hooks
(benchmarks/compare.py) when libguestfs-tools is installed.  It boots an
appliance, which needs KVM to be fair: under TCG, as here, it is shown only as
a reference (13 s, issue 3, 2026-11).
"""

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from imaging_elements.sdk.journal import process_state  # noqa: E402
from benchmarks.compare import alternate, report  # noqa: E402
from tests import imagebuild  # noqa: E402
from tests.test_mount_support import MountRun  # noqa: E402

MiB = imagebuild.MiB
TARGET = 0.5
GUESTMOUNT_REFERENCE = "13 s for guestmount + guestunmount (issue 3, 2026-11, TCG)"
DISK = 1024 * MiB
BOOT = 128 * MiB


def bench_vmdk():
    tarball = imagebuild.debian_tarball()
    st = os.stat(tarball)
    out = os.path.join(imagebuild.CACHE, f"mount-bench-{st.st_size}-{int(st.st_mtime)}.vmdk")
    if os.path.exists(out):
        return out
    work = tempfile.mkdtemp(dir=imagebuild.CACHE, prefix=".mount-bench-")
    try:
        root = imagebuild.debian_tree(os.path.join(work, "root"))
        boot_uuid = "b0000000-0000-4000-8000-00000000b007"
        with open(os.path.join(root, "etc", "fstab"), "w") as f:
            f.write(f"LABEL=rootfs / ext4 defaults 0 1\nUUID={boot_uuid} /boot ext4 defaults 0 2\n")
        boot = os.path.join(work, "boot-tree")
        shutil.move(os.path.join(root, "boot"), boot)
        os.makedirs(os.path.join(root, "boot"))
        boot_fs = imagebuild.make_fs(os.path.join(work, "boot.ext4"), boot, size=BOOT, label="boot",
                                     uuid=boot_uuid)
        root_fs = imagebuild.make_fs(os.path.join(work, "root.ext4"), root, size=DISK - BOOT - 2 * MiB,
                                     label="rootfs")
        shutil.rmtree(root)
        raw = imagebuild.make_disk(os.path.join(work, "disk.raw"),
                                   [{"image": boot_fs, "bootable": True}, {"image": root_fs}], size=DISK)
        os.unlink(boot_fs)
        os.unlink(root_fs)
        imagebuild.qemu_convert(raw, os.path.join(work, "disk.vmdk"), "vmdk", "subformat=streamOptimized")
        os.replace(os.path.join(work, "disk.vmdk"), out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_hooks(vmdk):
    """(mount s, unmount s, CPU s of all the processes) through the mounters' hooks."""
    cpu = children_cpu()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        run = MountRun(work, vmdk, "vmdk")
        started = time.perf_counter()
        ok = run.run()
        mounted = time.perf_counter()
        try:
            if not ok:
                sys.exit(f"mount failed in {run.failed_hook}: {run.failure}")
            if not os.path.isfile(os.path.join(run.mount_point, "boot", "grub", "grub.cfg")) and \
                    not any(n.startswith("vmlinuz") for n in os.listdir(os.path.join(run.mount_point, "boot"))):
                sys.exit("/boot is not mounted")
        finally:
            failures = run.unwind()
        done = time.perf_counter()
        if failures:
            sys.exit(f"unwind failed: {failures}")
    return mounted - started, done - mounted, children_cpu() - cpu


def run_process(vmdk):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "euca-image-process"), "-q",
                             "--phases", "mount", "-i", vmdk, "mounters"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        sys.exit(f"euca-image-process failed (exit {result.returncode}):\n{result.stderr}")
    return time.perf_counter() - started


def run_guestmount(vmdk, env):
    with tempfile.TemporaryDirectory() as tmp:
        mnt, pid_file = os.path.join(tmp, "mnt"), os.path.join(tmp, "pid")
        os.makedirs(mnt)
        started = time.perf_counter()
        subprocess.run(["guestmount", "--format=vmdk", "-a", vmdk, "-i", "--ro", "--pid-file", pid_file, mnt],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not os.path.isfile(os.path.join(mnt, "etc", "fstab")):
            sys.exit("guestmount did not mount the root")
        with open(pid_file) as f:
            pid = int(f.read())
        subprocess.run(["guestunmount", mnt], env=env, check=True)
        while os.path.exists(f"/proc/{pid}") and process_state(pid) != "Z":
            time.sleep(0.01)
        return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline-runs", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (loop devices, mounts, FUSE)")
    vmdk = bench_vmdk()
    print(f"image: {vmdk} ({os.path.getsize(vmdk) / MiB:.0f} MiB streamOptimized VMDK, "
          f"{DISK // MiB} MiB disk: /boot + / ext4, Debian 12)")
    print(f"python: {sys.executable}; load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    run_hooks(vmdk)  # warm-up: page cache and bytecode, as the baseline gets its appliance cache
    totals, processes, cpus = [], [], []
    for i in range(args.runs):
        mount, unmount, cpu = run_hooks(vmdk)
        process = run_process(vmdk)
        totals.append(mount + unmount)
        processes.append(process)
        cpus.append(cpu)
        print(f"run {i + 1}: hooks mount {mount:.3f} s + unmount {unmount:.3f} s = {mount + unmount:.3f} s "
              f"(CPU {cpu:.3f} s); process {process:.3f} s")
    median = statistics.median(totals)
    print(f"CPU time of every process of a mount+unmount (hooks, qemu, tools): median "
          f"{statistics.median(cpus):.3f} s")
    verdict = "meets" if median <= TARGET else "misses"
    print(f"mount+unmount (hooks): median of {args.runs}: {median:.3f} s ({verdict} the {TARGET} s target)")
    print(f"euca-image-process --phases mount: median of {args.runs}: {statistics.median(processes):.3f} s")
    if args.no_baseline:
        return
    from tests.guestimages import virt_inspector_env  # libguestfs' environment for this host
    env = virt_inspector_env() if shutil.which("guestmount") else None
    if env is None:
        print(f"anchor: guestmount not run (libguestfs-tools not installed; it needs KVM to be fair, and "
              f"this machine has none); reference: {GUESTMOUNT_REFERENCE}")
        return
    print(f"anchor: guestmount under TCG (no KVM here: unfair to libguestfs); reference: {GUESTMOUNT_REFERENCE}")
    os.makedirs(env["LIBGUESTFS_CACHEDIR"], exist_ok=True)
    run_guestmount(vmdk, env)  # warm-up: builds libguestfs' appliance once

    def hooks():
        mount, unmount, _ = run_hooks(vmdk)
        return mount + unmount
    ours, theirs = alternate(hooks, lambda: run_guestmount(vmdk, env), args.baseline_runs, warmup=0)
    report("mount + unmount", "mounters (hooks)", ours, "guestmount + guestunmount", theirs, unit="s", scale=1,
           digits=2)

if __name__ == "__main__":
    main()
