"""Embedded workers: threads in the service process that claim tasks and run
pipeline.run_task, each task's toolkit in its own child process group.

- concurrency: `workers` conversion slots, so never more than that many
  conversions (download, validate, convert); a task that reaches its store
  step trades its conversion slot for one of `workers` store slots, so the
  next task converts while this one uploads its result;
- scratch: a task reserves its share of `scratch_space` before it fetches a
  byte; one that can never fit fails, one that cannot fit now waits;
- heartbeats: every task's progress is its heartbeat; a housekeeping thread
  requeues tasks whose worker stopped heart-beating (a killed service:
  retried up to `max_attempts`, then failed with a message) and polls the
  uploads that tasks wait for (the service's maintenance expires tasks);
- a task's work directory is removed when it ends, and at start every
  directory left by a killed service is released through the toolkit's
  journal (`euca-image-process --cleanup`) and removed.
"""

import datetime
import logging
import os
import secrets
import shutil
import socket
import threading
import time

from imaging_service import fetch, pipeline, tasks
from imaging_service.config import Setting
from imaging_service.models import utcnow

log = logging.getLogger(__name__)

SETTINGS = [
    Setting("workers", "int", 2, "conversions run at once by this service's embedded workers (and as many "
            "results stored at once: a task at its store step frees its conversion slot)", metavar="N"),
    Setting("scratch_space", "size", None,
            "bytes of scratch space the workers share (a task reserves twice its image before it "
            "starts; each toolkit run is held to it by a filesystem of that size); default: the free "
            "space of the work directory", metavar="SIZE"),
    Setting("work_dir", "str", None, "where tasks fetch and convert; default: STATE_DIR/work", metavar="DIR"),
    Setting("heartbeat", "duration", "2s", "how often a running task reports (its heartbeat)", metavar="TIME"),
    Setting("orphan_after", "duration", "60s",
            "a task whose worker has not reported for this long is retried or failed", metavar="TIME"),
    Setting("max_attempts", "int", 3, "attempts of a task whose worker died before it is failed", metavar="N"),
    Setting("nice", "int", 10, "CPU niceness of the toolkit processes (I/O: best-effort, lowest)", metavar="N"),
    Setting("upload_poll", "duration", "5s",
            "how often a task waiting for its upload checks its parts (HEAD)", metavar="TIME"),
]


def _seconds(value, default):
    if value is None:
        return default
    return value.total_seconds() if hasattr(value, "total_seconds") else float(value)


class Scratch:
    """The workers' scratch space: reservations by task, never more than the capacity."""

    def __init__(self, capacity, enforced=True):
        """enforced: the operator set the capacity (--scratch-space), and each toolkit run is
        held to it by a filesystem of that size; else it is the work directory's free space,
        which the disk itself enforces (a loop filesystem per run would add nothing but cost)."""
        self.capacity = capacity
        self.enforced = enforced
        self._held = {}
        self._lock = threading.Lock()

    def reserve(self, task_id, size):
        with self._lock:
            if sum(self._held.values()) + size > self.capacity:
                return False
            self._held[task_id] = size
            return True

    def release(self, task_id):
        with self._lock:
            self._held.pop(task_id, None)

    @property
    def held(self):
        with self._lock:
            return sum(self._held.values())


def scratch_space(settings, work_root):
    """The workers' Scratch: --scratch-space, or the free space of `work_root`."""
    capacity = getattr(settings, "scratch_space", None)
    if capacity is not None:
        return Scratch(int(capacity))
    st = os.statvfs(work_root)
    return Scratch(st.f_bavail * st.f_frsize, enforced=False)


class Slots:
    """A task's hold on the workers' slots: a conversion slot from its claim, traded for a
    store slot when it reaches its store step (pipeline.Job.slots)."""

    def __init__(self, conversions, stores):
        self._conversions, self._stores = conversions, stores
        self.converting, self.storing = True, False  # the dispatcher took the conversion slot

    def take_store(self, timeout):
        """Take a store slot; False when none is free within `timeout`."""
        if not self.storing:
            self.storing = self._stores.acquire(timeout=timeout)
        return self.storing

    def release_conversion(self):
        """Called once the task's step says `store`, so that the database never shows more
        conversions than slots."""
        if self.converting:
            self.converting = False
            self._conversions.release()

    def release(self):
        self.release_conversion()
        if self.storing:
            self.storing = False
            self._stores.release()


