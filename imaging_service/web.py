"""The queue view for people: sign-in, the queue, a task's page, its live
progress (JSON polling), download of its result and cancel.

Pages are server-rendered Jinja2 and readable with JavaScript off; one small
static script refreshes them.  The session is a cookie signed with HMAC-SHA256
under a key derived from the service's key file (HttpOnly, SameSite=Strict,
Secure when `web_secure_cookie` is set); every state change is a POST that
carries the session's CSRF token.  A user sees only their own tasks (another
account's task answers 404 exactly as one that does not exist); an operator
sees every task and the workers.
"""

import base64
import datetime
import hashlib
import hmac
import json
import os
import secrets
import time
import urllib.parse

from sqlalchemy import select
from sqlalchemy.orm import undefer
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from imaging_service import tasks
from imaging_service.config import Setting
from imaging_service.credentials import load_or_make_key
from imaging_service.errors import EC2Error
from imaging_service.models import Resource, Task, utcnow

SETTINGS = [
    Setting("web_secure_cookie", "bool", "false",
            "mark the queue page's session cookie Secure (set it when the service is behind HTTPS)",
            metavar="BOOL"),
    Setting("web_session_hours", "int", 12, "how long a sign-in on the queue page lasts", metavar="HOURS"),
]

COOKIE = "imaging_session"
HERE = os.path.dirname(os.path.abspath(__file__))
QUEUE_LIMIT = 200
DOWNLOAD_SECONDS = 600
STATE_WORDS = {"waiting-upload": "waiting for upload", "pending": "queued", "converting": "converting",
               "completed": "completed", "cancelling": "cancelling", "cancelled": "cancelled", "failed": "failed"}
KIND_WORDS = {"import-image": "image import", "import-snapshot": "snapshot import", "import-volume": "volume import",
              "import-instance": "instance import", "export-image": "image export"}


# ---- the signed session ----------------------------------------------------------------------------

class Sessions:
    """Cookie values `payload.signature`: payload is base64 JSON {access_key, account, operator,
    csrf, expires}; the signature an HMAC-SHA256 under a key derived from the key file (so a
    new key file signs everyone out)."""

    def __init__(self, key_file, hours=12):
        self.key = hmac.new(load_or_make_key(key_file), b"imaging-service web session", hashlib.sha256).digest()
        self.seconds = hours * 3600

    def make(self, access_key, account_id, operator):
        return self._pack({"kind": "session", "access_key": access_key, "account": account_id,
                           "operator": bool(operator), "csrf": secrets.token_urlsafe(24),
                           "expires": int(time.time()) + self.seconds})

    def make_token(self, access_key, hours=1):
        """A sign-in token for the page (`imaging-service credentials token ACCESS_KEY`): the operator hands
        it to a user instead of the secret; it signs in as that access key until it expires."""
        return self._pack({"kind": "login", "access_key": access_key, "nonce": secrets.token_urlsafe(8),
                           "expires": int(time.time() + hours * 3600)})

    def read(self, value, kind="session"):
        """The payload of a valid, unexpired value of this kind (a token is no cookie), else None."""
        raw, _, signature = (value or "").strip().partition(".")
        if not raw or not hmac.compare_digest(self._sign(raw), signature):
            return None
        try:
            payload = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        except ValueError:
            return None
        if not isinstance(payload, dict) or payload.get("kind") != kind or payload.get("expires", 0) < time.time():
            return None
        return payload

    def _pack(self, payload):
        raw = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")
        return f"{raw}.{self._sign(raw)}"

    def _sign(self, raw):
        return base64.urlsafe_b64encode(hmac.new(self.key, raw.encode(), hashlib.sha256).digest()).decode().rstrip("=")


# ---- what the pages show -------------------------------------------------------------------------------

def _age(when, now):
    if when is None:
        return ""
    seconds = max(0, int((now - when).total_seconds()))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min ago"
    return f"{seconds // 86400} d ago"


