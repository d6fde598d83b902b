"""qemu-img for the converters: safe opening of untrusted images, capacity
estimates, and `qemu-img convert -p` turned into progress events.

Images come from users, so before qemu-img touches one we make sure it cannot
reach outside its own file: no backing file, no external qcow2 data file, and
a VMDK descriptor's extents only next to the descriptor. Every path given to
qemu-img is absolute (a relative "nbd:..." or "json:{...}" would be parsed as
a protocol), and qemu-img runs with a memory limit, as qemu's documentation
advises for untrusted images.
"""

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys

# Our image types -> qemu block drivers.
DRIVERS = {"raw": "raw", "partition": "raw", "vmdk": "vmdk", "qcow2": "qcow2",
           "vhd": "vpc", "vhdx": "vhdx"}

# Output options per type; subformats that write one file only (the output
# is renamed into place, so extra extent files would be left behind).
VMDK_SUBFORMATS = ("streamOptimized", "monolithicSparse")
VHD_SUBFORMATS = ("dynamic", "fixed")
VHDX_SUBFORMATS = ("dynamic", "fixed")

MEMORY_LIMIT = 4 << 30      # address space for qemu-img (it reserves thread stacks)
INSPECT_CPU_LIMIT = 60      # seconds of CPU for info/map on a hostile image
MiB = 1 << 20


class QemuImgError(Exception):
    """A conversion problem; the message names the file and the reason."""


def _limits(cpu=None):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        if cpu:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    return apply


