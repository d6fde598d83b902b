"""State feedback: one small interface, a JSON-lines and a text implementation.

Events are flat dicts with an "event" name: process-start, process-end,
phase-start, phase-end, hook-start, hook-end, accepts, progress, warning, log
(docs/events.md has their schema).
"""

import json
import re
import sys
import time

# C0 and C1 controls (but tab), DEL, and the Unicode line separators and
# bidirectional overrides: shown as escapes, so that no text from a hook or
# an image can move a terminal's cursor or start a line of its own.  Compiled
# when first needed (re's cache): most processes never print such a character,
# and compiling this class costs about 0.3 ms.
_CONTROL = "[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"


def _escape(match):
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}"


def clean(text):
    """Text (from a hook or an image) safe for a terminal, a log line or an event:
    every control character shown as an escape.  Cleaning twice changes nothing."""
    if text.isprintable():  # holds none of them (all are unprintable): the common case
        return text
    return re.sub(_CONTROL, _escape, text)


def clean_lines(text):
    """Text of several lines for a terminal or a log: each line cleaned, and every line
    after the first indented, so that none can pass for a line of the log."""
    return "\n    ".join(clean(line) for line in text.split("\n"))


def _clean_value(value):
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, list):
        return [_clean_value(v) for v in value]
    return value


class Monitor:
    def event(self, name, **fields):
        raise NotImplementedError

    def close(self):
        pass


class JsonMonitor(Monitor):
    """One JSON object a line, flushed at once (for --status-fd / --status-file)."""

    def __init__(self, stream):
        self.stream = stream

    def event(self, name, **fields):
        # The runner cleans what hooks say; this is the last line of defence for the rest.
        record = {"time": round(time.time(), 3), "event": name,
                  **{key: _clean_value(value) for key, value in fields.items()}}
        self.stream.write(json.dumps(record, sort_keys=True) + "\n")
        self.stream.flush()

    def close(self):
        self.stream.close()


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class TextMonitor(Monitor):
    """A readable log with timestamps; progress bars (tqdm) on a terminal."""

    def __init__(self, stream=None, quiet=False, bars=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.bars = self.stream.isatty() if bars is None else bars
        self._bar = None
        self._last_progress = 0.0

    def _line(self, level, text):
        if self.quiet and level == "INFO":
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        line = f"{stamp} {level:<5} {clean_lines(text)}"
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def event(self, name, **f):
        if name == "progress":
            return self._progress(f)
        self._close_bar()
        if name == "process-start":
            self._line("INFO", f"elements: {' '.join(f['elements'])}")
        elif name == "phase-start":
            self._line("INFO", f"phase {f['phase']}: {f['hooks']} hook(s)")
        elif name == "hook-start":
            self._line("INFO", f"{f['phase']}/{f['hook']} ({f['element']}) start")
        elif name == "hook-end":
            level = {"ok": "INFO", "skipped": "INFO", "warning": "WARN"}.get(f["result"], "ERROR")
            text = f"{f['phase']}/{f['hook']} {f['result']} in {f['duration']:.3f} s"
            detail = f.get("reason") or f.get("description")
            self._line(level, text + (f": {detail}" if detail else ""))
        elif name == "accepts" and not f["accepted"]:
            self._line("INFO", f"{f['phase']}/{f['hook']} declines: {f['reason']}")
        elif name == "phase-end":
            self._line("INFO", f"phase {f['phase']} {f['result']} in {f['duration']:.3f} s")
        elif name == "process-end":
            level = "INFO" if f["exit_code"] == 0 else "ERROR"
            self._line(level, f"process {f['result']} (exit {f['exit_code']}) in {f['duration']:.1f} s"
                       + (f": {f['error']}" if f.get("error") else ""))
        elif name == "warning":
            self._line("WARN", f["message"])
        elif name == "log":
            self._line(f.get("level", "INFO"), f["message"])

    def _progress(self, f):
        done, total = f["done"], f["total"]
        if self.bars:
            if self._bar is None:
                from tqdm import tqdm  # only a terminal pays for the import
                self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                 desc=f"{f['phase']}/{f['hook']}", file=self.stream, leave=False)
            self._bar.total = total
            self._bar.update(done - self._bar.n)
        elif time.monotonic() - self._last_progress >= 5 or done >= total:
            self._last_progress = time.monotonic()
            self._line("INFO", f"{f['phase']}/{f['hook']}: {_size(done)} of {_size(total)}")

    def _close_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self):
        self._close_bar()


class Monitors(Monitor):
    def __init__(self, monitors):
        self.monitors = monitors

    def event(self, name, **fields):
        for monitor in self.monitors:
            monitor.event(name, **fields)

    def close(self):
        for monitor in self.monitors:
            monitor.close()
