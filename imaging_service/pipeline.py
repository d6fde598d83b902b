"""What one task does: fetch -> the toolkit -> store -> register.

`run_task(job)` runs in a worker thread (worker.py).  The toolkit runs in
its own child (imaging_service.runtask) in its own session, with nice and
ionice, so that a cancel, a hang or a crash of anything the image makes the
hooks do never reaches the service.  Progress: the fetch's bytes, then the
toolkit's own progress events, go to tasks.progress (BytesConverted,
Progress), which is also the heartbeat; a cancel is seen within a second.

Every failure's message names the step, the hook (when one failed) and the
reason.  What the toolkit runs is configuration: the element lists below.
"""

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import threading
import time

from imaging_service import fetch, tasks
from imaging_service.config import Setting
from imaging_service.objectstore import ObjectStoreError

log = logging.getLogger(__name__)

SETTINGS = [
    Setting("elements_linux", "list", "mounters validate-linux inspect convert-qemu",
            "elements a Linux import runs (mounters, the platform's validators, inspection, conversion)",
            metavar="LIST"),
    Setting("elements_windows", "list", "mounters validate-windows inspect convert-qemu",
            "elements a Windows import runs", metavar="LIST"),
    Setting("instance_validation", "bool", "true",
            "ImportImage and ImportInstance also boot the image (instance validators; a TCG boot "
            "takes 30 s or more)", metavar="BOOL"),
    Setting("instance_elements", "list", "instance-validate-linux",
            "elements added when instance validation is on", metavar="LIST"),
    Setting("export_elements", "list", "convert-qemu", "elements an ExportImage runs", metavar="LIST"),
    Setting("elements_path", "list", None,
            "directories searched for elements before the stock ones (the operator's own checks)",
            metavar="DIRS"),
    Setting("element_options", "list", None,
            "element options for every task, NAME=VALUE separated by spaces (as -e of euca-image-process)",
            metavar="LIST"),
    Setting("optional_validators", "list", None,
            "image validators (hook names, e.g. 50-linux-network) whose failure is only a warning "
            "in the task's StatusMessage", metavar="LIST"),
    Setting("hook_timeout", "duration", None, "most time one hook may run (default: the toolkit's "
            "per-phase limits)", metavar="TIME"),
    Setting("store_format", "str", "qcow2",
            "the format imported disks are kept in: qcow2 (no bytes for unallocated or zero clusters: "
            "most disks' free space costs nothing to store) or raw; ExportImage converts either",
            metavar="FORMAT"),
    Setting("cache", "bool", "true",
            "reuse the result of an earlier import of the same account with the same source digest "
            "and options", metavar="BOOL"),
]

# Progress (0-100) of each step, as ImportImage's Progress shows it.
PROGRESS = {"download": (0, 25), "validate": (25, 35), "convert": (35, 85), "instance-validate": (85, 92),
            "store": (92, 100)}
PHASE_STEP = {"unbundle": "validate", "mount": "validate", "validate": "validate", "install": "validate",
              "convert": "convert", "instance-validate": "instance-validate"}
STORE_FORMATS = ("qcow2", "raw")
RESOURCE_KINDS = {"import-image": ("image", "snapshot"), "import-snapshot": ("snapshot",),
                  "import-volume": ("volume",), "import-instance": ("volume",)}
# Toolkit input types for the formats a user may declare (EC2 names them in upper case).
INPUT_TYPES = {"raw": "raw", "vmdk": "vmdk", "vhd": "vhd", "vhdx": "vhdx", "qcow2": "qcow2"}
CHILD_TERM_GRACE = 3.0  # seconds between SIGTERM and SIGKILL of a cancelled toolkit child


class TaskFailed(Exception):
    """The task fails; the message names the step and the reason."""


class ValidationFailed(TaskFailed):
    """The toolkit failed: its events and result say which hooks."""

    def __init__(self, message, events, outcome):
        super().__init__(message)
        self.events, self.outcome = events, outcome


class TaskStopped(Exception):
    """The task was cancelled or taken over: stop quietly, release everything."""


