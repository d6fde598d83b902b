"""The task state machine (forward only) and its queries.

States: waiting-upload -> pending -> converting -> completed, with the step
of a converting task (download, validate, convert, instance-validate,
store); cancelling -> cancelled; failed.  The one step back, converting ->
pending, is a new attempt after the worker stopped heart-beating
(requeue_orphans).  Every change is a conditional UPDATE (or a row locked
with SELECT ... FOR UPDATE), so two workers or two front-ends never both
win.  Functions take the Database; `account` is an Account or its id.
"""

import base64
import datetime
import functools
import json
import secrets

from sqlalchemy import Integer, bindparam, delete, func, select, update
from sqlalchemy.exc import IntegrityError

from imaging_service.errors import EC2Error
from imaging_service.models import Resource, Task, utcnow

STATES = ("waiting-upload", "pending", "converting", "completed", "cancelling", "cancelled", "failed")
ACTIVE = ("waiting-upload", "pending", "converting", "cancelling")
TERMINAL = ("completed", "cancelled", "failed")
STEPS = ("download", "validate", "convert", "instance-validate", "store")
TRANSITIONS = {
    "waiting-upload": ("pending", "cancelled", "failed"),
    "pending": ("converting", "cancelled", "failed"),
    "converting": ("completed", "failed", "cancelling", "pending"),
    "cancelling": ("cancelled", "failed"),
}
KINDS = {
    "import-image": "import-ami",
    "import-snapshot": "import-snap",
    "import-volume": "import-vol",
    "import-instance": "import-i",
    "export-image": "export-ami",
}
RESOURCE_PREFIX = {"image": "ami", "snapshot": "snap", "volume": "vol"}

UPLOAD_EXPIRY = datetime.timedelta(days=7)
TASK_TIMEOUT = datetime.timedelta(minutes=180)
RETENTION = datetime.timedelta(days=7)


def new_id(prefix, legacy=False):
    """AWS-shaped ids: 17 hex digits (8 for the legacy conversion tasks)."""
    return f"{prefix}-{secrets.token_hex(4 if legacy else 9)[:8 if legacy else 17]}"


def _account_id(account):
    return account if isinstance(account, str) else account.id


def _can(old, new):
    return new in TRANSITIONS.get(old, ())


def _allowed_from(new):
    return tuple(old for old, targets in TRANSITIONS.items() if new in targets)


def submit(db, account, kind, params, client_token=None, *, wait_for_upload=False, max_active=None,
           upload_expiry=UPLOAD_EXPIRY):
    """A new task (or, for a ClientToken seen before with the same parameters, that task).

    wait_for_upload: the parts do not exist yet (the euca2ools flow); the
    task waits in waiting-upload until mark_uploaded or its expiry.
    """
    account_id = _account_id(account)
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}")
    params = json.loads(json.dumps(params))  # what the database will give back
    with db.session(write=True) as s:
        if client_token:
            found = _by_token(s, account_id, client_token)
            if found is not None:
                return _same_or_mismatch(found, kind, params)
        if max_active is not None:
            active = s.scalar(select(func.count()).select_from(Task).where(
                Task.account_id == account_id, Task.state.in_(ACTIVE)))
            if active >= max_active:
                raise EC2Error("ResourceLimitExceeded",
                               f"You have {active} active tasks; the limit is {max_active}. "
                               "Wait for some to finish or cancel them.")
        now = utcnow()
        task = Task(id=new_id(KINDS[kind], legacy=kind in ("import-volume", "import-instance")),
                    kind=kind, account_id=account_id,
                    state="waiting-upload" if wait_for_upload else "pending",
                    progress=0, bytes_done=0, params=params, client_token=client_token or None,
                    created_at=now, updated_at=now, expires_at=now + upload_expiry, attempts=0,
                    cancel_requested=False)
        s.add(task)
        try:
            s.flush()
        except IntegrityError:
            # Another request with this token won the race.
            raise EC2Error("IdempotentParameterMismatch", "a request with this ClientToken is in progress") \
                from None
        return task