def _duration(seconds):
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def human_bytes(n):
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _source(params):
    source = (params or {}).get("source") or {}
    if "bucket" in source:
        return f"s3://{source['bucket']}/{source.get('key', '')}"
    if "url" in source:
        return source["url"].split("?")[0]
    if "manifest_url" in source:
        return source["manifest_url"].split("?")[0]
    return ""


def task_view(task, now=None):
    """A task as the pages and /events show it (plain JSON values)."""
    now = now or utcnow()
    state = task.state
    active = state in tasks.ACTIVE
    eta = None
    if state == "converting" and task.started_at and task.progress and 0 < task.progress < 100:
        elapsed = (now - task.started_at).total_seconds()
        eta = _duration(elapsed * (100 - task.progress) / task.progress)
    step = task.step if state in ("converting", "cancelling") else None
    if state == "failed":
        # The pipeline's messages start with the failing step ("convert failed: ...").
        step = (task.status_message or "").partition(" failed:")[0] if " failed:" in (task.status_message or "") \
            else task.step
    result = task.result or {}
    return {
        "id": task.id, "kind": task.kind, "kind_words": KIND_WORDS.get(task.kind, task.kind),
        "account": task.account_id, "state": state, "state_words": STATE_WORDS.get(state, state),
        "active": active, "step": step, "progress": int(task.progress or 0),
        "bytes_done": task.bytes_done or 0, "bytes_total": task.bytes_total,
        "bytes_words": (f"{human_bytes(task.bytes_done or 0)} of {human_bytes(task.bytes_total)}"
                        if task.bytes_total else ""),
        "message": task.status_message or "", "source": _source(task.params),
        "format": ((task.params or {}).get("format") or "").upper(),
        "platform": (task.params or {}).get("platform") or result.get("platform") or "",
        "description": (task.params or {}).get("description") or "",
        "created": task.created_at.strftime("%Y-%m-%d %H:%M:%S UTC") if task.created_at else "",
        "created_age": _age(task.created_at, now),
        "heartbeat_age": _age(task.heartbeat_at, now) if active else "",
        "finished_age": _age(task.finished_at, now),
        "duration": _duration(((task.finished_at or now) - task.started_at).total_seconds())
        if task.started_at else "",
        "eta": eta or "", "worker": task.worker_id or "", "attempts": task.attempts or 0,
        "result": result, "downloadable": state == "completed" and bool(result.get("bucket") and result.get("key")),
        "cancellable": state in ("waiting-upload", "pending", "converting"),
    }


HOOK_LEVEL = {"ok": "ok", "warning": "warning", "failed": "error", "skipped": "info"}


def _event_time(value):
    if isinstance(value, (int, float)):
        return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%H:%M:%S")
    if isinstance(value, str) and "T" in value:
        return value.split("T", 1)[1][:8]
    return ""


def event_lines(events):
    """The toolkit's kept events of a task (tasks.save_events) as (when, what, detail, level) lines:
    every hook with its result and duration, the phases, warnings and logged warnings/errors."""
    lines = []
    for e in events or []:
        name, when = e.get("event"), _event_time(e.get("time"))
        if name == "hook-end":
            result, detail = str(e.get("result", "?")), e.get("reason") or e.get("description") or ""
            duration = e.get("duration")
            took = f" in {duration:.1f} s" if isinstance(duration, (int, float)) else ""
            lines.append((when, f"hook {e.get('phase', '?')}/{e.get('hook', '?')}",
                          f"{result}{took}" + (f": {detail}" if detail else ""), HOOK_LEVEL.get(result, "info")))
        elif name == "phase-end":
            duration = e.get("duration")
            took = f", {duration:.1f} s" if isinstance(duration, (int, float)) else ""
            lines.append((when, f"phase {e.get('phase', '?')}", f"{e.get('result', '?')}{took}",
                          "error" if e.get("result") == "failed" else "info"))
        elif name == "warning":
            lines.append((when, "warning", str(e.get("message", "")), "warning"))
        elif name == "log" and str(e.get("level", "")).upper() in ("WARN", "ERROR"):
            lines.append((when, "log", str(e.get("message", "")),
                          "error" if str(e.get("level")).upper() == "ERROR" else "warning"))
        elif name == "process-end":
            lines.append((when, "toolkit", f"{e.get('result', '?')} (exit code {e.get('exit_code', '?')})"
                          + (f": {e['error']}" if e.get("error") else ""),
                          "ok" if e.get("result") == "ok" else "error"))
        elif name == "dropped":
            lines.append(("", "earlier events", f"{e.get('count', '?')} not kept (a task keeps its last 2,000, "
                                                "1 MiB)", "info"))
    return lines


