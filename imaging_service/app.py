"""The service process: its parts (database, credentials, object store,
workers) and the Starlette app (`POST /` the EC2 Query API, `GET /healthz`).
"""

import asyncio
import concurrent.futures
import functools
import logging
import os
import sys
import threading
import time
import traceback
import urllib.parse
import uuid

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from imaging_service import auth, ec2api, tasks
from imaging_service.credentials import Credentials
from imaging_service.db import Database
from imaging_service.errors import EC2Error, invalid, missing
from imaging_service.operations import HANDLERS, Context

log = logging.getLogger("imaging_service")
MAX_BODY = 1024 * 1024
MAINTENANCE_EVERY = 5.0
HEALTH_CACHE_SECONDS = 10.0
XML = "text/xml;charset=UTF-8"


def prepare_state_dir(path):
    """The state directory, made or narrowed to mode 0700 (it holds the key file)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


class Service:
    """Everything one `imaging-service serve` runs; start() and stop() bracket the server."""

    def __init__(self, settings, api_only=False):
        """api_only: one of the further API processes of --api-processes: it answers requests
        only (the first process migrated the database and runs the workers, the object
        store and the maintenance)."""
        self.settings = settings
        self.api_only = api_only
        prepare_state_dir(settings.state_dir)
        self.db = Database(settings.database_url)
        if not api_only:
            self.db.upgrade()
        self.credentials = Credentials(self.db, settings.key_file)
        self.store = self.seaweed = self.workers = self.dispatcher = None
        self._stop = threading.Event()
        self._maintenance = None
        self._identities = None
        self._health = (0.0, None)

    # ---- start and stop ------------------------------------------------------------------------

    def start(self, store_endpoint=None):
        """store_endpoint: an API-only process's object store (the first process's)."""
        if self.api_only:
            if store_endpoint:
                from imaging_service.objectstore import ObjectStore
                s = self.settings
                access, secret = ((s.s3_access_key, s.s3_secret_key) if s.s3_endpoint else self._operator_key())
                self.store = ObjectStore(store_endpoint, s.s3_region or s.region, access, secret)
            if self.settings.engine == "celery":
                from imaging_service.celery_engine import Dispatcher
                self.dispatcher = Dispatcher(self.settings)
            return  # new tasks reach the first process's workers by their poll (0.5 s)
        if self.settings.engine == "embedded":
            self._start_object_store()
            from imaging_service.worker import EmbeddedWorkers
            self.workers = EmbeddedWorkers(self.db, self.settings, self.store, credentials=self.credentials)
            self.workers.start()
        elif self.settings.engine == "celery":  # workers elsewhere; the store must be a shared one
            if not self.settings.s3_endpoint:
                raise ValueError("the celery engine needs --s3-endpoint (an object store every machine reaches)")
            self._start_object_store()
            from imaging_service.celery_engine import Dispatcher
            self.dispatcher = Dispatcher(self.settings)
        self._maintenance = threading.Thread(target=self._maintain, name="maintenance", daemon=True)
        self._maintenance.start()

    def _start_object_store(self):
        from imaging_service.objectstore import ObjectStore
        s = self.settings
        if s.s3_endpoint:
            self.store = ObjectStore(s.s3_endpoint, s.s3_region or s.region, s.s3_access_key, s.s3_secret_key)
            return
        # Embedded: SeaweedFS under the state directory; the service's own operator key pair
        # (made once) writes results; every user's key pair works there too.
        from imaging_service.seaweed import EmbeddedSeaweed
        access, secret = self._operator_key()
        self.seaweed = EmbeddedSeaweed(s.state_dir, port=s.s3_port or None)
        self._sync_identities()
        self.seaweed.start()
        self.store = ObjectStore(self.seaweed.endpoint_url, s.region, access, secret, put_file=self.seaweed.put_file)

    def _operator_key(self):
        for access, secret, _account, operator in self.credentials.identities():
            if operator:
                return access, secret
        access, secret, _ = self.credentials.create(name="imaging-service", operator=True)
        return access, secret

    def _sync_identities(self):
        """Keep the embedded store's identities equal to the live credentials (the
        `credentials` command changes them from another process)."""
        if self.seaweed is None:
            return
        identities = sorted(self.credentials.identities())
        if identities != self._identities:
            self.seaweed.write_identities(identities)
            self._identities = identities

    def _maintain(self):
        s = self.settings
        while not self._stop.wait(MAINTENANCE_EVERY):
            try:
                self._sync_identities()
                counts = tasks.expire(self.db, task_timeout=s.task_timeout, retention=s.retention)
                if any(counts.values()):
                    log.info("expired tasks: %s", counts)
            except Exception:  # keep maintaining; say why
                log.exception("maintenance failed")

    def stop(self):
        self._stop.set()
        if self.api_only:
            self.db.dispose()
            return
        if self._maintenance is not None:
            self._maintenance.join(timeout=30)
        try:
            if self.workers is not None:
                self.workers.stop()
        finally:
            if self.seaweed is not None:
                self.seaweed.stop()
            if self.dispatcher is not None:
                self.dispatcher.close()
            self.db.dispose()

    # ---- what the handlers ask -----------------------------------------------------------------

    def allowed_endpoints(self):
        if self.store is not None:
            return [self.store.endpoint_url]
        return [self.settings.s3_endpoint] if self.settings.s3_endpoint else []

    def record_integrity(self, access_key, source):
        """integrity.record() of a bucket source with the user's own keys; None when not knowable."""
        from imaging_service import integrity
        found = self.credentials.lookup(access_key)
        if self.store is None or found is None:
            return None
        try:
            return integrity.record(self.store.for_user(access_key, found[0]).client, source["bucket"],
                                    source["key"])
        except Exception:  # noqa: BLE001 - the store unreachable at submit: the fetch checks what it can
            return None

    def check_url(self, url, name):
        """Refuse at submit a URL the workers may not fetch (not the object store)."""
        from imaging_service.objectstore import url_allowed
        ok, reason = url_allowed(url, self.allowed_endpoints())
        if not ok:
            raise invalid(name, url, f"Only URLs on the service's object store are fetched: {reason}.")

    def require_toolkit(self):
        """New tasks only while the toolkit answers (describe and cancel still work)."""
        toolkit = self.health()["toolkit"]
        if toolkit != "ok":
            raise EC2Error("ServiceUnavailable", f"Imports are disabled: the imaging toolkit {toolkit}")

    def submitted(self, task_id=None):
        """A task was submitted (and committed): the embedded workers look at once; the
        celery engine publishes it to the broker."""
        if self.workers is not None:
            self.workers.wake()
        if self.dispatcher is not None and task_id is not None:
            self.dispatcher.submitted(task_id)

    def health(self):
        """{part: "ok" or the reason}, cached for a few seconds."""
        stamp, cached = self._health
        if cached is not None and time.monotonic() - stamp < HEALTH_CACHE_SECONDS:
            return cached
        checks = {"toolkit": _check(lambda: _toolkit(self.settings)), "database": _check(self._database)}
        checks["object_store"] = _check(self.store.ping) if self.store is not None else "not run here"
        if self.workers is not None:
            checks["workers"] = _check(self.workers.health)
        elif self.dispatcher is not None:
            checks["broker"] = _check(self.dispatcher.ping)
            try:
                checks["live_workers"] = self._live_workers()
                checks["workers"] = "ok" if checks["live_workers"] else "none live: tasks wait in the queue"
            except Exception as e:  # noqa: BLE001 -- the database check says why
                checks["workers"] = f"failed: {e}"
        else:
            checks["workers"] = "not run here"
        self._health = (time.monotonic(), checks)
        return checks

    def _live_workers(self):
        """The celery workers that announced themselves lately, with their load and scratch space."""
        from imaging_service.celery_engine import live_workers, seconds
        within = 3 * seconds(getattr(self.settings, "heartbeat", None), 2.0) + 5
        return [{"name": w["name"], "concurrency": w["concurrency"], "running": w["running"],
                 "scratch_capacity": w["scratch_capacity"], "scratch_free": w["scratch_free"],
                 "draining": bool(w["draining"]), "heartbeat_at": w["heartbeat_at"].isoformat()}
                for w in live_workers(self.db, within)]

    def _database(self):
        from sqlalchemy import text
        with self.db.session() as s:
            s.execute(text("SELECT 1"))