class EmbeddedWorkers:
    """Worker threads for one service process.

    db: database.Database; settings: the resolved settings (config.resolve);
    store: ObjectStore with the service's keys; credentials: credentials.Credentials
    (the requesting user's keys read user buckets); allowed_endpoints: object
    stores a URL may point at (default: the store's endpoint)."""

    def __init__(self, db, settings, store, credentials=None, allowed_endpoints=None):
        self.db, self.settings, self.store = db, settings, store
        if credentials is None and getattr(settings, "key_file", None):
            from imaging_service.credentials import Credentials
            credentials = Credentials(db, settings.key_file)
        self.credentials = credentials
        self.allowed_endpoints = list(allowed_endpoints or [store.endpoint_url])
        self.count = int(getattr(settings, "workers", None) or 2)
        self.work_root = getattr(settings, "work_dir", None) or os.path.join(settings.state_dir, "work")
        self.heartbeat = _seconds(getattr(settings, "heartbeat", None), 2.0)
        self.orphan_after = _seconds(getattr(settings, "orphan_after", None), 60.0)
        self.max_attempts = int(getattr(settings, "max_attempts", None) or 3)
        self.upload_poll = _seconds(getattr(settings, "upload_poll", None), 5.0)
        self.id_prefix = f"{socket.gethostname()}/{os.getpid()}-{secrets.token_hex(3)}"
        self.scratch = None
        self.running = {}  # task id -> Job
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads = []
        self._task_threads = set()
        self._conversions = threading.BoundedSemaphore(self.count)
        self._stores = threading.BoundedSemaphore(self.count)
        self._claims = 0
        self._upload_checked = {}

    # -- life cycle ---------------------------------------------------------------------------

    def start(self):
        os.makedirs(self.work_root, mode=0o700, exist_ok=True)
        os.chmod(self.work_root, 0o700)
        self.clean_work_root()
        self.scratch = scratch_space(self.settings, self.work_root)
        self._stop.clear()
        self._spawn(self._dispatch, "imaging-dispatcher")
        self._spawn(self._housekeeping, "imaging-housekeeping")
        return self

    def _spawn(self, target, name, *args):
        thread = threading.Thread(target=target, name=name, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout=30):
        """Stop the threads; running tasks' toolkits are stopped and the tasks handed back (pending)."""
        self._stop.set()  # also every running job's `shutdown`
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in [*self._threads, *list(self._task_threads)]:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def wake(self):
        """A task was submitted: look now instead of at the next poll."""
        self._wake.set()

    def health(self):
        """None when every thread runs, else the reason (for /healthz)."""
        dead = [t.name for t in self._threads if not t.is_alive()]
        if not self._threads:
            return "the workers are not started"
        return f"worker threads stopped: {', '.join(dead)}" if dead else None

    def clean_work_root(self):
        """Release and remove what tasks of a killed service left (none of ours runs yet)."""
        for name in os.listdir(self.work_root):
            if name in self.running:
                continue
            path = os.path.join(self.work_root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                pipeline.cleanup_task_dir(path)
                shutil.rmtree(path, ignore_errors=True)

    # -- the worker threads ---------------------------------------------------------------------

    def _dispatch(self):
        """Claim a task whenever a conversion slot is free; each task runs in its own thread."""
        while not self._stop.is_set():
            if not self._conversions.acquire(timeout=0.5):
                continue
            self._claims += 1
            worker_id = f"{self.id_prefix}-{self._claims}"
            try:
                task = tasks.claim(self.db, worker_id)
            except Exception:
                log.exception("claiming a task failed")
                task = None
            if task is None:
                self._conversions.release()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            slots = Slots(self._conversions, self._stores)
            thread = threading.Thread(target=self._run_task_thread, args=(task, worker_id, slots),
                                      name=f"imaging-task-{task.id}", daemon=True)
            self._task_threads.add(thread)
            thread.start()

    def _run_task_thread(self, task, worker_id, slots):
        try:
            self._run(task, worker_id, slots)
        finally:
            slots.release()
            self._task_threads.discard(threading.current_thread())

    def _run(self, task, worker_id, slots=None):
        work_dir = os.path.join(self.work_root, task.id)
        shutil.rmtree(work_dir, ignore_errors=True)
        os.makedirs(work_dir, mode=0o700)
        job = pipeline.Job(db=self.db, task=task, worker_id=worker_id, settings=self.settings, store=self.store,
                           user_store=None, work_dir=work_dir, allowed_endpoints=self.allowed_endpoints,
                           scratch=self.scratch, heartbeat=self.heartbeat, shutdown=self._stop, slots=slots)
        self.running[task.id] = job
        try:
            job.user_store = self._user_store(task)
            if job.user_store is None:
                tasks.fail(self.db, task.id, worker_id, "download failed: the access key that submitted the "
                                                        "task was revoked; its buckets cannot be read")
                return
            outcome = pipeline.run_task(job)
            log.info("task %s: %s", task.id, outcome)
        except Exception as e:
            log.exception("task %s: internal error", task.id)
            tasks.fail(self.db, task.id, worker_id, f"{job.step or 'download'} failed: internal error: {e}")
        finally:
            self.scratch.release(task.id)
            pipeline.cleanup_task_dir(work_dir)
            shutil.rmtree(work_dir, ignore_errors=True)
            self.running.pop(task.id, None)
            if self._stop.is_set():  # an orderly stop: hand the task back now, released and clean
                try:
                    tasks.hand_back(self.db, task.id, worker_id)
                except Exception:  # noqa: BLE001 - the orphan requeue takes it after --orphan-after
                    log.exception("task %s: could not hand it back", task.id)

    def _user_store(self, task):
        access_key = task.params.get("access_key")
        if self.credentials is None or not access_key:
            return None  # never fall back to the service's own keys for a user's bucket
        found = self.credentials.lookup(access_key)
        if found is None:
            return None
        return self.store.for_user(access_key, found[0])  # one client per key pair, kept by the store

    # -- housekeeping -------------------------------------------------------------------------

    def _housekeeping(self):
        last_orphans = 0.0
        while not self._stop.wait(1.0):
            now = time.monotonic()
            try:
                if now - last_orphans >= max(1.0, self.orphan_after / 3):
                    last_orphans = now
                    for found in tasks.requeue_orphans(self.db, self.orphan_after, self.max_attempts):
                        log.warning("task %s: worker %s stopped; now %s", found["id"], found["worker_id"],
                                    found["state"])
                        self._wake.set()
                self._poll_uploads(now)
            except Exception:
                log.exception("housekeeping failed")

    def _poll_uploads(self, now):
        waiting = tasks.waiting_uploads(self.db)
        ids = {task.id for task in waiting}
        self._upload_checked = {k: v for k, v in self._upload_checked.items() if k in ids}
        for task in waiting:
            if now - self._upload_checked.get(task.id, -1e9) < self.upload_poll:
                continue
            self._upload_checked[task.id] = now
            ready, reason, fatal = fetch.upload_state(task.params.get("source", {}), self.allowed_endpoints,
                                                      self._user_store(task))
            expiring = task.expires_at is not None and \
                task.expires_at <= utcnow() + datetime.timedelta(seconds=2 * self.upload_poll)
            if fatal or (not ready and expiring):
                # Said now, with what is missing, rather than as a bare expiry later.
                why = reason if fatal else f"the upload did not complete before the task expired: {reason}"
                tasks.fail(self.db, task.id, None, f"download failed: {why}")
                self._upload_checked.pop(task.id, None)
            elif ready and tasks.mark_uploaded(self.db, task.id):
                self._upload_checked.pop(task.id, None)
                self._wake.set()