def _qemu_message(stderr):
    """qemu-img's own reason, without the 'qemu-img: ' prefixes."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return " / ".join(re.sub(r"^qemu-img: ", "", line) for line in lines[-3:]) or "no reason given"


def _inspect(argv, path, what):
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_limits(INSPECT_CPU_LIMIT), stdin=subprocess.DEVNULL)
    if result.returncode:
        if result.returncode < 0:
            raise QemuImgError(f"{path}: qemu-img {argv[1]} was killed by signal "
                               f"{-result.returncode} (a hostile or broken {what} image?)")
        raise QemuImgError(f"{path}: not a readable {what} image: {_qemu_message(result.stderr)}")
    try:
        return json.loads(result.stdout)
    except ValueError as exc:
        raise QemuImgError(f"{path}: qemu-img {argv[1]} printed no JSON") from exc


def _source_opts(path, image_type):
    # file.filename names the file plainly: no protocol or json: parsing.
    return f"driver={DRIVERS[image_type]},file.driver=file,file.filename={path.replace(',', ',,')}"


# -- inspecting untrusted images -------------------------------------------------

VMDK_EXTENT = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?', re.M)


def is_vmdk_descriptor(path):
    with open(path, "rb") as f:
        return f.read(21) == b"# Disk DescriptorFile"


def check_vmdk_descriptor(path):
    """A text VMDK descriptor may only name extent files in its own directory, and
    its flat extents must hold all the sectors it declares (not truncated)."""
    if not is_vmdk_descriptor(path):
        return
    with open(path, "rb") as f:
        text = f.read(65536).decode("utf-8", errors="replace")
    directory = os.path.dirname(os.path.realpath(path))
    for access, sectors, kind, name, offset in VMDK_EXTENT.findall(text):
        if kind.upper() == "ZERO" or not name:
            continue
        target = os.path.realpath(os.path.join(directory, name))
        if os.path.dirname(target) != directory or os.path.isabs(name) or "/" in name:
            raise QemuImgError(f"{path}: the VMDK descriptor names the extent {name!r} outside its "
                               "own directory; refusing to read host files")
        if not os.path.isfile(target):
            raise QemuImgError(f"{path}: the VMDK descriptor names the extent {name!r}, "
                               "which is not a regular file next to it")
        need = (int(sectors) + int(offset or 0)) * 512
        if kind.upper() == "FLAT" and os.path.getsize(target) < need:
            raise QemuImgError(f"{path}: truncated vmdk image: the flat extent {name!r} has "
                               f"{os.path.getsize(target)} bytes, the descriptor declares {need}")


def info(path, image_type):
    """qemu-img info as a dict, after refusing anything that reaches outside the file."""
    path = os.path.abspath(path)
    if image_type == "vmdk":
        check_vmdk_descriptor(path)
    # info never opens a backing file; it only reports it.
    data = _inspect(["qemu-img", "info", "--output=json", "-f", DRIVERS[image_type], path],
                    path, image_type)
    if data.get("backing-filename") or data.get("full-backing-filename"):
        raise QemuImgError(f"{path}: the {image_type} image has a backing file "
                           f"{data.get('backing-filename')!r}; refusing to follow it out of the image")
    specific = (data.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file"):
        raise QemuImgError(f"{path}: the {image_type} image keeps its data in the external file "
                           f"{specific['data-file']!r}; refusing to read it")
    if "virtual-size" not in data:
        raise QemuImgError(f"{path}: qemu-img reports no virtual size")
    return data


def check_within_file(path, image_type):
    """Refuse an image whose tables point past the end of the file (a truncated copy):
    qemu would read zeros there and convert it without a word."""
    path = os.path.abspath(path)
    if DRIVERS[image_type] == "raw" or (image_type == "vmdk" and is_vmdk_descriptor(path)):
        return  # a descriptor's extents were checked with the descriptor
    size = os.path.getsize(path)
    extents = _inspect(["qemu-img", "map", "--output=json", "-f", DRIVERS[image_type], path],
                       path, image_type)
    for e in extents:
        if e.get("data") and "offset" in e and e["offset"] + e["length"] > size:
            raise QemuImgError(f"{path}: truncated {image_type} image: guest data at byte {e['start']} "
                               f"is stored at byte {e['offset']}, past the end of the file ({size} bytes)")


def data_bytes(path, image_type, block=1):
    """Bytes of guest data in the image (allocated, not known to be zero), counted in
    whole `block`-sized blocks as a format that allocates by blocks would store it."""
    path = os.path.abspath(path)
    extents = _inspect(["qemu-img", "map", "--output=json", "-f", DRIVERS[image_type], path],
                       path, image_type)
    blocks, last = 0, -1
    for e in extents:
        if not e.get("data") or e.get("zero"):
            continue
        first, end = e["start"] // block, (e["start"] + e["length"] - 1) // block
        first = max(first, last + 1)  # a block shared with the previous extent counts once
        if end >= first:
            blocks += end - first + 1
            last = end
    return blocks * block


# -- converting ------------------------------------------------------------------

def output_options(dest_type, env=os.environ):
    """The -o options for the destination type, from IMG_*_SUBFORMAT; raises on a bad one."""
    if dest_type == "vmdk":
        sub = env.get("IMG_VMDK_SUBFORMAT") or "streamOptimized"
        if sub not in VMDK_SUBFORMATS:
            raise QemuImgError(f"IMG_VMDK_SUBFORMAT={sub}: not a single-file VMDK; "
                               f"use one of {', '.join(VMDK_SUBFORMATS)}")
        return f"subformat={sub}"
    if dest_type == "vhd":
        sub = env.get("IMG_VHD_SUBFORMAT") or "dynamic"
        if sub not in VHD_SUBFORMATS:
            raise QemuImgError(f"IMG_VHD_SUBFORMAT={sub}: use one of {', '.join(VHD_SUBFORMATS)}")
        # force_size keeps the exact byte size instead of rounding to a CHS geometry.
        return f"subformat={sub},force_size=on"
    if dest_type == "vhdx":
        sub = env.get("IMG_VHDX_SUBFORMAT") or "dynamic"
        if sub not in VHDX_SUBFORMATS:
            raise QemuImgError(f"IMG_VHDX_SUBFORMAT={sub}: use one of {', '.join(VHDX_SUBFORMATS)}")
        return f"subformat={sub}"
    return None


PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def convert(source, source_type, dest, dest_type, size=None, target_opts=None, progress=None,
            virtual=None):
    """Convert `source` into `dest` with qemu-img, calling progress(done, total) as it goes.

    size: grow the guest disk to this many bytes (zeros appended; never shrinks).
    target_opts: write into an existing file through these --target-image-opts
    (e.g. a raw slice at an offset) instead of creating `dest`.
    On failure or SIGTERM nothing is left at `dest` (unless it was given to write into).
    """
    source, dest = os.path.abspath(source), os.path.abspath(dest)
    if virtual is None:
        virtual = info(source, source_type)["virtual-size"]
    total = max(virtual, size or 0)
    argv = ["qemu-img", "convert", "-p", "--image-opts", _source_opts(source, source_type)]
    if total > virtual:
        # A second source is appended to the first: zeros, which qemu-img does not write.
        argv.append(f"driver=null-co,read-zeroes=on,size={total - virtual}")
    if target_opts:
        argv += ["-n", "--target-image-opts", target_opts]
    else:
        argv += ["-O", DRIVERS[dest_type]]
        options = output_options(dest_type)
        if options:
            argv += ["-o", options]
        argv.append(dest)
    created = not target_opts
    _run_with_progress(argv, source, source_type, dest, created, total, progress)
    return total


def _run_with_progress(argv, source, source_type, dest, created, total, progress):
    previous = signal.signal(signal.SIGTERM, terminate)
    process = None
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, preexec_fn=_limits())
        buffer, last = b"", -1
        while True:
            chunk = process.stdout.read1(4096)
            if not chunk:
                break
            buffer += chunk
            *done_parts, buffer = re.split(rb"[\r\n]", buffer)
            for part in done_parts:
                match = PROGRESS.search(part)
                done = int(float(match.group(1)) / 100 * total) if match else last
                if progress and done > last:
                    progress(done, total)
                    last = done
        stderr = process.stderr.read().decode(errors="replace")
        process.wait()
        if process.returncode:
            reason = (f"killed by signal {-process.returncode}" if process.returncode < 0
                      else _qemu_message(stderr))
            raise QemuImgError(f"{source}: cannot convert from {source_type} to {dest} "
                               f"(a damaged or truncated image?): {reason}")
        if progress and last < total:
            progress(total, total)
    except BaseException:
        if process and process.poll() is None:
            process.kill()
            process.wait()
        if created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process:
            process.stdout.close()
            process.stderr.close()


class Terminated(BaseException):
    """SIGTERM, raised so that cleanup code runs (a BaseException: nothing swallows it)."""


def terminate(signum, frame):
    raise Terminated(f"stopped by signal {signum}")


def measure_qcow2(source, source_type):
    """qemu-img measure's required bytes for a qcow2 output."""
    source = os.path.abspath(source)
    data = _inspect(["qemu-img", "measure", "--output=json", "-O", "qcow2",
                     "--image-opts", _source_opts(source, source_type)], source, source_type)
    return int(data["required"])