def _by_token(s, account_id, client_token):
    return s.scalars(select(Task).where(Task.account_id == account_id,
                                        Task.client_token == client_token)).first()


# Parameters that say who asked, not what: another key of the same account may repeat a request.
NOT_COMPARED = ("access_key",)


def _same_or_mismatch(task, kind, params):
    def what(p):
        found = {k: v for k, v in p.items() if k not in NOT_COMPARED}
        if isinstance(found.get("source"), dict):  # the checksums recorded at submit are not the request's
            found["source"] = {k: v for k, v in found["source"].items() if k != "integrity"}
        return found
    if task.kind != kind or what(task.params) != what(params):
        raise EC2Error("IdempotentParameterMismatch",
                       f"The client token {task.client_token} was used before with other parameters "
                       f"(task {task.id}).")
    return task


def get(db, account, task_id, kinds=None):
    """The account's task, or None (another account's task is None too)."""
    with db.session() as s:
        task = s.get(Task, task_id)
    if task is None or task.account_id != _account_id(account) or (kinds and task.kind not in kinds):
        return None
    return task


def encode_token(task):
    raw = json.dumps([task.created_at.isoformat(), task.id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_token(token):
    """(created_at, id) from a NextToken; ValueError when it is not one of ours."""
    try:
        stamp, task_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return datetime.datetime.fromisoformat(stamp), str(task_id)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{token!r} is not a NextToken from this service") from e


_NOT_SHOWN = frozenset(("events", "account_id", "client_token", "updated_at", "started_at", "finished_at",
                        "heartbeat_at", "worker_id", "attempts", "cancel_requested"))


@functools.lru_cache(maxsize=256)
def _query_statement(kinds, n_ids, n_states, paged, limited):
    """The describe query, built once per shape (and prepared once by the database: the
    describe calls are the hot path); one parameter per id and state, no expanding ones."""
    # Only what the views show: not the kept toolkit events (up to 1 MiB a task), nor the
    # workers' bookkeeping (every datetime column costs a parse per row).
    columns = [c for c in Task.__table__.columns if c.name not in _NOT_SHOWN]
    stmt = select(*columns).where(Task.account_id == bindparam("account_id"),
                                  Task.kind.in_([bindparam(f"kind{i}") for i in range(len(kinds))]))
    if n_ids:
        stmt = stmt.where(Task.id.in_([bindparam(f"id{i}") for i in range(n_ids)]))
    if n_states:
        stmt = stmt.where(Task.state.in_([bindparam(f"state{i}") for i in range(n_states)]))
    if paged:  # after the NextToken's (created_at, id): the index ix_tasks_account_kind_order's order
        after = bindparam("after_stamp", type_=Task.created_at.type)
        stmt = stmt.where((Task.created_at > after)
                          | ((Task.created_at == after) & (Task.id > bindparam("after_id", type_=Task.id.type))))
    stmt = stmt.order_by(Task.created_at, Task.id)
    if limited:
        stmt = stmt.limit(bindparam("limit", type_=Integer))
    return stmt


def query(db, account, kinds, ids=None, states=None, limit=None, next_token=None):
    """The account's tasks of these kinds, oldest first: (tasks, next_token or None).
    The tasks are read-only rows with the Task's attributes that the API's views show
    (cheaper than ORM objects: the describe calls are the hot path)."""
    kinds, ids, states = tuple(kinds), sorted(set(ids or ())), sorted(set(states or ()))
    stmt = _query_statement(kinds, len(ids), len(states), bool(next_token), bool(limit))
    values = {"account_id": _account_id(account)}
    for prefix, items in (("kind", kinds), ("id", ids), ("state", states)):
        values.update((f"{prefix}{i}", v) for i, v in enumerate(items))
    if next_token:
        values["after_stamp"], values["after_id"] = decode_token(next_token)
    if limit:
        values["limit"] = limit + 1
    found = db.prepared(stmt)(**values)
    if limit and len(found) > limit:
        return found[:limit], encode_token(found[limit - 1])
    return found, None


def mark_uploaded(db, task_id):
    """waiting-upload -> pending once its parts are all there (the worker's HEAD poll)."""
    return _move(db, task_id, "pending", expect=("waiting-upload",))


def waiting_uploads(db, limit=100):
    """Tasks waiting for their upload, oldest first (for the worker's poll)."""
    with db.session() as s:
        return list(s.scalars(select(Task).where(Task.state == "waiting-upload")
                              .order_by(Task.created_at).limit(limit)))


def _move(db, task_id, new, expect, worker_id=None, **values):
    """Conditional UPDATE: the task moves only from one of `expect` (and owned by worker_id)."""
    assert all(_can(old, new) for old in expect), (expect, new)
    now = utcnow()
    values.update(state=new, updated_at=now)
    if new in TERMINAL:
        values.setdefault("finished_at", now)
    stmt = update(Task).where(Task.id == task_id, Task.state.in_(expect)).values(**values)
    if worker_id is not None:
        stmt = stmt.where(Task.worker_id == worker_id)
    with db.session(write=True) as s:
        return s.execute(stmt).rowcount == 1


def claim(db, worker_id, kinds=None):
    """Take the oldest pending task for this worker (pending -> converting), or None."""
    for _ in range(5):
        with db.session(write=True) as s:
            stmt = select(Task.id).where(Task.state == "pending")
            if kinds:
                stmt = stmt.where(Task.kind.in_(list(kinds)))
            # PostgreSQL: rows locked by another claimer are skipped; SQLite: BEGIN IMMEDIATE
            # already serialises writers, and the conditional UPDATE below is the check.
            stmt = stmt.order_by(Task.created_at).limit(1).with_for_update(skip_locked=True)
            task_id = s.scalar(stmt)
            if task_id is None:
                return None
            now = utcnow()
            won = s.execute(update(Task).where(Task.id == task_id, Task.state == "pending").values(
                state="converting", step="download", worker_id=worker_id, heartbeat_at=now,
                started_at=now, updated_at=now, attempts=Task.attempts + 1)).rowcount == 1
            if won:
                return s.get(Task, task_id, populate_existing=True)
    return None


def progress(db, task_id, worker_id, step=None, progress=None, bytes_done=None, bytes_total=None,
             message=None):
    """Heartbeat with news; False when the task is no longer this worker's to run: stop."""
    if step is not None and step not in STEPS:
        raise ValueError(f"unknown step {step!r}")
    now = utcnow()
    values = {"heartbeat_at": now, "updated_at": now}
    for name, value in (("step", step), ("bytes_done", bytes_done), ("bytes_total", bytes_total),
                        ("status_message", message)):
        if value is not None:
            values[name] = value
    if progress is not None:
        values["progress"] = max(0, min(100, int(progress)))
    stmt = update(Task).where(Task.id == task_id, Task.worker_id == worker_id,
                              Task.state == "converting", Task.cancel_requested.is_(False)).values(**values)
    with db.session(write=True) as s:
        if s.execute(stmt).rowcount == 1:
            return True
        # Still heart-beat a task being cancelled, so that it is not taken for an orphan.
        s.execute(update(Task).where(Task.id == task_id, Task.worker_id == worker_id,
                                     Task.state.in_(("converting", "cancelling")))
                  .values(heartbeat_at=now))
    return False


def cancel_requested(db, task_id):
    """True when the task's runner must stop (cancel asked, or the task is no longer running)."""
    with db.session() as s:
        row = s.execute(select(Task.state, Task.cancel_requested).where(Task.id == task_id)).first()
    return row is None or row.cancel_requested or row.state != "converting"


def complete(db, task_id, worker_id, result, resources):
    """converting -> completed; registers the resources (dicts of Resource's columns, `id`
    optional) and records their ids in the result as image_id / snapshot_id / volume_id.
    Returns the task, or None when the task was cancelled or taken over meanwhile."""
    with db.session(write=True) as s:
        task = s.scalars(select(Task).where(Task.id == task_id).with_for_update()).first()
        if task is None or task.state != "converting" or task.worker_id != worker_id or task.cancel_requested:
            return None
        result = dict(result or {})
        for spec in resources:
            spec = dict(spec)
            spec.setdefault("id", new_id(RESOURCE_PREFIX[spec["kind"]]))
            spec.setdefault("account_id", task.account_id)
            spec.setdefault("task_id", task.id)
            s.add(Resource(**spec))
            result[f"{spec['kind']}_id"] = spec["id"]
        now = utcnow()
        task.state, task.step, task.progress, task.result = "completed", None, 100, result
        task.updated_at = task.finished_at = now
        if task.bytes_total:
            task.bytes_done = task.bytes_total
        return task


def fail(db, task_id, worker_id, message):
    """-> failed with a message that names the step, hook and reason.  worker_id None: the
    service itself fails a task that no worker holds."""
    expect = _allowed_from("failed")
    return _move(db, task_id, "failed", expect, worker_id=worker_id, status_message=message, step=None)


def cancel(db, account, task_id, reason="cancelled by the user", kinds=None):
    """The account's cancel: waiting/pending tasks end at once; a converting one goes to
    cancelling until its worker stops (finish_cancel).  Returns (previous state, task), or
    None when the account has no such task.  A finished task: EC2Error IncorrectState."""
    account_id = _account_id(account)
    with db.session(write=True) as s:
        task = s.scalars(select(Task).where(Task.id == task_id).with_for_update()).first()
        if task is None or task.account_id != account_id or (kinds and task.kind not in kinds):
            return None
        previous, now = task.state, utcnow()
        if previous in ("waiting-upload", "pending"):
            task.state, task.finished_at = "cancelled", now
        elif previous == "converting":
            task.state, task.cancel_requested = "cancelling", True
        elif previous == "cancelling":
            return previous, task
        else:
            raise EC2Error("IncorrectState", f"The task {task_id} is {previous} and cannot be cancelled.")
        task.status_message, task.updated_at = reason, now
        return previous, task


def finish_cancel(db, task_id, worker_id):
    """cancelling -> cancelled, by the worker once everything of the task is released."""
    return _move(db, task_id, "cancelled", ("cancelling",), worker_id=worker_id)


MAX_EVENTS = 2000           # a task keeps its toolkit's last 2,000 events ...
MAX_EVENTS_BYTES = 1 << 20  # ... and at most 1 MiB of them


def bounded_events(events):
    """The last events that fit both bounds; a first {"event": "dropped", "count"} says how many went."""
    kept, size = [], 0
    for e in reversed(events[-MAX_EVENTS:]):
        size += len(json.dumps(e)) + 1
        if size > MAX_EVENTS_BYTES:
            break
        kept.append(e)
    kept.reverse()
    if len(kept) < len(events):
        kept[:0] = [{"event": "dropped", "count": len(events) - len(kept)}]
    return kept


def save_events(db, task_id, events):
    """Keep the toolkit's events of a task's attempt (the task page and `imaging logs` show them)."""
    with db.session(write=True) as s:
        s.execute(update(Task).where(Task.id == task_id).values(events=bounded_events(events)))


def events_of(db, task_id):
    with db.session() as s:
        return s.scalar(select(Task.events).where(Task.id == task_id)) or []


def hand_back(db, task_id, worker_id):
    """An orderly stop (SIGTERM) of the worker that runs a task: converting -> pending at once,
    the interrupted attempt not counted, so that another worker (or the restarted service)
    takes it without waiting for --orphan-after; a task being cancelled ends cancelled.
    Returns the task's new state, or None when the worker no longer held it."""
    now = utcnow()
    with db.session(write=True) as s:
        task = s.scalars(select(Task).where(Task.id == task_id, Task.worker_id == worker_id,
                                            Task.state.in_(("converting", "cancelling"))).with_for_update()).first()
        if task is None:
            return None
        if task.state == "cancelling" or task.cancel_requested:
            task.state, task.finished_at = "cancelled", now
        else:
            task.state, task.step, task.progress, task.bytes_done = "pending", None, 0, 0
            task.attempts = max(0, task.attempts - 1)
            task.status_message = f"handed back by worker {worker_id} at its orderly stop; waiting for a worker"
        task.worker_id, task.updated_at = None, now
        return task.state


def requeue_orphans(db, stale_after, max_attempts=3, now=None):
    """Tasks whose worker stopped heart-beating: a new attempt (converting -> pending) up to
    max_attempts, else failed; cancelling ones end cancelled.  Returns [{id, worker_id, state}]
    with the new state, so that the caller can clean the old work directories."""
    now = now or utcnow()
    if not isinstance(stale_after, datetime.timedelta):
        stale_after = datetime.timedelta(seconds=stale_after)
    done = []
    with db.session(write=True) as s:
        stale = s.scalars(select(Task).where(Task.state.in_(("converting", "cancelling")),
                                             Task.heartbeat_at < now - stale_after).with_for_update())
        for task in stale:
            gone = f"worker {task.worker_id} stopped during {task.step or 'its work'}"
            if task.state == "cancelling":
                task.state, task.finished_at = "cancelled", now
            elif task.attempts < max_attempts:
                task.state, task.step, task.progress, task.bytes_done = "pending", None, 0, 0
                task.status_message = f"{gone}; retrying (attempt {task.attempts + 1} of {max_attempts})"
            else:
                task.state, task.finished_at = "failed", now
                task.status_message = f"{gone}; failed after {task.attempts} attempts"
            done.append({"id": task.id, "worker_id": task.worker_id, "state": task.state})
            task.worker_id, task.updated_at = None, now
    return done


def expire(db, now=None, task_timeout=TASK_TIMEOUT, retention=RETENTION):
    """Uploads that never came fail; conversions over the time limit are cancelled (their
    worker stops them); finished tasks older than the retention are deleted.  Returns counts."""
    now = now or utcnow()
    counts = {}
    with db.session(write=True) as s:
        counts["upload-expired"] = s.execute(update(Task).where(
            Task.state == "waiting-upload", Task.expires_at < now).values(
            state="failed", finished_at=now, updated_at=now,
            status_message="the upload did not complete before the task expired")).rowcount
        minutes = int(task_timeout.total_seconds() // 60)
        counts["timed-out"] = s.execute(update(Task).where(
            Task.state == "converting", Task.started_at < now - task_timeout).values(
            state="cancelling", cancel_requested=True, updated_at=now,
            status_message=f"timed out after {minutes} minutes")).rowcount
        counts["deleted"] = s.execute(delete(Task).where(
            Task.state.in_(TERMINAL), Task.finished_at < now - retention)).rowcount
    return counts


def cached_resource(db, account, source_digest, options_digest, kind=None):
    """An earlier import's resource of this account from the same source and options, or None."""
    stmt = select(Resource).where(Resource.account_id == _account_id(account),
                                  Resource.source_digest == source_digest,
                                  Resource.options_digest == options_digest)
    if kind:
        stmt = stmt.where(Resource.kind == kind)
    with db.session() as s:
        return s.scalars(stmt.order_by(Resource.created_at.desc())).first()


def resources(db, account, kind, ids=None):
    """The account's resources of a kind (another account's ids are simply not found)."""
    stmt = select(Resource).where(Resource.account_id == _account_id(account), Resource.kind == kind)
    if ids:
        stmt = stmt.where(Resource.id.in_(list(ids)))
    with db.session() as s:
        return list(s.scalars(stmt.order_by(Resource.created_at, Resource.id)))