@dataclasses.dataclass
class Job:
    """Everything run_task needs; made by worker.py for one claimed task."""

    db: object
    task: object
    worker_id: str
    settings: object           # the resolved service settings (attributes by name)
    store: object              # ObjectStore with the service's (operator's) keys
    user_store: object         # ObjectStore with the requesting user's keys, or None
    work_dir: str              # this task's own directory, removed by the worker afterwards
    allowed_endpoints: list
    scratch: object = None     # worker.Scratch: reservations of the worker's scratch space
    heartbeat: float = 2.0
    slots: object = None       # worker.Slots: the conversion slot is traded for a store slot at `store`
    shutdown: threading.Event = dataclasses.field(default_factory=threading.Event)  # the service stops
    step: str | None = None


def _setting(settings, name, default=None):
    value = getattr(settings, name, None)
    return default if value is None else value


def elements_for(task, settings, platform=None):
    """The toolkit elements of a task: configuration, per kind and platform (the task's,
    or the one the mounters found when the user named none)."""
    if task.kind == "export-image":
        return list(_setting(settings, "export_elements", ["convert-qemu"]))
    platform = (platform or task.params.get("platform") or "linux").lower()
    names = {"windows": "elements_windows"}.get(platform, "elements_linux")
    default = next(s.default for s in SETTINGS if s.name == names).split()
    elements = list(_setting(settings, names, default))
    if task.kind in ("import-image", "import-instance") and _setting(settings, "instance_validation", True) \
            and platform != "windows":
        elements += list(_setting(settings, "instance_elements", ["instance-validate-linux"]))
    return elements


def element_options(settings):
    options = {}
    for item in _setting(settings, "element_options", []):
        name, sep, value = item.partition("=")
        if not sep:
            raise TaskFailed(f"setting element_options: {item!r} is not NAME=VALUE")
        options[name] = value
    return options


def options_digest(task, settings):
    """What, besides the source, decides the result: the cache key's second half."""
    p = task.params
    platforms = ("linux", "windows") if (p.get("platform") or "auto") == "auto" else (p.get("platform"),)
    elements = [elements_for(task, settings, platform) for platform in platforms]
    key = {"kind": task.kind, "elements": elements, "options": element_options(settings),
           "format": p.get("format"), "platform": p.get("platform"), "architecture": p.get("architecture"),
           "elements_path": list(_setting(settings, "elements_path", [])),
           "optional_validators": sorted(_setting(settings, "optional_validators", []))}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class Reporter:
    """Task progress into the database, at most twice a second, and the cancel check."""

    def __init__(self, job):
        self.job = job
        self.step = None
        self.last = 0.0
        self.timeline = []  # (what, monotonic start): where a task's time goes (result["step_seconds"])

    def mark(self, what):
        if not self.timeline or self.timeline[-1][0] != what:
            self.timeline.append((what, time.monotonic()))

    def step_seconds(self):
        """Seconds spent in each step so far (a step entered twice counts both times)."""
        spent = {}
        ends = [t for _, t in self.timeline[1:]] + [time.monotonic()]
        for (what, start), end in zip(self.timeline, ends):
            spent[what] = round(spent.get(what, 0.0) + end - start, 3)
        return spent

    def __call__(self, step=None, fraction=None, done=None, total=None, message=None, force=False):
        if step is not None:
            self.step = self.job.step = step
            self.mark(step)
            force = True
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        progress = None
        if self.step in PROGRESS and fraction is not None:
            low, high = PROGRESS[self.step]
            progress = low + (high - low) * max(0.0, min(1.0, fraction))
        elif step in PROGRESS:
            progress = PROGRESS[step][0]
        if not tasks.progress(self.job.db, self.job.task.id, self.job.worker_id, step=step, progress=progress,
                              bytes_done=done, bytes_total=total, message=message):
            raise TaskStopped()

    def stopped(self):
        return self.job.shutdown.is_set() or tasks.cancel_requested(self.job.db, self.job.task.id)


