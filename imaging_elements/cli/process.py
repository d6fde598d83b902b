"""euca-image-process: run elements' hooks over an image (see docs/cli.md)."""

import os
import sys
import time

from imaging_elements import config
from imaging_elements.monitor import JsonMonitor, Monitors, TextMonitor


def _monitors(args):
    monitors = [TextMonitor(sys.stderr, quiet=args.quiet)]
    if args.log_file:
        monitors.append(TextMonitor(open(args.log_file, "a"), bars=False))
    if args.status_fd:
        monitors.append(JsonMonitor(os.fdopen(int(args.status_fd), "w", closefd=False)))
    if args.status_file:
        monitors.append(JsonMonitor(open(args.status_file, "w")))
    return Monitors(monitors)


def main(argv=None):
    started = time.monotonic()
    args = config.parse(sys.argv[1:] if argv is None else argv)
    # Imported after parsing so that --help stays fast.
    from imaging_elements import runner
    monitor = _monitors(args)
    warn = lambda message: monitor.event("warning", message=message)
    try:
        if args.cleanup:
            code, error = runner.cleanup_work_dir(os.path.abspath(args.cleanup), warn)
        elif not args.elements:
            code, error = 2, "no elements given (see element-info for the list)"
        else:
            try:
                process = runner.Process(args, monitor)
            except runner.ProcessFailure as failure:
                code, error = failure.code, str(failure)
            else:
                code, error = process.run()
                if process.results:
                    summary = {r: sum(1 for x in process.results if x["result"] == r)
                               for r in ("ok", "skipped", "warning", "failed")}
                    monitor.event("log", level="INFO",
                                  message="validators: {ok} passed, {warning} warnings, {failed} failed, "
                                          "{skipped} not applicable"
                                  .format(**summary))
        monitor.event("process-end", result="ok" if code == 0 else "failed", exit_code=code,
                      error=error, duration=round(time.monotonic() - started, 3))
    finally:
        monitor.close()
    if error:
        print(f"euca-image-process: error: {error}", file=sys.stderr)
    return code



if __name__ == "__main__":
    sys.exit(main())