def _log(task, resources, events=None):
    """The task's record as a list of (when, what, detail, level) lines: what the service keeps
    of a task (its timestamps, the toolkit's events, validators, phase times, inspection)."""
    lines = []
    fmt = "%H:%M:%S"
    lines.append((task.created_at.strftime(fmt), "submitted",
                  f"{KIND_WORDS.get(task.kind, task.kind)} of {_source(task.params) or 'an upload'}", "info"))
    if task.started_at:
        lines.append((task.started_at.strftime(fmt), "started",
                      f"on worker {task.worker_id or '?'} (attempt {task.attempts or 1})", "info"))
    lines += event_lines(events)
    result = task.result or {}
    # The phases' times, unless the kept events (which have them) are shown.
    for phase, seconds in ({} if events else result.get("phase_durations") or {}).items():
        lines.append(("", f"phase {phase}", f"{seconds:.1f} s" if isinstance(seconds, (int, float))
                      else str(seconds), "info"))
    for v in result.get("validators") or []:
        level = {"ok": "ok", "passed": "ok", "failed": "error", "warning": "warning"}.get(v.get("result"), "info")
        detail = v.get("reason") or v.get("description") or ""
        lines.append(("", f"validator {v.get('hook', '?')}", f"{v.get('result', '?')}"
                      + (f": {detail}" if detail else ""), level))
    if result.get("cached_from"):
        lines.append(("", "cache", f"result reused from {result['cached_from']}", "info"))
    for r in resources:
        lines.append((r.created_at.strftime(fmt) if r.created_at else "", f"registered {r.id}",
                      f"{r.kind}, {human_bytes(r.size)} {r.format}, {r.platform or ''} {r.architecture or ''}",
                      "ok"))
    if task.finished_at or task.state in tasks.TERMINAL:
        level = {"completed": "ok", "failed": "error"}.get(task.state, "warning")
        when = task.finished_at.strftime(fmt) if task.finished_at else ""
        lines.append((when, task.state, task.status_message or "", level))
    else:
        now = f"{STATE_WORDS.get(task.state, task.state)}" + (f", step {task.step}" if task.step else "") + \
            f", {int(task.progress or 0)}%" + (f": {task.status_message}" if task.status_message else "")
        lines.append((task.updated_at.strftime(fmt) if task.updated_at else "", "now", now, "info"))
    return lines


# ---- the routes -----------------------------------------------------------------------------------------