def run_task(job):
    """Run one claimed task to its end state.  Raises nothing for a task's own failure."""
    report = Reporter(job)
    try:
        result, resources = (_export if job.task.kind == "export-image" else _import)(job, report)
    except TaskStopped:
        if job.shutdown.is_set():
            return "interrupted"  # the service stops: the task is retried once its heartbeat is stale
        tasks.finish_cancel(job.db, job.task.id, job.worker_id)
        return "cancelled"
    except TaskFailed as e:
        if job.shutdown.is_set():
            return "interrupted"
        if tasks.cancel_requested(job.db, job.task.id) and \
                tasks.finish_cancel(job.db, job.task.id, job.worker_id):
            return "cancelled"
        tasks.fail(job.db, job.task.id, job.worker_id, str(e))
        return "failed"
    if tasks.complete(job.db, job.task.id, job.worker_id, result, resources) is None:
        tasks.finish_cancel(job.db, job.task.id, job.worker_id)
        return "cancelled"
    return "completed"


def _fetch(job, report, source, store, need_factor=2):
    report("download", 0.0, force=True)
    report.mark("reserve")  # the source's size asked, scratch space reserved (or waited for)
    _reserve(job, report, source, store, need_factor)
    report.mark("download")
    check = _cancel_check(job, report)

    def progress(done, total):
        # BytesConverted counts converted bytes: a download moves Progress only.
        report(fraction=done / total if total else None, total=total)

    limit = job.scratch.capacity if job.scratch else None
    try:
        fetched = fetch.fetch(source, os.path.join(job.work_dir, "source.img"),
                              allowed_endpoints=job.allowed_endpoints, user_store=store, limit=limit,
                              progress=progress, cancelled=check)
        report(fraction=1.0, total=fetched.size, force=True)
        return fetched
    except fetch.Cancelled:
        raise TaskStopped() from None
    except fetch.FetchError as e:
        raise TaskFailed(f"download failed: {e}") from None


def _reserve(job, report, source, store, factor):
    """Hold this task's share of the worker's scratch space before the first byte:
    the source and the result (estimated as `factor` times the source)."""
    if not job.scratch:
        return
    try:
        size = fetch.source_size(source, job.allowed_endpoints, store)
    except fetch.FetchError as e:
        raise TaskFailed(f"download failed: {e}") from None
    need = size * factor
    if need > job.scratch.capacity:
        raise TaskFailed(f"download failed: the image needs about {need} bytes of scratch space "
                         f"({factor} x its {size} bytes) but the worker has {job.scratch.capacity} in all")
    check = _cancel_check(job, report)
    waited = False
    while not job.scratch.reserve(job.task.id, need):
        if not waited:
            report(message=f"waiting for {need} bytes of scratch space (other tasks hold it)", force=True)
            waited = True
        if check():
            raise TaskStopped()
        report()
        time.sleep(0.5)
    if waited:
        report(message="", force=True)


def _cancel_check(job, report):
    """A cancelled() for long loops: asks the database at most once a second."""
    state = {"at": 0.0}

    def cancelled():
        now = time.monotonic()
        if now - state["at"] < 1.0:
            return False
        state["at"] = now
        return report.stopped()
    return cancelled