def serve_api(service, sockets, first=None):
    """Run the API on listening sockets until SIGTERM/SIGINT (uvicorn's own handlers), with
    uvloop and httptools and no access log.  first: the pid of the first process, for a
    further API process: it stops when that one is gone (even when killed)."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(make_app(service), loop="uvloop", http="httptools",
                                           log_level=service.settings.log_level, access_log=False,
                                           lifespan="off", timeout_keep_alive=75))
    if first is not None:
        def watch():
            while not server.should_exit:
                if os.getppid() != first:
                    server.should_exit = True
                time.sleep(0.5)
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    server.run(sockets=sockets)


def listen_socket(host, port, reuse_port):
    """The API's listening socket; with reuse_port, several processes bind the same port
    and the kernel spreads the connections over them (SO_REUSEPORT)."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def api_process(settings, port, store_endpoint, first):
    """A further API process (--api-processes): its own database connections and
    credentials, the same port (SO_REUSEPORT)."""
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s")
    os.umask(0o077)
    service = Service(settings, api_only=True)
    try:
        service.start(store_endpoint=store_endpoint)
        serve_api(service, [listen_socket(settings.listen, port, True)], first=first)
    finally:
        service.stop()


def _check(probe):
    try:
        result = probe()
    except Exception as e:  # noqa: BLE001 -- any failure is the answer to report
        return f"failed: {e}"
    return "ok" if result in (None, True) else str(result)


