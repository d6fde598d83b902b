"""The `celery` engine: workers on many machines, tasks dispatched through a
RabbitMQ broker.  The database stays the source of truth for task state;
a broker message only says "look at task ID".

- front-ends publish `imaging.run(task_id)` after the task is committed
  (Dispatcher.submitted); a publish that fails (broker down) is repaired by
  the workers' sweep, which re-sends pending tasks nobody has touched for
  `redispatch_after` (one sweeper wins each round: a conditional UPDATE);
- a worker claims the task by id with a conditional UPDATE (pending ->
  converting), so a redelivered or duplicated message never runs a task
  twice; a task still converting under a worker that stopped heart-beating
  is first requeued (tasks.requeue_orphans), then claimed; one whose worker
  still heart-beats is left to it (the message is acknowledged: should that
  worker die, every worker's housekeeping requeues and publishes it again);
- late acknowledgement, reject-on-worker-lost and prefetch 1: a worker
  killed mid-task has its message redelivered, and holds no more messages
  than it runs;
- workers announce their limits (concurrent conversions, scratch space) in
  the `imaging_workers` table; a task that needs more scratch than this
  worker has goes back to the queue while another live worker has room;
- SIGTERM drains (Celery's warm shutdown: no new message, the running conversions end
  here); `imaging-service worker drain` does the same without stopping (the
  `draining` flag of the worker's announcement); SIGQUIT or a second SIGTERM hands the
  running tasks back at once (docs/deployment.md);
- cancellation and the time limit go through the database (the pipeline
  polls tasks.cancel_requested every second; tasks.expire cancels a task
  over `task_timeout`), never revoke(terminate=True).
"""

import datetime
import logging
import os
import secrets
import signal
import socket
import threading
import time

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    inspect,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError

from imaging_service import fetch, tasks
from imaging_service.config import Setting
from imaging_service.models import Task, utcnow

log = logging.getLogger(__name__)
TASK_NAME = "imaging.run"

SETTINGS = [
    Setting("broker_url", "str", None,
            "AMQP URL of the RabbitMQ broker of the celery engine, e.g. amqp://user:pass@broker:5672/vhost",
            metavar="URL"),
    Setting("queue", "str", "imaging", "the broker queue the celery engine's tasks go through", metavar="NAME"),
    Setting("redispatch_after", "duration", "10m",
            "celery engine: a pending task nobody touched for this long is published again (a publish "
            "lost while the broker was down)", metavar="TIME"),
]

# Worker announcements: what each worker can take (not part of the task model; made on demand).
metadata = MetaData()
workers_table = Table(
    "imaging_workers", metadata,
    Column("name", String(200), primary_key=True),
    Column("concurrency", Integer, nullable=False),
    Column("running", Integer, nullable=False),
    Column("scratch_capacity", BigInteger, nullable=False),
    Column("scratch_free", BigInteger, nullable=False),
    Column("draining", Boolean, nullable=False, default=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
)


def seconds(value, default):
    if value is None:
        return default
    return value.total_seconds() if hasattr(value, "total_seconds") else float(value)


def make_celery(settings):
    """The Celery app of the celery engine (front-ends and workers alike)."""
    from celery import Celery
    from kombu import Queue

    if not settings.broker_url:
        raise ValueError("the celery engine needs --broker-url (the RabbitMQ broker)")
    time_limit = int(seconds(settings.task_timeout, 3 * 3600)) + 600
    app = Celery("imaging_service", broker=settings.broker_url, set_as_current=False)
    queue = settings.queue or "imaging"
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json",  # never pickle
        result_backend=None, task_ignore_result=True,  # the database holds every result
        worker_prefetch_multiplier=1, task_acks_late=True, task_reject_on_worker_lost=True,
        task_time_limit=time_limit,
        # RabbitMQ closes the channel of a consumer that holds an unacknowledged message longer
        # than its consumer timeout (30 min by default): above the task's time limit here.
        task_queues=[Queue(queue, routing_key=queue, durable=True,
                           queue_arguments={"x-consumer-timeout": (time_limit + 600) * 1000})],
        task_default_queue=queue, task_default_routing_key=queue,
        task_default_delivery_mode="persistent",
        broker_connection_retry_on_startup=True, broker_connection_max_retries=None,
        broker_transport_options={"confirm_publish": True},
        worker_hijack_root_logger=False, worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_enable_remote_control=False, worker_send_task_events=False,
    )
    return app


# ---- front-end side -------------------------------------------------------------------------------