def _import(job, report):
    task, settings = job.task, job.settings
    if task.params.get("format") not in INPUT_TYPES:
        raise TaskFailed(f"validate failed: format {task.params.get('format')!r} is not supported; "
                         f"one of {', '.join(t.upper() for t in INPUT_TYPES)}")
    fetched = _fetch(job, report, task.params["source"], job.user_store)
    declared = task.params["format"]
    if fetched.declared_format and fetched.declared_format != declared:
        raise TaskFailed(f"validate failed: the import manifest says {fetched.declared_format.upper()} "
                         f"but the request says {declared.upper()}")
    digest, options = fetched.sha256, options_digest(task, settings)
    if _setting(settings, "cache", True):
        cached = _from_cache(job, digest, options, fetched.size)
        if cached:
            return cached
    platform = (task.params.get("platform") or "auto").lower()
    if platform == "auto":
        platform = _detect_platform(job, report, fetched, INPUT_TYPES[declared])
    fmt = store_format(settings)
    output = os.path.join(job.work_dir, f"output.{fmt}")
    outcome = _convert(job, report, elements_for(task, settings, platform), fetched, INPUT_TYPES[declared],
                       output, fmt, platform)
    _begin_store(job, report)
    kinds = RESOURCE_KINDS[task.kind]
    first_id = tasks.new_id({"image": "ami", "snapshot": "snap", "volume": "vol"}[kinds[0]])
    bucket = _setting(settings, "service_bucket", "imaging-service")
    key = f"{task.account_id}/{first_id}.{fmt}"
    size = disk_size(output, fmt)
    _store(job, report, output, bucket, key, os.path.getsize(output))
    report.mark("register")
    inspection = outcome.get("inspection")
    platform = outcome.get("platform") or task.params.get("platform")
    architecture = (inspection or {}).get("arch") or task.params.get("architecture")
    resources = []
    for i, kind in enumerate(kinds):
        resources.append({"kind": kind, "bucket": bucket, "key": key, "size": size, "format": fmt,
                          "platform": platform, "architecture": architecture, "inspection": inspection,
                          "description": task.params.get("description"), "source_digest": digest,
                          "options_digest": options, **({"id": first_id} if i == 0 else {})})
    result = {"platform": platform, "architecture": architecture, "size": size, "format": fmt, "bucket": bucket,
              "key": key, "source_digest": digest, "validators": outcome.get("validators"),
              "phase_durations": outcome.get("phase_durations"), "step_seconds": report.step_seconds()}
    report(message=_user_text(job, _done_message(outcome)), force=True)
    return result, resources


def store_format(settings):
    fmt = (_setting(settings, "store_format", "qcow2") or "").lower()
    if fmt not in STORE_FORMATS:
        raise TaskFailed(f"store failed: the service's store_format {fmt!r} is not one of {', '.join(STORE_FORMATS)}")
    return fmt


def disk_size(path, fmt):
    """The size of the disk in `path` (our own output, not the user's file): a qcow2's virtual
    size is in its header (offset 24, big-endian), a raw disk's is its length."""
    if fmt == "raw":
        return os.path.getsize(path)
    with open(path, "rb") as f:
        magic, _version, _backing_offset, _backing_size, _cluster_bits, size = struct.unpack(">4sIQIIQ", f.read(32))
    if magic != b"QFI\xfb":
        raise TaskFailed(f"convert failed: the toolkit's output is not a qcow2 image (magic {magic!r})")
    return size


def _convert(job, report, elements, fetched, input_type, output, output_type, platform):
    """The toolkit's validation and conversion.  When the only validators that failed are ones
    the operator made optional, the toolkit runs again without the validate phase (the first
    run proved every other validator passes) and those failures become warnings."""
    optional = set(_setting(job.settings, "optional_validators", []))
    try:
        return _toolkit(job, report, elements, fetched.path, input_type, output, output_type, fetched, platform)
    except ValidationFailed as e:
        hooks = {hook for phase, hook, _ in e.events.failed_hooks}
        if not optional or not hooks <= optional or {p for p, _, _ in e.events.failed_hooks} != {"validate"}:
            raise
        first = e.outcome
    outcome = _toolkit(job, report, elements, fetched.path, input_type, output, output_type, fetched, platform,
                       name="toolkit-again", skip_phases=["validate"])
    for v in first.get("validators") or []:
        if v.get("hook") in optional and v.get("result") == "failed":
            v["result"] = "warning"
    outcome["validators"] = (first.get("validators") or []) + (outcome.get("validators") or [])
    outcome["inspection"] = outcome.get("inspection") or first.get("inspection")
    outcome["platform"] = outcome.get("platform") or first.get("platform")
    return outcome


def _detect_platform(job, report, fetched, input_type):
    """The user named no platform: the mounters alone say which it is (each platform's
    validators refuse the other's images, so they cannot all be run blind)."""
    outcome = _toolkit(job, report, ["mounters"], fetched.path, input_type, None, None, fetched, "auto",
                       name="toolkit-detect")
    platform = outcome.get("platform")
    if platform not in ("linux", "windows"):
        raise TaskFailed(f"validate failed: the mounters found no Linux or Windows system in the image "
                         f"(platform {platform or 'unknown'}); name the platform in the request")
    return platform


