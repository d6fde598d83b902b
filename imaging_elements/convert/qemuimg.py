"""qemu-img for the converters: safe opening of untrusted images, capacity
estimates, and `qemu-img convert -p` turned into progress events.

Images come from users, and qemu opens whatever an image names (a backing
file, an external data file, VMDK extents).  So every qemu-img here runs
confined (confine.py): the image is the only file it can see, bound
read-only at a fixed name, with the output the only writable one.  Whatever
the format says, nothing else can be opened.  On top, `check()` asks qemu
itself (`qemu-img info`) what the image references and refuses anything but
the image, so that the user gets a clear reason rather than a failed open.
"""

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys

from imaging_elements.engine import config, confine, tools

# Our image types -> qemu block drivers.
DRIVERS = {"raw": "raw", "partition": "raw", "vmdk": "vmdk", "qcow2": "qcow2",
           "vhd": "vpc", "vhdx": "vhdx"}

# Output options per type; subformats that write one file only (the output
# is renamed into place, so extra extent files would be left behind).
VMDK_SUBFORMATS = ("streamOptimized", "monolithicSparse")
VHD_SUBFORMATS = ("dynamic", "fixed")
VHDX_SUBFORMATS = ("dynamic", "fixed")

# info/map/check/measure on a hostile image: bounded in CPU and wall-clock time.
INSPECT_LIMITS = confine.Limits(cpu=60)
INSPECT_TIMEOUT = 300
CONVERT_LIMITS = confine.Limits()
MiB = 1 << 20

IMAGE = "image"     # the image's name inside the sandbox
OUTPUT = "output"
INSIDE_IMAGE = f"{confine.INSIDE}/{IMAGE}"


# required-capacity and run are two processes of one hook asking qemu the same
# questions about the same file, and each confined qemu-img costs a sandbox and a
# read of the image's tables (0.1-0.3 s for a 1 GiB VMDK).  The hook entry points
# keep the answers for the rest of the run (keep_answers), keyed by the file's
# identity: a file changed in any way (its ctime) is asked again.
_kept = None


def keep_answers(directory, record):
    """Keep qemu's answers in `directory` (the run's scratch directory; None: ask
    every time).  record(action, **args) journals their removal before they exist."""
    global _kept
    _kept = (os.path.join(directory, "qemu-img-answers"), record) if directory else None