class Dispatcher:
    """What a front-end of the celery engine does: publish each committed task."""

    def __init__(self, settings):
        self.app = make_celery(settings)

    def submitted(self, task_id):
        try:
            self.app.send_task(TASK_NAME, args=[task_id], retry=True,
                               retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
        except Exception as e:  # noqa: BLE001 -- the task is committed: a worker's sweep re-sends it
            log.warning("task %s: the broker did not take it now (%s); it is sent again later", task_id, e)

    def ping(self):
        """None when the broker takes a connection, else the reason (for /healthz)."""
        connection = self.app.connection(connect_timeout=3)
        try:
            connection.connect()
        except Exception as e:  # noqa: BLE001 -- any failure is the answer to report
            return f"cannot connect: {e}"
        finally:
            connection.release()
        return None

    def close(self):
        self.app.close()


# ---- the database side of the engine ------------------------------------------------------------

def claim_by_id(db, task_id, worker_id):
    """pending -> converting for this one task (the idempotent claim of a delivered message):
    the Task, or None when the task is not pending (another delivery took it, or it ended)."""
    now = utcnow()
    with db.session(write=True) as s:
        won = s.execute(update(Task).where(Task.id == task_id, Task.state == "pending").values(
            state="converting", step="download", worker_id=worker_id, heartbeat_at=now, started_at=now,
            updated_at=now, attempts=Task.attempts + 1)).rowcount == 1
        return s.get(Task, task_id, populate_existing=True) if won else None


def state_of(db, task_id):
    with db.session() as s:
        return s.scalar(select(Task.state).where(Task.id == task_id))


def stale_pending(db, older_than, limit=500):
    """Pending tasks untouched for `older_than`, each touched now by exactly one caller
    (the re-publish sweep of many workers sends each once per round)."""
    now = utcnow()
    cutoff = now - datetime.timedelta(seconds=older_than)
    mine = []
    with db.session(write=True) as s:
        rows = s.execute(select(Task.id, Task.updated_at).where(Task.state == "pending",
                                                                 Task.updated_at < cutoff)
                         .order_by(Task.created_at).limit(limit)).all()
        for task_id, stamp in rows:
            if s.execute(update(Task).where(Task.id == task_id, Task.state == "pending",
                                            Task.updated_at == stamp).values(updated_at=now)).rowcount:
                mine.append(task_id)
    return mine


def announce(db, name, concurrency, running, capacity, free, draining=False):
    """Write this worker's row; returns its `draining` flag as stored.  The worker only ever sets
    the flag (its shutdown); `imaging-service worker drain/resume` (set_draining) set and clear it."""
    row = {"concurrency": concurrency, "running": running, "scratch_capacity": capacity,
           "scratch_free": free, "heartbeat_at": utcnow()}
    if draining:
        row["draining"] = True
    with db.session(write=True) as s:
        if not s.execute(update(workers_table).where(workers_table.c.name == name).values(**row)).rowcount:
            s.execute(workers_table.insert().values(name=name, **dict(row, draining=draining)))
        return bool(s.scalar(select(workers_table.c.draining).where(workers_table.c.name == name)))


def set_draining(db, names, draining, within):
    """Ask the live workers `names` (all live ones for an empty list) to drain (stop taking tasks,
    finish the running ones, keep running) or to take tasks again.  Returns the names asked."""
    ensure_schema(db)
    found = [w["name"] for w in live_workers(db, within) if not names or w["name"] in names]
    if found:
        with db.session(write=True) as s:
            s.execute(update(workers_table).where(workers_table.c.name.in_(found)).values(draining=draining))
    return found


def asked_to_drain(db, name):
    """Whether `imaging-service worker drain` asked the worker `name` to drain (its flag as stored)."""
    with db.session() as s:
        return bool(s.scalar(select(workers_table.c.draining).where(workers_table.c.name == name)))


def forget(db, name):
    with db.session(write=True) as s:
        s.execute(workers_table.delete().where(workers_table.c.name == name))


def ensure_schema(db):
    """The announcements table, made by whoever needs it first (two workers starting at
    once may both try: the loser finds it made)."""
    try:
        metadata.create_all(db.engine, checkfirst=True)
    except DBAPIError:
        if not inspect(db.engine).has_table(workers_table.name):
            raise


def live_workers(db, within):
    """Announcements heard in the last `within` seconds: list of dicts."""
    ensure_schema(db)
    cutoff = utcnow() - datetime.timedelta(seconds=within)
    with db.session() as s:
        return [dict(r._mapping) for r in s.execute(select(workers_table)
                                                    .where(workers_table.c.heartbeat_at >= cutoff))]


# ---- worker side ------------------------------------------------------------------------------

class CeleryWorker:
    """One worker machine: the Celery consumer (threads pool: `workers` conversions at once, one
    scratch space shared by them) plus a housekeeping thread (announcement, orphans, uploads,
    re-publish sweep).  The pipeline itself is BACK's (worker.EmbeddedWorkers._run)."""

    def __init__(self, db, settings, store, credentials):
        from imaging_service.worker import EmbeddedWorkers, scratch_space

        self.db, self.settings = db, settings
        self.app = make_celery(settings)
        # BACK's embedded workers, never started: their job runner, scratch accounting, work
        # directory cleanup, orphan requeue and upload poll are the same for this engine.
        self.local = EmbeddedWorkers(db, settings, store, credentials=credentials)
        os.makedirs(self.local.work_root, mode=0o700, exist_ok=True)
        os.chmod(self.local.work_root, 0o700)
        self.local.clean_work_root()
        self.local.scratch = scratch_space(settings, self.local.work_root)
        self.name = f"{socket.gethostname()}/{os.getpid()}-{secrets.token_hex(3)}"
        self.redispatch_after = seconds(getattr(settings, "redispatch_after", None), 600.0)
        self.draining = False  # takes no new task: asked by `worker drain`, or shutting down
        self.stopping = False  # a (warm) shutdown started
        self.controller = None  # the Celery WorkController, once main() made it
        ensure_schema(db)
        self._register_task()

    def _register_task(self):
        worker = self

        @self.app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True,
                       max_retries=None)
        def run(celery_task, task_id):
            return worker.run(celery_task, task_id)

    def _retry_later(self, celery_task, why, countdown):
        log.info("task %s: %s; back to the queue", celery_task.request.args[0], why)
        raise celery_task.retry(countdown=countdown)

    def run(self, celery_task, task_id):
        """The body of one delivery of `imaging.run(task_id)`."""
        db, local = self.db, self.local
        state = state_of(db, task_id)
        if state == "converting":
            # A redelivery after a worker died: take the task over once its heartbeat is stale.
            tasks.requeue_orphans(db, local.orphan_after, local.max_attempts)
            state = state_of(db, task_id)
            if state == "converting":
                # Its worker heart-beats: it finishes it.  Should that worker die, the
                # housekeeping of every worker requeues the task and publishes it again.
                return "running on another worker"
        if state != "pending":
            return f"nothing to do: {state}"  # ended, cancelled, or waiting for its upload
        # The stored flag, not only ours: a drain asked since our last announcement (the consumer
        # is cancelled then) must not let a task delivered meanwhile start here.
        if self.draining or asked_to_drain(db, self.name):
            self._retry_later(celery_task, "this worker drains", 1)
        need = self._scratch_need(task_id)
        if need and need > local.scratch.capacity - local.scratch.held:
            others = [w for w in live_workers(db, 3 * local.heartbeat + 5)
                      if w["name"] != self.name and not w["draining"] and w["scratch_free"] >= need]
            if others:
                self._retry_later(celery_task, f"needs {need} bytes of scratch; {others[0]['name']} has them", 1)
        worker_id = f"{self.name}/{secrets.token_hex(3)}"
        task = claim_by_id(db, task_id, worker_id)
        if task is None:
            return "taken by another delivery"
        local.running[task.id] = None  # counted in the announcement while it runs
        try:
            local._run(task, worker_id)
        finally:
            local.running.pop(task.id, None)
        if local._stop.is_set() and state_of(db, task_id) == "pending":
            # Stopped before the task's end (cold shutdown): local._run handed it back; publish it
            # again (should this message be redelivered too, the claim takes only one of them).
            self.app.send_task(TASK_NAME, args=[task_id])
            return "released"
        return state_of(db, task_id)

    def _scratch_need(self, task_id):
        """Bytes this task will reserve (twice its source), or None when not known up front."""
        try:
            with self.db.session() as s:
                task = s.get(Task, task_id)
            source = (task.params or {}).get("source") if task else None
            if not source or task.kind == "export-image":
                return None
            return 2 * fetch.source_size(source, self.local.allowed_endpoints, self.local._user_store(task))
        except Exception:  # noqa: BLE001 -- the pipeline reports a source it cannot read
            return None

    # -- housekeeping ---------------------------------------------------------------------------

    def _announce(self):
        local = self.local
        asked = announce(self.db, self.name, local.count, len(local.running), local.scratch.capacity,
                         local.scratch.capacity - local.scratch.held, self.stopping)
        if self.stopping or self.controller is None or asked == self.draining:
            return
        # `imaging-service worker drain/resume`: stop or start consuming, in the consumer's own
        # thread (what Celery's remote `cancel_consumer`/`add_consumer` do).
        consumer, queue = self.controller.consumer, self.settings.queue
        self.draining = asked
        if asked:
            log.info("draining: no new tasks; %d running finish here", len(local.running))
            consumer.call_soon(consumer.cancel_task_queue, queue)
        else:
            log.info("taking tasks again")
            consumer.call_soon(consumer.add_task_queue, queue)  # the configured queue, by its name

    def _housekeeping(self, stop):
        local = self.local
        pending_before = set()
        last_sweep = 0.0
        while not stop.wait(1.0):
            try:
                self._announce()
                for found in tasks.requeue_orphans(self.db, local.orphan_after, local.max_attempts):
                    log.warning("task %s: worker %s stopped; now %s", found["id"], found["worker_id"],
                                found["state"])
                    if found["state"] == "pending":
                        self.app.send_task(TASK_NAME, args=[found["id"]])
                waiting = {t.id for t in tasks.waiting_uploads(self.db)}
                local._poll_uploads(time.monotonic())
                for task_id in pending_before - waiting:
                    if state_of(self.db, task_id) == "pending":  # its upload arrived: dispatch now
                        self.app.send_task(TASK_NAME, args=[task_id])
                pending_before = waiting
                if time.monotonic() - last_sweep >= min(30.0, self.redispatch_after):
                    last_sweep = time.monotonic()
                    for task_id in stale_pending(self.db, self.redispatch_after):
                        log.info("task %s: pending for %s s; published again", task_id, self.redispatch_after)
                        self.app.send_task(TASK_NAME, args=[task_id])
            except Exception:
                log.exception("housekeeping failed")

    def main(self, loglevel="INFO"):
        """Run the Celery worker until it is stopped; returns the exit code.

        SIGTERM (or a first SIGINT) is Celery's warm shutdown, a drain: the worker stops taking
        messages and marks itself draining, its running conversions go on to their end here, then
        it exits 0.  SIGQUIT, or a second SIGTERM/SIGINT: the running conversions stop now, are
        handed back (pending) and published again, then the worker exits 1; a message not
        acknowledged by then is redelivered too: the idempotent claim runs each task once."""
        from celery import signals

        stop = threading.Event()
        keeper = threading.Thread(target=self._housekeeping, args=(stop,), name="housekeeping", daemon=True)

        def cold(*_args):
            # Ours, not Celery's cold shutdown (with the threads pool it cannot stop a running task,
            # it raises NotImplementedError): stop the conversions now, hand them back, then leave
            # as on a warm shutdown.
            from celery.worker import state
            log.warning("cold shutdown: handing the %d running tasks back", len(self.local.running))
            self.stopping = self.draining = True
            self.local._stop.set()
            if state.should_stop in (None, False):
                state.should_stop = 1

        def ready(**_kwargs):
            signal.signal(signal.SIGQUIT, cold)  # in the main thread, after Celery installed its own

        def shutting_down(how="Warm", **_kwargs):
            # SIGTERM, or a first SIGINT: a drain (the running conversions end here); a second one
            # is the cold shutdown, as SIGQUIT.
            if how == "Cold" or self.stopping:
                cold()
                return
            log.info("warm shutdown: draining; %d running tasks finish here", len(self.local.running))
            self.stopping = self.draining = True
            for sig in (signal.SIGQUIT, signal.SIGINT):  # Celery re-armed SIGINT with its cold shutdown
                signal.signal(sig, cold)

        signals.worker_ready.connect(ready, weak=False)
        signals.worker_shutting_down.connect(shutting_down, weak=False)
        try:
            worker = self.app.Worker(pool="threads", concurrency=self.local.count, queues=[self.settings.queue],
                                     hostname=f"imaging@{self.name.replace('/', '-')}", loglevel=loglevel,
                                     without_gossip=True, without_mingle=True, without_heartbeat=True,
                                     optimization="fair")
            self.controller = worker
            keeper.start()
            worker.start()
            return worker.exitcode or 0
        finally:
            self.local._stop.set()
            stop.set()
            if keeper.is_alive():
                keeper.join(10)
            try:
                forget(self.db, self.name)
            except Exception:
                log.exception("could not remove this worker's announcement")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
