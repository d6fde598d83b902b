"""The engine's public API: one image process as a request and a result.

    from imaging_elements import api
    result = api.run_process(api.ProcessRequest(elements=["mounters", "validate-linux"],
                                                input="disk.vmdk"))

See docs/api.md.  run_process may be called from any thread, several at once;
process-wide effects (signals, the subreaper) belong to ProcessGuard, which
the command line or a worker process enters in its main thread.
"""

import os
import signal
import threading

from imaging_elements.engine import interrupts, phase_handlers, runner


def _instance_handler(hooks, env, journal, emit):
    """instance-validate: boot the image, run the validators in the guest (instance.py)."""
    from imaging_elements.instance import instance  # boots qemu: loaded only when needed
    try:
        return instance.run_phase(hooks, env, journal, emit)
    except instance.InstanceError as exc:
        raise phase_handlers.HandlerError(str(exc)) from exc


# The stock phase handlers: class libraries plug into the engine here, never the other way.
phase_handlers.register("instance", _instance_handler)


class _Record:
    """A plain record: keyword (or positional, in order) arguments for the
    annotated fields, class values as defaults (lists and dicts copied), equality
    and repr.  Not a dataclass: importing dataclasses (with inspect) costs every
    process about 7 ms, a fifth of a one-hook run (benchmarks/runner.py)."""

    def __init_subclass__(cls):
        cls._fields = tuple(cls.__annotations__)

    def __init__(self, *args, **kwargs):
        name = type(self).__name__
        if len(args) > len(self._fields):
            raise TypeError(f"{name}() takes {len(self._fields)} positional arguments, {len(args)} given")
        for field, value in zip(self._fields, args):
            if field in kwargs:
                raise TypeError(f"{name}() got multiple values for argument {field!r}")
            kwargs[field] = value
        unknown = set(kwargs) - set(self._fields)
        if unknown:
            raise TypeError(f"{name}() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        for field in self._fields:
            if field in kwargs:
                value = kwargs[field]
            elif hasattr(type(self), field):
                value = getattr(type(self), field)
                value = type(value)(value) if isinstance(value, (list, dict)) else value
            else:
                raise TypeError(f"{name}() missing required argument: {field!r}")
            setattr(self, field, value)

    def __eq__(self, other):
        return type(other) is type(self) and self._as_tuple() == other._as_tuple()

    def _as_tuple(self):
        return tuple(getattr(self, f) for f in self._fields)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{f}={getattr(self, f)!r}' for f in self._fields)})"

    def to_json(self):
        """A dict of plain JSON values (docs/api.md), copied."""
        return {f: _copy(getattr(self, f)) for f in self._fields}


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


class ProcessRequest(_Record):
    """What to do; field names are those of euca-image-process's options."""

    elements: list[str]
    input: str | None = None
    input_type: str | None = None          # None: detected from the content
    output: str | None = None
    output_type: str | None = None         # None: the input's
    output_crypt: str | None = None        # None or "none": not encrypted
    platform: str = "auto"
    elements_path: list[str] | None = None  # None: the stock elements only
    work_dir: str | None = None            # None: a new one under $TMPDIR or /var/tmp, removed at the end
    keep_work_dir: bool = False
    scratch_limit: int | None = None       # bytes
    hook_timeout: float | None = None      # seconds per hook; None: the per-phase defaults
    sandbox_limits: list[str] = []  # ["memory=1G", ...]: sandbox.LIMITS
    breaks: list[str] = []
    phases: list[str] | None = None
    skip_phases: list[str] = []
    options: dict[str, str] = {}      # element options (-e NAME=VALUE)
    environment: dict[str, str] = {}  # extra IMG_* variables
    size: str | None = None
    kernel: str | None = None
    ramdisk: str | None = None


class ProcessResult(_Record):
    exit_code: int
    error: str | None = None
    disk_type: str | None = None
    platform: str | None = None
    output: str | None = None
    output_size: int | None = None
    validators: list[dict] = []
    inspection_report: str | None = None
    phase_durations: dict[str, float] = {}
    # Everything the process acquired was released (its journal holds nothing to undo): the
    # caller may simply delete a work directory it gave, without `--cleanup`.
    released: bool = False


def run_process(request, monitor=None, cancel=None, *, only_hook=None, list_out=None):
    """Run one image process; returns a ProcessResult, never raises for a failed process.

    monitor: receives the events (monitor.py, docs/events.md); the last one is
    always process-end.  cancel: anything with is_set() (a threading.Event):
    once set, the process stops at the next safe point (between hooks, within
    0.5 s while a hook runs) and releases everything, exit 143.
    only_hook, list_out: the command line's --hook and --list."""
    process = runner.Process(request, monitor, cancel, only_hook=only_hook, list_out=list_out)
    code, error = process.run()
    env = process.env
    output = process.published
    return ProcessResult(
        exit_code=code, error=error,
        disk_type=process.disk_type,
        platform=env.get("IMG_PLATFORM") or None,
        output=output,
        output_size=_size(output) if output else None,
        validators=list(process.results),
        inspection_report=process.inspection_report,
        phase_durations=dict(process.phase_durations),
        released=process.journal is None or not process.journal.pending())


def _size(path):
    """Bytes of a file, or of every file under a directory (a bundle)."""
    if not os.path.isdir(path):
        return os.stat(path).st_size
    return sum(os.lstat(os.path.join(d, name)).st_size for d, _, names in os.walk(path) for name in names)


_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37


def _prctl():
    """libc's prctl(2) as (prctl, int type, byref).  Made from _ctypes, the C half of
    ctypes, directly: ctypes/__init__.py builds some fifty types at import, none
    needed here, and that import was 1.3 ms, a twentieth of a 1-hook process
    (docs/packaging.md).  tests.test_api checks the flag is really set."""
    import _ctypes

    class Int(_ctypes._SimpleCData):
        _type_ = "i"

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = Int

    class Libc:  # what CFuncPtr looks a symbol up in: a dlopen handle (this process's)
        _handle = _ctypes.dlopen(None)

    return Function(("prctl", Libc())), Int, _ctypes.byref


def _subreaper(on=None):
    """The process's subreaper flag; sets it when `on` is given.  Returns the previous value."""
    prctl, Int, byref = _prctl()
    current = Int(0)
    prctl(_PR_GET_CHILD_SUBREAPER, byref(current), 0, 0, 0)
    if on is not None:
        prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    return bool(current.value)


class ProcessGuard:
    """The process-wide part of running image processes, entered in the main thread:

    - SIGTERM and SIGINT set `cancel` (with its `signum`); a process running
      in the main thread is also interrupted at once, as SIGTERM always did
      (not while it releases resources);
    - the process is a subreaper, so that daemons hooks leave behind (qemu-
      storage-daemon, ntfs-3g) are reaped when the journal kills them.

    Both are undone on exit."""

    def __init__(self, cancel=None):
        self.cancel = cancel if cancel is not None else threading.Event()

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("ProcessGuard: enter it in the main thread (signal handlers live there)")
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._was_subreaper = _subreaper(True)
        return self

    def _handle(self, signum, frame):
        self.cancel.signum = signum
        self.cancel.set()
        interrupts.interrupt_main(signum)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        _subreaper(self._was_subreaper)
        return False