def _answer(kind, path, image_type, ask):
    """ask(), or the answer kept for this file as it is now."""
    if not _kept:
        return ask()
    import hashlib
    directory, record = _kept
    st = os.stat(path)
    key = (f"{kind} {image_type} {st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} "
           f"{st.st_ctime_ns} {os.path.abspath(path)}")
    kept = os.path.join(directory, hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
    with contextlib.suppress(OSError, ValueError), open(kept) as f:
        return json.load(f)
    answer = ask()
    try:  # kept only if there is room: it saves time, nothing more
        if not os.path.isdir(directory):
            record("remove", path=directory)
            os.makedirs(directory, exist_ok=True)
        with open(f"{kept}.{os.getpid()}", "w") as f:
            json.dump(answer, f)
        os.replace(f"{kept}.{os.getpid()}", kept)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(f"{kept}.{os.getpid()}")
    return answer


class QemuImgError(Exception):
    """A conversion problem; the message names the file and the reason."""


class DamagedImage(QemuImgError, tools.BadInput):
    """The image itself is at fault: unreadable, truncated, corrupt or hostile (exit 3)."""


class LogNeedsReplay(QemuImgError):
    """A VHDX whose metadata log was not replayed (an unclean shutdown)."""


def qemu_message(stderr, name, others=None):
    """qemu-img's own reason, naming the user's file (not the sandbox's names)."""
    lines = []
    for line in stderr.splitlines():
        line = re.sub(r"^qemu-(img|storage-daemon): ", "", line.strip())
        line = re.sub(r"Could not open '[^']*file\.filename=" + INSIDE_IMAGE + r"': ", "", line)
        for inside, host in (others or {}).items():
            line = line.replace(inside, host)
        if line:
            lines.append(line.replace(INSIDE_IMAGE, name).replace(confine.INSIDE + "/", ""))
    return " / ".join(lines[-3:]) or "no reason given"


def image_opts(image_type, filename=INSIDE_IMAGE):
    """--image-opts naming the file plainly: no protocol or json: parsing, no backing file."""
    opts = f"driver={DRIVERS[image_type]},file.driver=file,file.filename={filename}"
    return opts


def _image_file(path):
    return confine.File(os.path.abspath(path), IMAGE)


def run_confined(args, path, image_type, name=None, limits=INSPECT_LIMITS, timeout=INSPECT_TIMEOUT):
    """`qemu-img ARGS` confined to the image (seen as INSIDE_IMAGE); raises on failure."""
    name = name or path
    result = confine.run(["qemu-img", *args], [_image_file(path)], limits=limits, timeout=timeout)
    _raise_for(result, args, name, image_type)
    return result


def _raise_for(result, args, name, image_type):
    """A QemuImgError saying why a confined qemu-img failed, if it did."""
    if result.returncode:
        if result.limit_hit:
            raise DamagedImage(f"{name}: qemu-img {args[0]} was stopped: {result.limit_hit} "
                               f"(a hostile or broken {image_type} image?)")
        sig = confine.signal_of(result.returncode)
        if sig:
            raise DamagedImage(f"{name}: qemu-img {args[0]} was killed by signal {sig} "
                               f"(a hostile or broken {image_type} image?)")
        raise DamagedImage(f"{name}: not a readable {image_type} image: "
                           f"{qemu_message(result.stderr, name)}")


def _inspect(args, path, image_type, name=None):
    result = run_confined(args, path, image_type, name)
    try:
        return json.loads(result.stdout)
    except ValueError as exc:
        raise DamagedImage(f"{name or path}: qemu-img {args[0]} printed no JSON") from exc


# -- inspecting untrusted images -------------------------------------------------

OTHER_FILE = re.compile(r"Could not open '([^']*)'")


def check(path, image_type, name=None):
    """qemu-img info of an untrusted image as a dict, after refusing anything that
    references another file: a backing file, an external data file, an extent.

    qemu itself says what the image names.  In the sandbox, a name other than
    the image cannot be opened, so qemu either reports it (backing, data file,
    extents) or fails to open it: both are refused, naming the file.
    """
    return _answer("info", path, image_type, lambda: _check(os.path.abspath(path), image_type, name or path))


def _check(path, image_type, name):
    if image_type == "vhd" and _vhd_differencing(path):
        raise DamagedImage(f"{name}: it is a differencing VHD (it needs its parent), which is "
                           "not supported")
    args = ["info", "--output=json", "--image-opts", image_opts(image_type)]
    result = confine.run(["qemu-img", *args], [_image_file(path)], limits=INSPECT_LIMITS,
                         timeout=INSPECT_TIMEOUT)
    if result.returncode and "contains a log that needs to be replayed" in result.stderr:
        raise LogNeedsReplay(f"{name}: the {image_type} image has a log that needs to be replayed "
                             "(it was not shut down cleanly)")
    if result.returncode and not result.limit_hit and not confine.signal_of(result.returncode):
        for other in OTHER_FILE.findall(result.stderr):
            if "file.filename=" not in other and other != INSIDE_IMAGE:
                _refuse(name, image_type, "names the file", other)
    _raise_for(result, args, name, image_type)
    try:
        data = json.loads(result.stdout)
    except ValueError as exc:
        raise DamagedImage(f"{name}: qemu-img info printed no JSON") from exc
    backing = data.get("backing-filename") or data.get("full-backing-filename")
    if backing:
        _refuse(name, image_type, "has a backing file (a differencing disk):", backing)
    specific = (data.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file"):
        _refuse(name, image_type, "keeps its data in the external file", specific["data-file"])
    for extent in specific.get("extents") or []:
        if extent.get("filename") not in (None, INSIDE_IMAGE):
            _refuse(name, image_type, "has the extent", extent["filename"])
    if "virtual-size" not in data:
        raise DamagedImage(f"{name}: qemu-img reports no virtual size")
    return data


def _vhd_differencing(path):
    """qemu opens a differencing VHD as if it were whole (holes where the parent's
    data is) and does not say so: its footer's disk type (4) does."""
    with open(path, "rb") as f:
        head = f.read(512)
        f.seek(max(os.fstat(f.fileno()).st_size - 512, 0))
        footer = f.read(512)
    footer = footer if footer.startswith(b"conectix") else head
    return footer.startswith(b"conectix") and struct.unpack_from(">I", footer, 60)[0] == 4


def _refuse(name, image_type, what, other):
    other = other.replace(confine.INSIDE + "/", "")  # a relative name, as the image has it
    hint = (" (a multi-file VMDK: give its flat extent file as a raw image instead)"
            if image_type == "vmdk" and other.endswith("-flat.vmdk") else "")
    # repr: the name comes from the image (quoted, control characters escaped).
    raise DamagedImage(f"{name}: the {image_type} image {what} {other[:512]!r}; refusing to open "
                       f"any file but the image itself{hint}")


def replayed_copy(path, image_type, name, scratch_dir, record):
    """A copy of `path` in `scratch_dir` with its log replayed (`qemu-img check
    -r all`, confined to the copy); the user's file is never written.
    `record(action, **args)` journals the copy's removal before it exists."""
    if not scratch_dir:
        raise QemuImgError(f"{name}: the {image_type} image has a log that needs to be replayed, and "
                           "there is no scratch directory to replay it in (the input is never changed)")
    copy = os.path.join(scratch_dir, f"replayed-{os.getpid()}-{os.urandom(4).hex()}.{image_type}")
    record("remove", path=copy)
    try:
        tools.run(["cp", "--sparse=always", "--reflink=auto", path, copy])
    except tools.ToolError as exc:  # the host's problem (space, permissions), not the image's
        raise QemuImgError(f"{name}: cannot copy it to replay its log: "
                           f"{tools.tail(exc.stderr).replace(path, name) or exc}") from None
    replay = confine.run(["qemu-img", "check", "-q", "-r", "all", "--image-opts", image_opts(image_type)],
                         [confine.File(copy, IMAGE, write=True, created=True)],
                         limits=INSPECT_LIMITS, timeout=INSPECT_TIMEOUT)
    if replay.returncode not in (0, 3):  # 3: leaked clusters, which convert leaves behind
        raise DamagedImage(f"{name}: its {image_type} log cannot be replayed (on a copy): "
                           f"{replay.limit_hit or qemu_message(replay.stderr, name)}")
    return copy


def usable_image(path, image_type, name, scratch_dir, record):
    """(the file to read, qemu-img info) for an untrusted image: the image itself,
    or, for a VHDX with a log to replay, a replayed copy in `scratch_dir`."""
    try:
        return path, check(path, image_type, name)
    except LogNeedsReplay:
        copy = replayed_copy(path, image_type, name, scratch_dir, record)
        return copy, check(copy, image_type, name)


def info(path, image_type, name=None):
    """qemu-img info as a dict, after refusing anything that reaches outside the file."""
    return check(path, image_type, name)


def _map(path, image_type, name=None):
    return _answer("map", path, image_type, lambda: _inspect(
        ["map", "--output=json", "--image-opts", image_opts(image_type)], path, image_type, name))


def check_within_file(path, image_type, name=None):
    """Refuse an image whose tables point past the end of the file (a truncated copy):
    qemu would read zeros there and convert it without a word."""
    name = name or path
    if DRIVERS[image_type] == "raw":
        return
    size = os.path.getsize(path)
    for e in _map(path, image_type, name):
        if e.get("data") and "offset" in e and e["offset"] + e["length"] > size:
            raise DamagedImage(f"{name}: truncated {image_type} image: guest data at byte {e['start']} "
                               f"is stored at byte {e['offset']}, past the end of the file ({size} bytes)")


# Formats that store guest data uncompressed, byte for byte.
UNCOMPRESSED = ("vhd", "vhdx")


def data_bytes(path, image_type, block=1, name=None):
    """Bytes of guest data in the image (allocated, not known to be zero), counted in
    whole `block`-sized blocks as a format that allocates by blocks would store it."""
    extents = _map(path, image_type, name)
    blocks, last = 0, -1
    for e in extents:
        if not e.get("data") or e.get("zero"):
            continue
        first, end = e["start"] // block, (e["start"] + e["length"] - 1) // block
        first = max(first, last + 1)  # a block shared with the previous extent counts once
        if end >= first:
            blocks += end - first + 1
            last = end
    mapped = blocks * block
    if image_type in UNCOMPRESSED and any(e.get("data") and "offset" not in e for e in extents):
        # qemu cannot say where the data is (vhdx has no block status: its map is one
        # extent of data).  An uncompressed format cannot hold more non-zero guest
        # data than its file has allocated, and qemu-img writes no zero block: each
        # allocated 4 KiB of the file makes at most one block of output.
        stored = -(-os.stat(path).st_blocks * 512 // 4096)
        return min(mapped, stored * max(block, 4096))
    return mapped


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
            virtual=None, name=None):
    """Convert `source` into `dest` with qemu-img, calling progress(done, total) as it goes.

    size: grow the guest disk to this many bytes (zeros appended; never shrinks).
    target_opts: write into the existing file `dest` through these
    --target-image-opts, without the file (e.g. `driver=raw,offset=N,size=M`
    for a slice) instead of creating `dest`.
    qemu-img sees only the source (read-only) and `dest`.
    On failure or SIGTERM nothing is left at `dest` (unless it was given to write into).
    """
    source, dest = os.path.abspath(source), os.path.abspath(dest)
    name = name or source
    if virtual is None:
        virtual = info(source, source_type, name)["virtual-size"]
    total = max(virtual, size or 0)
    inside = f"{confine.INSIDE}/{OUTPUT}"
    argv = ["qemu-img", "convert", "-p", "--image-opts", image_opts(source_type)]
    if total > virtual:
        # A second source is appended to the first: zeros, which qemu-img does not write.
        argv.append(f"driver=null-co,read-zeroes=on,size={total - virtual}")
    if target_opts:
        argv += ["-n", "--target-image-opts", f"{target_opts},file.driver=file,file.filename={inside}"]
    else:
        argv += ["-O", DRIVERS[dest_type]]
        options = output_options(dest_type)
        if options:
            argv += ["-o", options]
        argv.append(inside)
    created = not target_opts
    if created:
        with open(dest, "wb"):
            pass  # the sandbox binds an existing file: qemu-img truncates and writes it
    files = [_image_file(source), confine.File(dest, OUTPUT, write=True, created=True)]
    _run_with_progress(argv, files, name, source_type, dest, created, total, progress)
    return total


def _run_with_progress(argv, files, name, source_type, dest, created, total, progress):
    previous = signal.signal(signal.SIGTERM, terminate)
    process = None
    try:
        with confine.Sandbox(argv, files, limits=CONVERT_LIMITS) as box:
            process = subprocess.Popen(box.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL, pass_fds=box.pass_fds)
            box.close()
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
            hit = confine.limit_hit(process.returncode, stderr, CONVERT_LIMITS)
            sig = confine.signal_of(process.returncode)
            reason = (hit or (f"killed by signal {sig}" if sig else None)
                      or qemu_message(stderr, name, {f"{confine.INSIDE}/{OUTPUT}": dest}))
            # Out of space is the host's problem (the runner says where); the rest, the image's.
            error = QemuImgError if "No space left on device" in stderr else DamagedImage
            raise error(f"{name}: cannot convert from {source_type} to {dest} "
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


def measure_qcow2(source, source_type, name=None):
    """qemu-img measure's required bytes for a qcow2 output."""
    data = _inspect(["measure", "--output=json", "-O", "qcow2", "--image-opts", image_opts(source_type)],
                    source, source_type, name)
    return int(data["required"])


def parse_size(text):
    """IMG_SIZE ('4G') -> bytes: config.parse_size, the rule the option was checked with."""
    try:
        return config.parse_size(text)
    except ValueError:
        raise QemuImgError(f"IMG_SIZE={text!r} is not a size (like 512M, 10G, or bytes)") from None


# The allocation unit of each output type (qcow2: measured by qemu-img).
DEST_BLOCKS = {"raw": 4096, "partition": 4096, "vmdk": 64 << 10, "vhd": 2 * MiB, "vhdx": 32 * MiB}


def required_bytes(source, source_type, dest_type, env=os.environ):
    """What converting `source` to `dest_type` writes, at most (the data, not the holes)."""
    try:
        virtual = info(source, source_type)["virtual-size"]
    except LogNeedsReplay:
        # qemu maps it only once replayed (on a copy in the scratch space: as large as
        # the file); the output then holds at most one block per allocated 4 KiB of it.
        stored = -(-os.stat(source).st_blocks * 512 // 4096) * 4096
        block = DEST_BLOCKS.get(dest_type, 4096)
        return stored + stored // 4096 * block + 8 * MiB
    if dest_type == "qcow2":
        return measure_qcow2(source, source_type)
    if dest_type in ("raw", "partition"):
        return data_bytes(source, source_type, 4096)
    if "fixed" in (output_options(dest_type, env) or ""):
        return virtual + 8 * MiB
    # Dynamic formats allocate whole blocks (grains), plus tables and headers.
    block = DEST_BLOCKS[dest_type]
    return min(data_bytes(source, source_type, block), virtual) + virtual // 4096 + 8 * MiB


# -- the convert.d hooks of the convert-qemu element --------------------------------
# Both hooks (to raw, from raw) are this code; their headers say which pairs they take.

def _content_matches(path, declared):
    from imaging_elements.engine import imagetype
    try:
        detected = imagetype.detect(path)
    except imagetype.ImageTypeError as exc:
        raise DamagedImage(str(exc)) from exc
    if declared in ("raw", "partition"):
        ok = detected in ("raw", "partition", "unknown")
    else:
        ok = detected == declared
    if not ok:
        raise DamagedImage(f"{path}: declared as {declared} but the content is {detected}")


def _keep_run_answers(hooklib, env):
    if env.get("IMG_SCRATCH_DIR") and env.get("IMG_JOURNAL"):  # run by the runner
        keep_answers(env["IMG_SCRATCH_DIR"], hooklib.journal().add)


def hook_run():
    from imaging_elements.sdk import hooklib
    env = os.environ
    _keep_run_answers(hooklib, env)  # what required-capacity asked, this need not ask again
    source, dest = env["IMG_IMAGE"], env["IMG_CONVERT_OUTPUT"]
    source_type, dest_type = env["IMG_SOURCE_TYPE"], env["IMG_DEST_TYPE"]
    name = source
    try:
        _content_matches(source, source_type)
        source, data = usable_image(source, source_type, name, env.get("IMG_SCRATCH_DIR"),
                                    hooklib.journal().add)
        if source != name:
            hooklib.warn(f"{name}: the {source_type} log was replayed on a copy in the scratch "
                         "directory (an unclean shutdown); the input is unchanged")
        virtual = data["virtual-size"]
        check_within_file(source, source_type, name)
        size = parse_size(env["IMG_SIZE"]) if env.get("IMG_SIZE") else None
        if size is not None and size < virtual:
            raise QemuImgError(f"IMG_SIZE={env['IMG_SIZE']} ({size} bytes) is smaller than the "
                               f"{virtual} bytes of {name}; disks are never shrunk")
        total = convert(source, source_type, dest, dest_type, size=size, progress=hooklib.progress,
                        virtual=virtual, name=name)
    except QemuImgError as exc:
        tools.report(exc)
    except Terminated:
        sys.exit(143)
    subformat = output_options(dest_type) or ""
    allocated = os.stat(dest).st_blocks * 512
    hooklib.describe(f"converted {source_type} to {dest_type}{' (' + subformat + ')' if subformat else ''}"
                     f" with qemu-img: {total} bytes virtual"
                     f"{f' (grown from {virtual})' if total > virtual else ''}, {allocated} bytes written")


def hook_required_capacity():
    from imaging_elements.sdk import hooklib
    env = os.environ
    _keep_run_answers(hooklib, env)  # for the run that follows
    # The runner asks every step of a chain before the first one runs: IMG_IMAGE is
    # then still the current image, of type IMG_IMAGE_TYPE, with the same guest data.
    source_type = env.get("IMG_IMAGE_TYPE") or env["IMG_SOURCE_TYPE"]
    try:
        return required_bytes(env["IMG_IMAGE"], source_type, env["IMG_DEST_TYPE"])
    except QemuImgError as exc:
        tools.report(exc)