def _done_message(outcome):
    warnings = [v for v in outcome.get("validators") or [] if v.get("result") == "warning"]
    if not warnings:
        return "completed"
    return "completed with warnings: " + "; ".join(f"{v.get('hook')}: {v.get('reason')}" for v in warnings)


def _from_cache(job, digest, options, size):
    """The result of an earlier import of the same source and options, when its object is still there."""
    task = job.task
    kinds = RESOURCE_KINDS[task.kind]
    found = tasks.cached_resource(job.db, task.account_id, digest, options, kind=kinds[0])
    if found is None:
        return None
    try:
        if job.store.head(found.bucket, found.key) is None:
            return None
    except ObjectStoreError:
        return None
    resources = [{"kind": kind, "bucket": found.bucket, "key": found.key, "size": found.size,
                  "format": found.format, "platform": found.platform, "architecture": found.architecture,
                  "inspection": found.inspection, "description": task.params.get("description"),
                  "source_digest": digest, "options_digest": options} for kind in kinds]
    message = (f"completed from the cache: the same source (sha256 {digest[:16]}...) was imported with the "
               f"same options by task {found.task_id} ({found.id}); its result is reused")
    tasks.progress(job.db, task.id, job.worker_id, message=message)
    result = {"platform": found.platform, "architecture": found.architecture, "size": found.size,
              "format": found.format, "bucket": found.bucket, "key": found.key, "source_digest": digest,
              "cached_from": found.id}
    return result, resources


def _begin_store(job, report):
    """The store step: the task gives its conversion slot to the next task once it holds a
    store slot (it keeps heart-beating and seeing a cancel while it waits for one)."""
    if job.slots is not None:
        report.mark("store-wait")  # for a store slot
        check = _cancel_check(job, report)
        while not job.slots.take_store(timeout=0.5):
            if check():
                raise TaskStopped()
            report()
    report("store", 0.0, force=True)
    if job.slots is not None:
        job.slots.release_conversion()


def _store(job, report, path, bucket, key, size, store=None):
    store = store or job.store
    sent = {"n": 0}
    check = _cancel_check(job, report)

    def progress(n):
        sent["n"] += n
        report(fraction=sent["n"] / size if size else 1.0)
        if check():
            raise TaskStopped()
    try:
        if store is job.store:
            store.ensure_bucket(bucket)
        store.put_file(path, bucket, key, progress=progress)
    except ObjectStoreError as e:
        raise TaskFailed(f"store failed: {e}") from None


def _export(job, report):
    task = job.task
    p = task.params
    fetched = _fetch(job, report, p["source"], job.store)
    fmt = p["format"].lower()
    out_type = {"vmdk": "vmdk", "vhd": "vhd", "raw": "raw"}.get(fmt)
    if out_type is None:
        raise TaskFailed(f"convert failed: export format {fmt!r} is not supported (VMDK, VHD or RAW)")
    output = os.path.join(job.work_dir, f"export.{fmt}")
    # Images stored before store_format existed (and with store_format raw) are raw.
    source_type = INPUT_TYPES[p.get("source_format") or "raw"]
    _toolkit(job, report, elements_for(task, job.settings), fetched.path, source_type, output, out_type, fetched,
             "auto")
    _begin_store(job, report)
    key = f"{p.get('prefix') or ''}{task.id}.{fmt}"
    _store(job, report, output, p["bucket"], key, os.path.getsize(output), store=job.user_store)
    return {"bucket": p["bucket"], "key": key, "size": os.path.getsize(output)}, []


# ---- the toolkit child ----------------------------------------------------------------------------

def toolkit_command(settings):
    """The child's command line, with nice and ionice when the host has them."""
    argv = [sys.executable, "-m", "imaging_service.runtask"]
    nice = _setting(settings, "nice", 10)
    if shutil.which("ionice"):
        argv = ["ionice", "-c", "2", "-n", "7", *argv]
    if nice and shutil.which("nice"):
        argv = ["nice", "-n", str(nice), *argv]
    return argv