def _toolkit(settings):
    """The toolkit answers: its API imports and every element list the tasks run resolves
    on the configured elements path (a service without its toolkit must be disabled)."""
    from imaging_elements import api  # noqa: F401
    from imaging_elements.engine import elements
    library = elements.find_elements(":".join(settings.elements_path or []))
    for name in ("elements_linux", "elements_windows", "instance_elements", "export_elements"):
        elements.resolve(getattr(settings, name), library)


# ---- the HTTP side -----------------------------------------------------------------------------

def handle_query(service, method, url, headers, body, form):
    """One EC2 Query request: (status, XML bytes)."""
    request_id = str(uuid.uuid4())
    try:
        access_key, account = auth.verify(method, url, headers, body, service.credentials.lookup,
                                          service.settings.region)
        for name in auth.QUERY_AUTH:  # a presigned request's signature fields are not parameters
            form.pop(name, None)
        action = form.pop("Action", None)
        if action is None:
            raise missing("Action")
        version = form.pop("Version", None)
        if version is None:
            raise missing("Version")
        op = ec2api.operation(action, HANDLERS)
        params = ec2api.parse_request(op, form)
        result = HANDLERS[action](Context(service, account, access_key, request_id), params)
        return 200, ec2api.serialize_response(op, result, request_id)
    except EC2Error as e:
        return e.status, e.to_xml(request_id)
    except Exception:  # noqa: BLE001 -- a bug answers InternalError, logged, not a dropped connection
        log.error("request %s failed:\n%s", request_id, traceback.format_exc())
        return 500, EC2Error("InternalError", f"An internal error has occurred (request {request_id}).") \
            .to_xml(request_id)


def task_log_of(service, url, headers, task_id):
    """(status, JSON) of task_log: the caller's own task only (another's answers as none)."""
    from sqlalchemy import select

    from imaging_service import web
    from imaging_service.models import Resource
    try:
        _access_key, account = auth.verify("GET", url, headers, b"", service.credentials.lookup,
                                           service.settings.region)
    except EC2Error as e:
        return e.status, {"error": e.code, "message": e.message}
    task = tasks.get(service.db, account, task_id)
    if task is None:
        return 404, {"error": "InvalidTaskId", "message": f"The task {task_id} does not exist."}
    events = tasks.events_of(service.db, task_id)
    with service.db.session() as s:
        inspection = next((r.inspection for r in s.scalars(select(Resource).where(Resource.task_id == task_id))
                           if r.inspection), None)
    return 200, {"task": task_id, "state": task.state, "message": task.status_message or "",
                 "log": [list(line) for line in web.event_lines(events)], "events": events,
                 "inspection": inspection}


