#!/usr/bin/env python3
"""Benchmark euca-bundle-image and euca-unbundle on a 1 GiB image, against the
plain OpenSSL + GNU tar pipeline and against each stage's ceiling, in one run.

The image is 512 MiB random then 512 MiB zeros, written here (so it is in the
page cache). Printed:
  - bundle and unbundle: ours (bin/ drivers, each its own process, peak RSS
    from wait4) alternated with the same work done by tar, sha1sum, gzip -1,
    openssl enc and split (bundling) or cat, openssl enc -d, gunzip, sha1sum
    and tar -x (unbundling): medians, min-max, ratio;
  - the ceiling of each stage, one core, in this process, on the same data,
    sampled after each run of the anchor (so amid ours, under the same load):
    read + SHA-1 of the image, deflate as ours does it (3 MiB pieces, isal
    level 2, or stored blocks when a piece's samples do not shrink),
    AES-128-CBC of the gzip stream, SHA-1 of it, AES decryption, isal inflate;
    ours is then compared with the slowest stage of each direction and with
    the bound on this machine's cores (all the stages' times over the cores).
The unbundled image must equal the original. Rates are image MB per second
(MB = 10^6 bytes). euca2ools itself is not packaged for Debian 12 and does not
run here: its figures (44.6 MB/s bundling, 128 MB/s unbundling, 2026-11 on this
machine kind) are kept as a reference.

    .venv/bin/python benchmarks/bundle.py [--runs N] [--size-mib N] [--dir DIR]
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.compare import alternate, load, report  # noqa: E402

BIN = os.path.join(ROOT, "bin")
MiB = 1024 * 1024
EUCA2OOLS = {"bundle": 44.6, "unbundle": 128.0}  # MB/s, measured once (2026-11), not run here
RSS_TARGET = 100 * 10 ** 6
AES_IMAGE = "AES-128-CBC, whole image"  # the reference stage, not one of ours


def thread_cpu(pid):
    """{thread id: CPU seconds so far} of the process `pid`."""
    seconds = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return seconds
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        seconds[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def run_driver(argv, rss, cpu, longest):
    """Wall seconds of one driver run.

    Appended: its peak RSS to `rss`, its CPU seconds to `cpu`, and the CPU
    seconds of its busiest thread to `longest` (sampled every 20 ms): with
    free cores the run can take no less than that thread, nor than the total
    over the cores, whatever the load was while it ran."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    threads = {}
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        threads.update(thread_cpu(process.pid))
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(argv)} failed: {process.stderr.read().decode()}")
    process.stderr.close()
    rss.append(usage.ru_maxrss * 1024)
    cpu.append(usage.ru_utime + usage.ru_stime)
    longest.append(max(threads.values(), default=0.0))
    return elapsed


def run_shell(script, **env):
    started = time.perf_counter()
    subprocess.run(["bash", "-c", "set -e -o pipefail\n" + script], check=True, env=dict(os.environ, **env))
    return time.perf_counter() - started


def sha1(path):
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while data := f.read(4 * MiB):
            digest.update(data)
    return digest.hexdigest()


