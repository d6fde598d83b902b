"""The drivers' entry points (console scripts and bin/).

Each runs its command's main() and then leaves at once with os._exit, after
flushing stdout and stderr: the interpreter's own shutdown (tearing down
every module and object) is work nobody needs once the command has closed
its files, and it is part of the fixed cost of every hook-heavy run.  It is
safe because the drivers start only daemon threads, register nothing with
atexit and close their own files.  An exception, including SystemExit from
argparse, leaves the ordinary way.
"""

import os
import sys


def _run(main):
    try:
        code = main()
    except BrokenPipeError:  # `element-info | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        os._exit(1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # a reader that went away: what the normal exit would say
        code = code or 1
    os._exit(code or 0)


def run_process():
    from imaging_elements.cli.process import main
    _run(main)


def run_element_info():
    from imaging_elements.cli.element_info import main
    _run(main)


def run_bundle_image():
    from imaging_elements.cli.bundle_image import main
    _run(main)


def run_unbundle():
    from imaging_elements.cli.unbundle import main
    _run(main)