class Web:
    def __init__(self, service):
        self.service = service
        settings = service.settings
        self.sessions = Sessions(settings.key_file, int(getattr(settings, "web_session_hours", None) or 12))
        self.secure = bool(getattr(settings, "web_secure_cookie", False))
        self.templates = Jinja2Templates(directory=os.path.join(HERE, "templates"))
        self.templates.env.globals["human_bytes"] = human_bytes

    # -- sessions --

    def user(self, request):
        """The signed-in session (its key still live), or None."""
        session = self.sessions.read(request.cookies.get(COOKIE))
        if session is None or self.service.credentials.lookup(session["access_key"]) is None:
            return None
        return session

    def _login_redirect(self, request):
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    def page(self, request, name, session, status_code=200, **context):
        context.update(request=request, session=session)
        response = self.templates.TemplateResponse(request, name, context, status_code=status_code)
        response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; "
                                                       "style-src 'self' 'unsafe-inline'; "
                                                       "frame-ancestors 'none'; form-action 'self'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def login_form(self, request):
        return self.page(request, "login.html", None, next=_safe_next(request.query_params.get("next")))

    async def login(self, request):
        form = await _form(request)
        next_url = _safe_next(form.get("next"))
        if form.get("token"):
            token = self.sessions.read(form["token"], kind="login")
            found = self.service.credentials.lookup(token["access_key"]) if token else None
            if found is None:
                return self.page(request, "login.html", None, status_code=401, next=next_url,
                                 error="The sign-in token is not valid: expired, changed, or its key revoked.")
            access = token["access_key"]
        else:
            access = (form.get("access_key") or "").strip()
            secret = (form.get("secret_key") or "").strip()
            found = self.service.credentials.lookup(access) if access else None
            # Constant-time comparison, and the same answer for an unknown key and a wrong secret.
            expected = found[0] if found else secrets.token_urlsafe(30)
            if found is None or not hmac.compare_digest(expected.encode(), secret.encode()):
                return self.page(request, "login.html", None, status_code=401, next=next_url, access_key=access,
                                 error="The access key and secret key do not match an active credential.")
        account = found[1]
        response = RedirectResponse(next_url, status_code=303)
        response.set_cookie(COOKIE, self.sessions.make(access, account.id, account.is_operator),
                            max_age=self.sessions.seconds, httponly=True, samesite="strict", secure=self.secure,
                            path="/")
        return response

    async def logout(self, request):
        session = self.user(request)
        form = await _form(request)
        if session is not None and not hmac.compare_digest(session["csrf"], form.get("csrf") or ""):
            return Response("The form's CSRF token is not this session's.", status_code=403)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=self.secure)
        return response

    # -- reading --

    def _tasks(self, session, limit=QUEUE_LIMIT):
        stmt = select(Task)
        if not session["operator"]:
            stmt = stmt.where(Task.account_id == session["account"])
        stmt = stmt.order_by(Task.created_at.desc()).limit(limit)
        with self.service.db.session() as s:
            return list(s.scalars(stmt))

    def _task(self, session, task_id):
        """The task if this session may see it, else None (the same for another's and none)."""
        with self.service.db.session() as s:
            task = s.get(Task, task_id, options=[undefer(Task.events)])
            if task is None or (not session["operator"] and task.account_id != session["account"]):
                return None, []
            resources = list(s.scalars(select(Resource).where(Resource.task_id == task_id)))
        return task, resources

    def _workers(self):
        """The operator's view: this service's workers and every worker with a running task."""
        now = utcnow()
        rows = {}
        with self.service.db.session() as s:
            running = list(s.scalars(select(Task).where(Task.state.in_(("converting", "cancelling")))))
        for t in running:
            rows.setdefault(t.worker_id or "?", []).append(t)
        workers = self.service.workers
        local = None
        if workers is not None and workers.scratch is not None:
            local = {"threads": workers.count, "running": len(workers.running),
                     "scratch_held": workers.scratch.held, "scratch_capacity": workers.scratch.capacity,
                     "scratch_percent": int(100 * workers.scratch.held / workers.scratch.capacity)
                     if workers.scratch.capacity else 0,
                     "prefix": workers.id_prefix}
        listing = [{"id": wid, "tasks": [t.id for t in ts],
                    "heartbeat": _age(max((t.heartbeat_at for t in ts if t.heartbeat_at), default=None), now)}
                   for wid, ts in sorted(rows.items())]
        return local, listing

    def _split(self, session):
        now = utcnow()
        views = [task_view(t, now) for t in self._tasks(session)]
        return [v for v in views if v["active"]], [v for v in views if not v["active"]]

    async def queue(self, request):
        session = self.user(request)
        if session is None:
            return self._login_redirect(request)
        active, finished = await _thread(self._split, session)
        local, workers = await _thread(self._workers) if session["operator"] else (None, [])
        return self.page(request, "queue.html", session, active=active, finished=finished, local=local,
                         workers=workers)

    async def queue_events(self, request):
        session = self.user(request)
        if session is None:
            return JSONResponse({"error": "not signed in"}, status_code=401)
        active, finished = await _thread(self._split, session)
        return JSONResponse({"tasks": active + finished}, headers={"Cache-Control": "no-store"})

    async def task_page(self, request):
        session = self.user(request)
        if session is None:
            return self._login_redirect(request)
        task, resources = await _thread(self._task, session, request.path_params["task_id"])
        if task is None:
            return self.page(request, "missing.html", session, status_code=404,
                             task_id=request.path_params["task_id"])
        return self.page(request, "task.html", session, task=task_view(task), log=_log(task, resources, task.events),
                         inspection=next((r.inspection for r in resources if r.inspection), None),
                         resources=resources, cancelled=request.query_params.get("cancelled"))

    async def task_events(self, request):
        session = self.user(request)
        if session is None:
            return JSONResponse({"error": "not signed in"}, status_code=401)
        task, resources = await _thread(self._task, session, request.path_params["task_id"])
        if task is None:
            return JSONResponse({"error": "no such task"}, status_code=404)
        view = task_view(task)
        view["log"] = [list(line) for line in _log(task, resources, task.events)]
        return JSONResponse(view, headers={"Cache-Control": "no-store"})

    async def download(self, request):
        session = self.user(request)
        if session is None:
            return self._login_redirect(request)
        task, _ = await _thread(self._task, session, request.path_params["task_id"])
        if task is None:
            return self.page(request, "missing.html", session, status_code=404,
                             task_id=request.path_params["task_id"])
        view = task_view(task)
        if not view["downloadable"] or self.service.store is None:
            return Response(f"Task {task.id} has no result to download (it is {view['state_words']}).",
                            status_code=409, media_type="text/plain")
        url = self.service.store.presign("get_object", task.result["bucket"], task.result["key"],
                                         expires=DOWNLOAD_SECONDS)
        return RedirectResponse(url, status_code=303)

    # -- changing --

    async def cancel(self, request):
        session = self.user(request)
        if session is None:
            return self._login_redirect(request)
        form = await _form(request)
        if not hmac.compare_digest(session["csrf"], str(form.get("csrf") or "")):
            return Response("The form's CSRF token is not this session's: reload the page and try again.",
                            status_code=403, media_type="text/plain")
        task_id = request.path_params["task_id"]
        task, _ = await _thread(self._task, session, task_id)
        if task is None:
            return self.page(request, "missing.html", session, status_code=404, task_id=task_id)
        who = "the operator" if task.account_id != session["account"] else "the user"
        try:
            await _thread(tasks.cancel, self.service.db, task.account_id, task_id,
                          f"cancelled by {who} on the queue page")
        except EC2Error as e:
            return Response(e.message, status_code=409, media_type="text/plain")
        return RedirectResponse(f"/tasks/{task_id}?cancelled=1", status_code=303)

    def routes(self):
        return [
            Route("/queue", self.queue, methods=["GET"]),
            Route("/queue/events", self.queue_events, methods=["GET"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/tasks/{task_id}", self.task_page, methods=["GET"]),
            Route("/tasks/{task_id}/events", self.task_events, methods=["GET"]),
            Route("/tasks/{task_id}/download", self.download, methods=["GET"]),
            Route("/tasks/{task_id}/cancel", self.cancel, methods=["POST"]),
            Mount("/static", StaticFiles(directory=os.path.join(HERE, "static")), name="static"),
        ]


async def _form(request):
    """An urlencoded form body as {name: value} (small: the forms here have three fields)."""
    body = await request.body()
    if len(body) > 16384:
        return {}
    return dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _safe_next(value):
    """Only a path of this site (no //host, no scheme) after sign-in."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/queue"
    return value


async def _thread(function, *args):
    from starlette.concurrency import run_in_threadpool
    return await run_in_threadpool(function, *args)


def routes(service):
    """The queue page's routes, for app.make_app."""
    return Web(service).routes()
