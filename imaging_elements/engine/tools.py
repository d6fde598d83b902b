"""Calling system tools from library code, and saying whose fault a failure is.

* `run(argv, ...)`: one system tool (blkid, sfdisk, mkfs, losetup, hivexsh, ...)
  run through `sh`, with a timeout, output as text or bytes, and a `ToolError`
  naming the tool, its exit code and the end of its stderr.  A process that
  needs what `sh` does not give (passed file descriptors, its own process
  group, the bwrap sandbox) stays on subprocess: confine.py, sandbox.py,
  hookrun.py, runner.py, instance.py.
* `BadInput`: a marker for errors that are the input's fault (damaged,
  truncated, unreadable, hostile), not the host's; `bad_input(reason)` stops a
  hook with status `bad-input`, so the process exits 3 (docs/configuration.md).

docs/writing-elements.md ("Calling system tools from library code") has the rules.
"""

import json
import os
import sys

from imaging_elements import hooklib


class BadInput(Exception):
    """Mixed into an error class: the user's input is at fault (exit 3), not the host."""


def bad_input(reason):
    """In a hook: stop with status `bad-input` and this reason (the process exits 3).

    The twin of hooklib.fail for a damaged or unreadable input; the line goes to
    the status channel as hooklib's lines do (stderr without one), then the words.
    """
    line = json.dumps({"bad-input": str(reason)}) + "\n"
    fd = os.environ.get("IMG_STATUS_FD")
    try:
        if not fd:
            raise OSError
        os.write(int(fd), line.encode())
    except (OSError, ValueError):
        sys.stderr.write(line)
    print(str(reason), file=sys.stderr)
    sys.exit(1)


def mount_reason(text, device, target):
    """(reason, the host's fault?) of a failed mount(8): its words without our loop
    device and mount point (the user knows neither).  A kernel without the
    filesystem is the host's fault; a refused superblock, the image's."""
    reason = text[text.find("mount: "):] if "mount: " in text else text
    reason = (reason.splitlines() or [""])[0].replace(f"mount: {target}: ", "").replace(f" on {device}", "")
    reason = reason.replace(target, "the mount point").replace(device, "its loop device").strip()
    return reason, "unknown filesystem type" in reason


def report(exc):
    """In a hook: stop for `exc`, as bad input if it is marked so, else as a failure."""
    if isinstance(exc, BadInput):
        bad_input(exc)
    hooklib.fail(str(exc))