def _toolkit(job, report, elements, source, input_type, output, output_type, fetched, platform, name="toolkit",
             skip_phases=()):
    """Run the toolkit over the fetched image in a child; returns its result record.
    Each run has its own work directory `name` (a toolkit work directory is used once)."""
    settings = job.settings
    toolkit_work = os.path.join(job.work_dir, name)
    request = {"elements": elements, "input": source, "input_type": input_type, "output": output,
               "output_type": output_type, "platform": platform, "work_dir": toolkit_work,
               "elements_path": list(_setting(settings, "elements_path", [])) or None,
               "options": element_options(settings), "skip_phases": list(skip_phases)}
    if "inspect" in elements:
        # The report outlives the toolkit's work directory: the child reads it back.
        request["options"].setdefault("INSPECTION_REPORT", os.path.join(job.work_dir, "inspection.json"))
    if job.scratch and job.scratch.enforced:
        request["scratch_limit"] = job.scratch.capacity
    timeout = _setting(settings, "hook_timeout")
    if timeout is not None:
        request["hook_timeout"] = timeout.total_seconds() if hasattr(timeout, "total_seconds") else float(timeout)
    request_path = os.path.join(job.work_dir, f"{name}.request.json")
    result_path = os.path.join(job.work_dir, f"{name}.result.json")
    with open(request_path, "w") as f:
        json.dump(request, f)
    report("validate", 0.0, force=True)
    read_fd, write_fd = os.pipe()
    try:
        with open(os.path.join(job.work_dir, f"{name}.log"), "ab") as log:
            child = subprocess.Popen(
                [*toolkit_command(settings), request_path, result_path, str(write_fd)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_fd,), cwd=job.work_dir,
                env=_child_env(job.work_dir),
                preexec_fn=_child_setup)  # noqa: PLW1509 - setsid and prctl only
    finally:
        os.close(write_fd)
    try:
        events = _follow(job, report, child, read_fd, fetched)
    finally:
        os.close(read_fd)
        _stop_child(child)
    if not os.path.exists(result_path):
        _log_tail(job, os.path.join(job.work_dir, f"{name}.log"))
        cleanup_toolkit_dir(toolkit_work)
        how = f"was killed by signal {-child.returncode}" if child.returncode < 0 \
            else f"exited with {child.returncode} and no result"
        raise TaskFailed(f"{events.step or 'validate'} failed: the toolkit process {how}; "
                         f"its work directory was cleaned through its journal")
    with open(result_path) as f:
        outcome = json.load(f)
    if outcome.get("released"):
        # Nothing left to undo: no `--cleanup` process is needed for this directory.
        shutil.rmtree(toolkit_work, ignore_errors=True)
    if events.stopped:
        raise TaskStopped()
    if outcome["exit_code"] != 0:
        raise ValidationFailed(_user_text(job, _failure_message(events, outcome)), events, outcome)
    return outcome


def _log_tail(job, path):
    """The end of a toolkit child's own output, into the service log (not the user's message)."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4000))
        log.warning("task %s: the toolkit child ended without a result; its output ends:\n%s",
                    job.task.id, f.read().decode(errors="replace"))


def _child_env(work_dir):
    env = {"PATH": os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "/usr/bin:/bin")]),
           "LANG": "C.UTF-8", "TMPDIR": work_dir, "HOME": work_dir}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def _child_setup():
    os.setsid()
    # If the service dies (even by SIGKILL), the toolkit gets SIGTERM and unwinds.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class _Events:
    def __init__(self):
        self.step = None
        self.phase = None
        self.failed_hooks = []
        self.stopped = False
        self.killed = False
        self.kept = []  # what the task keeps (tasks.save_events): every event but progress


def _follow(job, report, child, read_fd, fetched):
    """Read the child's events until it exits; progress into the task; stop it on cancel."""
    events = _Events()
    selector = selectors.DefaultSelector()
    selector.register(read_fd, selectors.EVENT_READ)
    buffer = b""
    last_check = time.monotonic()
    term_sent = None
    eof = False
    while not eof or child.poll() is None:
        if not eof:
            for _ in selector.select(timeout=0.5):
                data = os.read(read_fd, 65536)
                if not data:
                    eof = True
                    break
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    _event(job, report, events, line, fetched)
        else:
            time.sleep(0.1)
        now = time.monotonic()
        if now - last_check >= 1.0:  # a cancel is seen within a second
            last_check = now
            if not events.stopped and report.stopped():
                events.stopped = True
        if now - report.last >= job.heartbeat:
            _report(report, events, force=True)  # the heartbeat, also while a hook says nothing
        if events.stopped and term_sent is None and child.poll() is None:
            # The toolkit's ProcessGuard turns SIGTERM into a cancel that releases everything.
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
            term_sent = now
        if term_sent is not None and now - term_sent > CHILD_TERM_GRACE and child.poll() is None:
            _stop_child(child)
    selector.close()
    try:
        tasks.save_events(job.db, job.task.id, [_user_event(job, e) for e in events.kept])
    except Exception:  # noqa: BLE001 - the log is for people; the task's outcome does not depend on it
        log.exception("task %s: could not keep its events", job.task.id)
    return events


