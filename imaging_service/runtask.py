"""The toolkit child of a task: `python -m imaging_service.runtask REQUEST RESULT [EVENTS_FD]`.

The worker starts it in its own session (process group) with nice/ionice,
so that a hook that crashes, hangs or is killed never touches the service.
REQUEST is a JSON file of imaging_elements.api.ProcessRequest fields; the
events go to EVENTS_FD (default 3) as JSON lines (the worker turns them into task progress);
RESULT gets ProcessResult.to_json() plus the inspection report's content,
written atomically at the end.  SIGTERM (a cancel, or the service's death
through PR_SET_PDEATHSIG) makes the toolkit stop and release everything.
"""

import json
import os
import sys

from imaging_elements import api
from imaging_elements.engine.monitor import JsonMonitor


def main(argv=None):
    argv = argv or sys.argv[1:]
    request_path, result_path = argv[:2]
    events_fd = int(argv[2]) if len(argv) > 2 else 3
    with open(request_path) as f:
        request = api.ProcessRequest(**json.load(f))
    monitor = JsonMonitor(os.fdopen(events_fd, "w", buffering=1))
    with api.ProcessGuard() as guard:
        result = api.run_process(request, monitor, guard.cancel)
    monitor.close()
    record = result.to_json()
    record["inspection"] = None
    report = result.inspection_report or request.options.get("INSPECTION_REPORT")
    if report and os.path.isfile(report):
        try:
            with open(report) as f:
                record["inspection"] = json.load(f)
        except ValueError:
            record["inspection"] = None
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, result_path)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
