"""euca-image-process: run elements' hooks over an image (see docs/cli.md)."""

import os
import sys
import time

from imaging_elements.engine import config
from imaging_elements.engine.monitor import (
    JsonMonitor,
    Monitors,
    TextMonitor,
    clean,
    clean_lines,
)


def _monitors(args):
    """The monitors the options ask for; UsageError naming the option that cannot be opened."""
    monitors = [TextMonitor(sys.stderr, quiet=args.quiet)]
    try:
        option = "--log-file"
        if args.log_file:
            monitors.append(TextMonitor(open(args.log_file, "a"), bars=False))  # noqa: SIM115 (closed by main)
        option = "--status-fd"
        if args.status_fd:
            monitors.append(JsonMonitor(os.fdopen(int(args.status_fd), "w", closefd=False)))
        option = "--status-file"
        if args.status_file:
            monitors.append(JsonMonitor(open(args.status_file, "w")))  # noqa: SIM115 (closed by main)
    except (OSError, ValueError) as exc:
        for monitor in monitors:
            monitor.close()
        value = getattr(args, option[2:].replace("-", "_"))
        raise UsageError(f"{option} {value}: {getattr(exc, 'strerror', None) or exc}") from None
    return Monitors(monitors)


class UsageError(Exception):
    pass


def _split(text):
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def request_from_args(args):
    """The command line's options as an api.ProcessRequest; UsageError names a bad option."""
    from imaging_elements import api
    if args.result_json:
        directory = os.path.dirname(os.path.abspath(args.result_json))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
            raise UsageError(f"--result-json {args.result_json}: {directory} is not a writable directory")
    scratch_limit = hook_timeout = None
    if args.scratch_limit:
        try:
            scratch_limit = config.parse_size(args.scratch_limit)
        except ValueError as exc:
            raise UsageError(f"--scratch-limit: {exc}") from None
    if args.hook_timeout:
        try:
            hook_timeout = float(args.hook_timeout)
        except ValueError:
            hook_timeout = 0
        if not 0 < hook_timeout < float("inf"):
            raise UsageError(f"--hook-timeout: {args.hook_timeout!r} is not a positive number of seconds")
    options = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"-e {item!r}: use NAME=VALUE")
        options[name] = value
    return api.ProcessRequest(
        elements=list(args.elements), input=args.input, input_type=args.input_type,
        output=args.output, output_type=args.output_type, output_crypt=args.output_crypt,
        platform=args.platform,
        elements_path=args.elements_path.split(":") if args.elements_path else None,
        work_dir=args.work_dir, keep_work_dir=args.keep_work_dir, scratch_limit=scratch_limit,
        hook_timeout=hook_timeout, sandbox_limits=list(args.sandbox_limits or ()),
        breaks=_split(args.breaks),
        phases=_split(args.phases) if args.phases else None, skip_phases=_split(args.skip_phases),
        options=options, size=args.size, kernel=args.kernel, ramdisk=args.ramdisk)


def write_json(path, data):
    """Atomically: a reader sees the old file or the whole new one."""
    import json
    import tempfile  # here: only --result-json needs it, not every process's start-up
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None):
    started = time.monotonic()
    args = config.parse(sys.argv[1:] if argv is None else argv)
    # Imported after parsing so that --help stays fast.
    from imaging_elements import api
    from imaging_elements.engine import workdir
    try:
        monitor = _monitors(args)
    except UsageError as exc:
        print(f"euca-image-process: error: {clean(str(exc))}", file=sys.stderr)
        return 2

    def warn(message):
        monitor.event("warning", message=message)

    result = None
    try:
        with api.ProcessGuard() as guard:
            try:
                if args.cleanup:
                    code, error = workdir.cleanup_work_dir(
                        os.path.abspath(args.cleanup), warn,
                        lambda text: monitor.event("log", level="INFO", message=text))
                else:
                    request = request_from_args(args)
                    result = api.run_process(request, monitor, guard.cancel, only_hook=args.only_hook,
                                             list_out=sys.stdout if args.list else None)
                    code, error = result.exit_code, result.error
            except UsageError as exc:
                code, error = 2, str(exc)
            if result is None:  # the engine did not run: end the stream here
                monitor.event("process-end", result="ok" if code == 0 else "failed", exit_code=code,
                              error=error, duration=round(time.monotonic() - started, 3))
                result = api.ProcessResult(exit_code=code, error=error)
            if args.result_json:
                try:
                    write_json(args.result_json, result.to_json())
                except OSError as exc:
                    code = code or 1
                    error = error or f"--result-json {args.result_json}: {exc.strerror}"
    finally:
        monitor.close()
    if error:
        print(f"euca-image-process: error: {clean_lines(error)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
