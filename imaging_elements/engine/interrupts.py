"""How an image process is stopped: by its caller's cancel event, or, in the
main thread, at once by SIGTERM/SIGINT (raised by api.ProcessGuard's handler),
except while resources are being released."""

import contextlib
import signal
import threading


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the ExitStack unwinds."""


class Cancelled(BaseException):
    """The caller's cancel event was set: unwind as for SIGTERM."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


# Exit code and message of a cancelled process, by the signal that caused it.
CANCEL_CODES = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated by SIGTERM"),
                None: (143, "cancelled")}

# What a process run in the main thread may be interrupted by: ProcessGuard's
# signal handler raises there (as SIGTERM always did), except while resources
# are being released.  Other threads see only their cancel event.
_main = {"running": 0, "deferred": 0}


def _in_main_thread():
    return threading.current_thread() is threading.main_thread()


def interrupt_main(signum):
    """Called by ProcessGuard's signal handler (main thread): raise into a run there."""
    if _main["running"] and not _main["deferred"]:
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def check(cancel):
    """A safe point: raise Cancelled if `cancel` (anything with is_set(), or None) is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(*CANCEL_CODES.get(getattr(cancel, "signum", None), CANCEL_CODES[None]))


@contextlib.contextmanager
def main_running():
    main = _in_main_thread()
    _main["running"] += main
    try:
        yield
    finally:
        _main["running"] -= main


@contextlib.contextmanager
def deferred():
    """While releasing resources, a Ctrl-C or SIGTERM must not stop us halfway."""
    main = _in_main_thread()
    _main["deferred"] += main
    try:
        yield
    finally:
        _main["deferred"] -= main
