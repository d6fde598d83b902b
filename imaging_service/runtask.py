"""The toolkit child of a task: `python -m imaging_service.runtask REQUEST RESULT`.

The worker starts it in its own session (process group) with nice/ionice,
so that a hook that crashes, hangs or is killed never touches the service.
REQUEST is a JSON file of imaging_elements.api.ProcessRequest fields; the
events go to fd 3 as JSON lines (the worker turns them into task progress);
RESULT gets ProcessResult.to_json() plus the inspection report's content,
written atomically at the end.  SIGTERM (a cancel, or the service's death
through PR_SET_PDEATHSIG) makes the toolkit stop and release everything.
"""

import json
import os
import sys

from imaging_elements import api
from imaging_elements.monitor import JsonMonitor

EVENTS_FD = 3


def main(argv=None):
    request_path, result_path = (argv or sys.argv[1:])[:2]
    with open(request_path) as f:
        request = api.ProcessRequest(**json.load(f))
    monitor = JsonMonitor(os.fdopen(EVENTS_FD, "w", buffering=1))
    with api.ProcessGuard() as guard:
        result = api.run_process(request, monitor, guard.cancel)
    monitor.close()
    record = result.to_json()
    record["inspection"] = None
    if result.inspection_report and os.path.isfile(result.inspection_report):
        try:
            with open(result.inspection_report) as f:
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