def _user_event(job, event):
    """An event as its owner may read it: no host paths of the work directory."""
    return {k: _user_text(job, v) if isinstance(v, str) else v for k, v in event.items()}


def _event(job, report, events, line, fetched):
    try:
        e = json.loads(line)
    except ValueError:
        return
    if not isinstance(e, dict):
        return
    name = e.get("event")
    if name != "progress":
        events.kept.append(e)
        del events.kept[:-2 * tasks.MAX_EVENTS]  # bounded while it runs too
    if name == "phase-start" and e.get("phase") in PHASE_STEP:
        step = PHASE_STEP[e["phase"]]
        events.phase = e["phase"]
        if step != events.step:
            events.step = step
            _report(report, events, step=step, fraction=0.0)
    elif name == "progress" and e.get("total"):
        # In bytes of the user's image, whatever the hook counts in (virtual size, say).
        fraction = max(0.0, min(1.0, e["done"] / e["total"]))
        _report(report, events, fraction=fraction, done=int(fraction * fetched.size), total=fetched.size)
    elif name == "hook-end" and e.get("result") == "failed":
        events.failed_hooks.append((e.get("phase"), e.get("hook"), e.get("reason") or "no reason given"))


def _report(report, events, **kwargs):
    try:
        report(**kwargs)
    except TaskStopped:
        events.stopped = True


def source_name(source):
    """How a user knows their image: s3://bucket/key, the URL without its signature, the manifest."""
    if "bucket" in source:
        return f"s3://{source['bucket']}/{source['key']}"
    if "url" in source:
        return source["url"].split("?")[0]
    return "the image of the import manifest"


def _user_text(job, text):
    """A toolkit message as the user may see it: their image by its name, no host paths."""
    text = text.replace(os.path.join(job.work_dir, "source.img"), source_name(job.task.params.get("source", {})))
    return text.replace(job.work_dir + os.sep, "").replace(job.work_dir, "the task's work directory")


def _failure_message(events, outcome):
    step = events.step or "validate"
    error = outcome.get("error") or f"exit code {outcome['exit_code']}"
    if events.failed_hooks:
        hooks = "; ".join(f"hook {phase}/{hook}: {reason}" for phase, hook, reason in events.failed_hooks)
        return f"{step} failed: {hooks}"
    return f"{step} failed: {error}"


def _stop_child(child):
    """The child and its whole session gone: SIGKILL the group if it is still there."""
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)  # anything of the session left behind


def cleanup_task_dir(work_dir):
    """Release what killed toolkits left in a task's directory (their journals)."""
    if os.path.isdir(work_dir):
        for name in sorted(os.listdir(work_dir)):
            if name.startswith("toolkit") and os.path.isdir(os.path.join(work_dir, name)):
                cleanup_toolkit_dir(os.path.join(work_dir, name))


def cleanup_toolkit_dir(toolkit_work):
    """Release what a killed toolkit left (its journal), through the toolkit's own command."""
    if not os.path.isdir(toolkit_work):
        return
    command = os.path.join(sysconfig.get_path("scripts"), "euca-image-process")
    if not os.path.exists(command):
        command = shutil.which("euca-image-process") or "euca-image-process"
    subprocess.run([command, "--cleanup", toolkit_work], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False, timeout=300)