def supported(image_type):
    """Does this qemu-img have the driver for `image_type`?"""
    try:
        out = subprocess.run(["qemu-img", "--help"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True).stdout
    except OSError:
        return False
    formats = re.search(r"Supported formats:(.*)", out)
    return bool(formats) and DRIVERS[image_type] in formats.group(1).split()


def parse_size(text):
    """'4G' -> bytes, powers of 1024 (the runner passes --size through as IMG_SIZE)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", str(text), re.I)
    if not match:
        raise QemuImgError(f"IMG_SIZE={text!r} is not a size (like 512M, 10G, or bytes)")
    return int(float(match.group(1)) * 1024 ** " KMGTP".index(match.group(2).upper() or " "))


def required_bytes(source, source_type, dest_type, env=os.environ):
    """What converting `source` to `dest_type` writes, at most (the data, not the holes)."""
    virtual = info(source, source_type)["virtual-size"]
    if dest_type == "qcow2":
        return measure_qcow2(source, source_type)
    if dest_type in ("raw", "partition"):
        return data_bytes(source, source_type, 4096)
    if "fixed" in (output_options(dest_type, env) or ""):
        return virtual + 8 * MiB
    # Dynamic formats allocate whole blocks (grains), plus tables and headers.
    block = {"vmdk": 64 << 10, "vhd": 2 * MiB, "vhdx": 32 * MiB}[dest_type]
    return min(data_bytes(source, source_type, block), virtual) + virtual // 4096 + 8 * MiB


# -- the convert.d hooks of the convert-qemu element --------------------------------
# Both hooks (to raw, from raw) are this code; their headers say which pairs they take.

def _content_matches(path, declared):
    from imaging_elements import imagetype
    try:
        detected = imagetype.detect(path)
    except imagetype.ImageTypeError as exc:
        raise QemuImgError(str(exc)) from exc
    if declared in ("raw", "partition"):
        ok = detected in ("raw", "partition", "unknown")
    else:
        ok = detected == declared
    if not ok:
        raise QemuImgError(f"{path}: declared as {declared} but the content is {detected}")


def hook_run():
    from imaging_elements import hooklib
    env = os.environ
    source, dest = env["IMG_IMAGE"], env["IMG_CONVERT_OUTPUT"]
    source_type, dest_type = env["IMG_SOURCE_TYPE"], env["IMG_DEST_TYPE"]
    try:
        _content_matches(source, source_type)
        virtual = info(source, source_type)["virtual-size"]
        check_within_file(source, source_type)
        size = parse_size(env["IMG_SIZE"]) if env.get("IMG_SIZE") else None
        if size is not None and size < virtual:
            raise QemuImgError(f"IMG_SIZE={env['IMG_SIZE']} ({size} bytes) is smaller than the "
                               f"{virtual} bytes of {source}; disks are never shrunk")
        total = convert(source, source_type, dest, dest_type, size=size, progress=hooklib.progress,
                        virtual=virtual)
    except QemuImgError as exc:
        hooklib.fail(str(exc))
    except Terminated:
        sys.exit(143)
    subformat = output_options(dest_type) or ""
    allocated = os.stat(dest).st_blocks * 512
    hooklib.describe(f"converted {source_type} to {dest_type}{' (' + subformat + ')' if subformat else ''}"
                     f" with qemu-img: {total} bytes virtual"
                     f"{f' (grown from {virtual})' if total > virtual else ''}, {allocated} bytes written")


def hook_required_capacity():
    from imaging_elements import hooklib
    env = os.environ
    # The runner asks every step of a chain before the first one runs: IMG_IMAGE is
    # then still the current image, of type IMG_IMAGE_TYPE, with the same guest data.
    source_type = env.get("IMG_IMAGE_TYPE") or env["IMG_SOURCE_TYPE"]
    try:
        return required_bytes(env["IMG_IMAGE"], source_type, env["IMG_DEST_TYPE"])
    except QemuImgError as exc:
        hooklib.fail(str(exc))