def stages(image):
    """{stage: fn} timing each stage alone on one core, on the same data as ours."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from isal import igzip_lib

    from imaging_elements.bundle.bundle import DEFLATE_CHUNK, _deflate_piece
    key, iv = os.urandom(16), os.urandom(16)

    def pieces():
        """The image in DEFLATE_CHUNK pieces, as ours reads it."""
        with open(image, "rb", buffering=0) as f:
            while data := f.read(DEFLATE_CHUNK):
                yield data

    # The gzip stream as ours writes it: pieces deflated on their own, sync-flushed.
    gz = b"".join(b"".join(_deflate_piece(data, False)[0]) for data in pieces())
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    padded = gz + bytes(16 - len(gz) % 16)
    cipher = enc.update(padded) + enc.finalize()

    def read_sha1():
        digest = hashlib.sha1()
        for data in pieces():
            digest.update(data)

    def gzip():
        for data in pieces():
            _deflate_piece(data, False)

    def in_mib(data, fn):
        view = memoryview(data)
        for start in range(0, len(view), MiB):
            fn(view[start:start + MiB])

    def aes_encrypt():
        e = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        out = bytearray(MiB + 16)
        in_mib(padded, lambda piece: e.update_into(piece, out))

    def aes_decrypt():
        d = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        out = bytearray(MiB + 16)
        in_mib(cipher, lambda piece: d.update_into(piece, out))

    def aes_image():
        # The reference stage: every byte of the image, read from the
        # file and encrypted, as if nothing compressed.
        e = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        out = bytearray(DEFLATE_CHUNK + 16)
        for data in pieces():
            e.update_into(data, out)

    def sha1_gz():
        digest = hashlib.sha1()
        in_mib(cipher, digest.update)

    def inflate():
        # As ours: 128 KiB in, at most 128 KiB out at a time.
        d = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_DEFLATE)
        view = memoryview(gz)
        for start in range(0, len(view), 128 * 1024):
            d.decompress(view[start:start + 128 * 1024], 128 * 1024)
            while not (d.needs_input or d.eof):
                d.decompress(b"", 128 * 1024)

    return {"read + SHA-1 of the image": read_sha1, "deflate (isal 2 or stored)": gzip,
            "AES-128-CBC encrypt": aes_encrypt, "SHA-1 of the parts": sha1_gz,
            "AES-128-CBC decrypt": aes_decrypt, "isal inflate": inflate,
            AES_IMAGE: aes_image}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each side (alternated)")
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (half random, half zeros)")
    parser.add_argument("--dir", default="/var/tmp", help="where to write the image and the bundle")
    parser.add_argument("--stages", metavar="IMAGE", help=argparse.SUPPRESS)  # one sample of the stages, JSON
    args = parser.parse_args()
    if args.stages:
        took = {}
        for stage, fn in stages(args.stages).items():
            started = time.perf_counter()
            fn()
            took[stage] = time.perf_counter() - started
        print(json.dumps(took))
        return 0

    print(load() + " (before)")
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
            f.writelines(os.urandom(MiB) for _ in range(args.size_mib // 2))
            f.writelines(bytes(MiB) for _ in range(args.size_mib - args.size_mib // 2))
        size = os.path.getsize(image)
        mb = size / 10 ** 6
        ours_dir, out_dir = os.path.join(tmp, "bundle"), os.path.join(tmp, "out")
        plain_dir, plain_out = os.path.join(tmp, "plain"), os.path.join(tmp, "plain-out")
        rss = {"bundle": [], "unbundle": []}
        # CPU seconds (user + system) of each run: what other helpers' load moves least.
        cpu = {"bundle": [], "unbundle": []}
        longest = {"bundle": [], "unbundle": []}

        def ours_bundle():
            shutil.rmtree(ours_dir, ignore_errors=True)
            return run_driver([os.path.join(BIN, "euca-bundle-image"), "-i", image, "-r", "x86_64",
                               "-u", "111122223333", "-k", keys["user"][0], "-c", keys["user"][1],
                               "--ec2cert", keys["cloud"][1], "-d", ours_dir], rss["bundle"], cpu["bundle"],
                              longest["bundle"])

        def ours_unbundle():
            shutil.rmtree(out_dir, ignore_errors=True)
            os.mkdir(out_dir)
            return run_driver([os.path.join(BIN, "euca-unbundle"), "-m",
                               os.path.join(ours_dir, "bench.img.manifest.xml"), "-s", ours_dir,
                               "-d", out_dir, "-k", keys["cloud"][0]], rss["unbundle"],
                              cpu["unbundle"], longest["unbundle"])

        secret = {"KEY": os.urandom(16).hex(), "IV": os.urandom(16).hex()}

        def plain_bundle():
            shutil.rmtree(plain_dir, ignore_errors=True)
            os.mkdir(plain_dir)
            return run_shell(
                'tar -c -f - -C "$SRC" bench.img | tee >(sha1sum > "$OUT/digest") | gzip -1 '
                '| openssl enc -e -aes-128-cbc -K "$KEY" -iv "$IV" '
                '| split -b 10M -d -a 2 - "$OUT/bench.img.part."; sha1sum "$OUT"/bench.img.part.* > "$OUT/parts"',
                SRC=tmp, OUT=plain_dir, **secret)

        def plain_unbundle():
            shutil.rmtree(plain_out, ignore_errors=True)
            os.mkdir(plain_out)
            return run_shell(
                'sha1sum "$OUT"/bench.img.part.* > /dev/null; cat "$OUT"/bench.img.part.* '
                '| openssl enc -d -aes-128-cbc -K "$KEY" -iv "$IV" | gunzip '
                '| tee >(sha1sum > "$DEST/digest") | tar -x -f - -C "$DEST"',
                OUT=plain_dir, DEST=plain_out, **secret)

        print(f"image: {mb:.0f} MB ({args.size_mib // 2} MiB random, then zeros), in the page cache",
              flush=True)
        # Each stage's ceiling is sampled right after each run of the anchor, so
        # that it meets the same load as the runs of ours it is compared with;
        # in a process of its own, so that the data it holds (the image's gzip
        # stream and ciphertext) never counts in the drivers' peak RSS.
        times = {}

        def then_stages(anchor):
            def run():
                seconds = anchor()
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--stages", image],
                                     check=True, stdout=subprocess.PIPE, text=True).stdout
                for stage, took in json.loads(out).items():
                    times.setdefault(stage, []).append(took)
                return seconds
            return run

        rates = {}
        for name, ours, plain in (("bundle", ours_bundle, plain_bundle),
                                  ("unbundle", ours_unbundle, plain_unbundle)):
            a, b = alternate(ours, then_stages(plain), args.runs)
            rates[name] = mb / statistics.median(a)
            report(f"{name}: seconds for the image", f"euca-{name}" if name == "unbundle" else
                   "euca-bundle-image", a, "openssl + GNU tar" + (" (gzip -1)" if name == "bundle" else ""),
                   b, unit="s", scale=1, digits=2)
            print(f"  ours: {rates[name]:.0f} MB/s (min-max {mb / max(a):.0f}-{mb / min(a):.0f}); "
                  f"peak RSS {max(rss[name]) / 10 ** 6:.0f} MB (target <= {RSS_TARGET / 10 ** 6:.0f}); "
                  f"euca2ools {EUCA2OOLS[name]} MB/s (reference, not run): x{rates[name] / EUCA2OOLS[name]:.1f}")
            gib = size / 1024 ** 3
            print(f"  ours: CPU (user + system) {statistics.median(cpu[name]) / gib:.2f} s per GiB "
                  f"(min-max {min(cpu[name]) / gib:.2f}-{max(cpu[name]) / gib:.2f}); "
                  f"cores in use (CPU / wall): {statistics.median(cpu[name]) / statistics.median(a):.2f}")
            # On free cores a run takes at least its busiest thread's CPU and
            # the total over the cores: what the code allows, not the load.
            cores = os.cpu_count() or 1
            idle = [max(t, c / cores) for t, c in zip(longest[name], cpu[name])]
            print(f"  ours: busiest thread {statistics.median(longest[name]) / gib:.2f} s of CPU per GiB; "
                  f"on {cores} free cores at least {statistics.median(idle) / gib:.2f} s per GiB, "
                  f"at most {mb / statistics.median(idle):.0f} MB/s")
        if sha1(os.path.join(out_dir, "bench.img")) != sha1(image) or \
                sha1(os.path.join(plain_out, "bench.img")) != sha1(image):
            sys.exit("an unbundled image differs from the original")
        bundled = sum(os.path.getsize(os.path.join(ours_dir, n)) for n in os.listdir(ours_dir))
        print(f"bundle: {bundled / 10 ** 6:.0f} MB; images unbundled by both equal the original")

        print(f"stage ceilings, one core each, median of {len(times['isal inflate'])}, sampled between the "
              f"runs (image MB per second):")
        for stage, samples in times.items():
            print(f"  {stage:<28} {mb / statistics.median(samples):6.0f} MB/s "
                  f"(min-max {mb / max(samples):.0f}-{mb / min(samples):.0f})")
        # What each direction's threads do, stage by stage (the tar stream's
        # SHA-1 when unbundling costs what read + SHA-1 of the image does).
        work = {"bundle": ("read + SHA-1 of the image", "deflate (isal 2 or stored)", "AES-128-CBC encrypt",
                           "SHA-1 of the parts"),
                "unbundle": ("SHA-1 of the parts", "AES-128-CBC decrypt", "isal inflate",
                             "read + SHA-1 of the image")}
        for name, parts in work.items():
            seconds = {s: statistics.median(times[s]) for s in parts}
            slowest = max(seconds, key=seconds.get)
            ceiling = mb / seconds[slowest]
            # On N cores no split beats the sum of the stages over N.
            cores = os.cpu_count() or 1
            bound = mb / max(sum(seconds.values()) / cores, seconds[slowest])
            print(f"  {name}: ours {rates[name]:.0f} MB/s = {rates[name] / ceiling:.2f} of its slowest stage "
                  f"({slowest}, {ceiling:.0f} MB/s); = {rates[name] / bound:.2f} of the bound on {cores} "
                  f"cores (all its stages over {cores}: {bound:.0f} MB/s)")
        aes = mb / statistics.median(times[AES_IMAGE])
        print(f"  bundle: ours {rates['bundle']:.0f} MB/s = {rates['bundle'] / aes:.2f} of AES-128-CBC over "
              f"every byte of the image read from its file ({aes:.0f} MB/s: the slowest stage the issue named, "
              "before zeros were compressed away ahead of AES)")
        print(load() + " (after)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