# Calls answered on the event loop itself: short reads by index (a thread hop and the
# threads' contention for Python's lock cost more than the call).  Everything else (imports
# read the object store, writes may wait for a lock) runs in the API threads.
ON_LOOP = frozenset(("DescribeConversionTasks", "DescribeImportImageTasks", "DescribeImportSnapshotTasks",
                     "DescribeExportImageTasks", "DescribeAccountAttributes"))


def make_app(service):
    # A few threads answer the requests (the handlers block on the database): with many
    # more, Python's one lock makes every request wait for all the others.
    executor = concurrent.futures.ThreadPoolExecutor(service.settings.api_threads, thread_name_prefix="api")

    async def in_thread(function, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(function, *args))

    async def respond(send, status, body, content_type=XML.encode(), extra=()):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                                *extra]})
        await send({"type": "http.response.body", "body": body})

    async def query(scope, receive, send):
        """`POST /` and `GET /?...`: the EC2 Query API, as a bare ASGI handler (the API's hot
        path: no routing, middleware or Request object)."""
        headers = scope["headers"]
        raw_query = scope.get("query_string", b"").decode("latin-1")
        method = scope["method"]
        if method == "GET" and not raw_query and any(k == b"accept" and b"text/html" in v for k, v in headers):
            return await respond(send, 303, b"", b"text/plain", [(b"location", b"/queue")])  # a browser
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:  # refused before the rest is read
                return await respond(send, 413, EC2Error("InvalidParameterValue",
                                                         "The request body is too large.").to_xml())
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        form = dict(urllib.parse.parse_qsl(raw_query, keep_blank_values=True))
        if method == "POST":
            try:
                form.update(urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True))
            except UnicodeDecodeError:
                return await respond(send, 400, EC2Error("InvalidParameterValue",
                                                         "The request body is not UTF-8.").to_xml())
        text_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        host = next((v for k, v in text_headers if k == "host"), "")
        url = f"{scope.get('scheme', 'http')}://{host}{scope['path']}" + (f"?{raw_query}" if raw_query else "")
        if form.get("Action") in ON_LOOP:
            status, xml = handle_query(service, method, url, text_headers, body, form)
        else:
            status, xml = await in_thread(handle_query, service, method, url, text_headers, body, form)
        await respond(send, status, xml)

    async def task_log(request):
        """GET /tasks/TASK/log.json, signed with SigV4 as the EC2 API: the task's kept toolkit
        events, as lines and raw, and its inspection report (`imaging logs TASK`)."""
        host = request.headers.get("host", "")
        url = f"{request.url.scheme}://{host}{request.scope['path']}"
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]]
        status, found = await in_thread(task_log_of, service, url, headers, request.path_params["task_id"])
        return JSONResponse(found, status_code=status, headers={"Cache-Control": "no-store"})

    async def healthz(request):
        checks = await in_thread(service.health)
        # A celery front-end answers with no worker alive (tasks wait): workers are reported, not required.
        advisory = ("live_workers", "workers") if service.dispatcher is not None else ()
        ok = all(v in ("ok", "not run here") for k, v in checks.items() if k not in advisory)
        return JSONResponse({"ok": ok, **checks}, status_code=200 if ok else 503)

    from imaging_service import web  # the queue page for people (issue 13)
    pages = Starlette(routes=[Route("/tasks/{task_id}/log.json", task_log, methods=["GET"]),
                              Route("/healthz", healthz, methods=["GET"]),
                              *web.routes(service)])

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] in ("GET", "POST"):
            return await query(scope, receive, send)
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] == "HEAD":
            async def headers_only(message):  # HEAD is GET without the body, as Starlette's routes answer it
                await send(dict(message, body=b"") if message["type"] == "http.response.body" else message)
            return await query(dict(scope, method="GET"), receive, headers_only)
        return await pages(scope, receive, send)
    return app
