"""Fixtures of the celery engine's tests and benchmark: a real RabbitMQ (Debian's
rabbitmq-server, run as root in a temporary directory on 127.0.0.1 and free ports,
with its own epmd on a private port), SeaweedFS as the shared object store, and
`imaging-service worker` processes ("machines" with their own work directories)."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import fixtures

from tests.service import fixtures as sf

RABBIT_BIN = "/usr/lib/rabbitmq/bin"


class RabbitMQ(fixtures.Fixture):
    """rabbitmq-server in a temporary directory: .url (amqp://guest:guest@127.0.0.1:PORT//),
    .stop() / .start() for the broker restart test.  The consumer timeout is set in the
    rabbitmq.conf written here (Debian's 3.10 has no per-queue x-consumer-timeout)."""

    CONSUMER_TIMEOUT_MS = 4 * 3600 * 1000  # above the default task time limit (180 min + margins)

    @staticmethod
    def missing():
        if not os.access(os.path.join(RABBIT_BIN, "rabbitmq-server"), os.X_OK):
            return "rabbitmq-server is missing (Debian package rabbitmq-server)"
        return None

    def _setUp(self):
        self.dir = self.useFixture(fixtures.TempDir()).path
        self.port, self.dist_port, self.epmd_port = sf.free_port(), sf.free_port(), sf.free_port()
        conf = os.path.join(self.dir, "rabbitmq.conf")
        with open(conf, "w") as f:
            f.write(f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
                    f"consumer_timeout = {self.CONSUMER_TIMEOUT_MS}\n"
                    "loopback_users.guest = true\n"
                    "log.console = false\n")
        self.env = dict(os.environ, HOME=self.dir, RABBITMQ_MNESIA_BASE=os.path.join(self.dir, "mnesia"),
                        RABBITMQ_LOG_BASE=os.path.join(self.dir, "log"), RABBITMQ_CONFIG_FILE=conf,
                        RABBITMQ_NODENAME=f"imaging-test-{self.port}@localhost",
                        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(self.port),
                        RABBITMQ_DIST_PORT=str(self.dist_port), ERL_EPMD_PORT=str(self.epmd_port),
                        ERL_EPMD_ADDRESS="127.0.0.1",
                        RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(self.dir, "enabled_plugins"),
                        RABBITMQ_PID_FILE=os.path.join(self.dir, "rabbit.pid"),
                        RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(self.dir, "advanced.config"))
        with open(self.env["RABBITMQ_ENABLED_PLUGINS_FILE"], "w") as f:
            f.write("[].\n")
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.process = None
        self.addCleanup(self._kill_epmd)
        self.addCleanup(self.stop)
        self.start()

    def start(self, timeout=90):
        with open(os.path.join(self.dir, "server.out"), "ab") as log:
            self.process = subprocess.Popen([os.path.join(RABBIT_BIN, "rabbitmq-server")], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"rabbitmq-server exited with {self.process.returncode}: {self.output()}")
            done = subprocess.run([os.path.join(RABBIT_BIN, "rabbitmqctl"), "-q", "await_startup", "--timeout", "5"],
                                  check=False, env=self.env, capture_output=True, text=True)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"rabbitmq-server did not start: {done.stderr}\n{self.output()}")
            time.sleep(0.5)

    def output(self):
        with open(os.path.join(self.dir, "server.out"), errors="replace") as f:
            return f.read()[-3000:]

    def stop(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            subprocess.run([os.path.join(RABBIT_BIN, "rabbitmqctl"), "-q", "stop"], check=False, env=self.env,
                           capture_output=True, timeout=60)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # anything of the node left behind
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None

    def _kill_epmd(self):
        subprocess.run(["epmd", "-port", str(self.epmd_port), "-kill"], check=False, env=self.env,
                       capture_output=True)


class Cluster(fixtures.Fixture):
    """PostgreSQL + RabbitMQ + SeaweedFS, an operator key and one user, shared by every
    front-end and worker started with .frontend() / .worker()."""

    def __init__(self, extra_args=()):
        super().__init__()
        self.extra_args = list(extra_args)

    def _setUp(self):
        from imaging_service.seaweed import EmbeddedSeaweed, free_port_pair
        self.dir = self.useFixture(fixtures.TempDir()).path
        self.pg = self.useFixture(sf.PostgreSQL())
        self.rabbit = self.useFixture(RabbitMQ())
        self.key_file = os.path.join(self.dir, "secret.key")
        base = ["--database-url", self.pg.url, "--key-file", self.key_file]
        state = os.path.join(self.dir, "admin")
        self.operator = self._credential(base, state, operator=True)
        self.user = self._credential(base, state)
        self.seaweed = EmbeddedSeaweed(os.path.join(self.dir, "seaweed"), port=free_port_pair())
        self.seaweed.write_identities([(*self.operator, True), (*self.user, False)])
        self.seaweed.start()
        self.addCleanup(self.seaweed.stop)
        self.args = [*base, "--engine", "celery", "--broker-url", self.rabbit.url,
                     "--s3-endpoint", self.seaweed.endpoint_url, "--s3-access-key", self.operator[0],
                     # "=": a secret may start with "-", which argparse would take for a flag
                     f"--s3-secret-key={self.operator[1]}", *self.extra_args]
        self.workers = []

    def _credential(self, base, state, operator=False):
        found = json.loads(sf.cli("credentials", "create", "--json", "--state-dir", state, *base,
                                  *(["--operator"] if operator else [])).stdout)
        return found["access_key"], found["secret_key"], found["account_id"]

    def frontend(self):
        state = os.path.join(self.dir, f"front-{sf.free_port()}")
        return self.useFixture(sf.Service(engine="celery", args=self.args, state_dir=state))

    def worker(self, *args):
        w = Worker(self, args)
        self.workers.append(self.useFixture(w))
        return w


class Worker(fixtures.Fixture):
    """`imaging-service worker` in its own session, with its own state and work directory.
    cluster: anything with .dir (where its directories go) and .args (the shared flags)."""

    def __init__(self, cluster, args=()):
        super().__init__()
        self.cluster, self.args = cluster, list(args)

    def _setUp(self):
        self.state_dir = os.path.join(self.cluster.dir, f"worker-{sf.free_port()}")
        self.work_dir = os.path.join(self.state_dir, "work")
        self.log_path = self.state_dir + ".log"
        self.addCleanup(self.stop)
        self.start()

    def start(self):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "imaging_service.cli", "worker", "--state-dir", self.state_dir,
                 "--engine", "celery", *self.cluster.args, *self.args], stdout=log, stderr=subprocess.STDOUT,
                cwd=sf.ROOT, start_new_session=True)

    def kill(self):
        """SIGKILL the whole machine's processes (the worker and its toolkit children)."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout=60):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                raise AssertionError(f"the worker did not stop in {timeout} s:\n{self.log()[-3000:]}") from None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()


# ---- the service's test suite on the celery engine ----------------------------------------------

WHY_NOT = RabbitMQ.missing() or sf.PostgreSQL.missing()


class Servers(fixtures.Fixture):
    """PostgreSQL, RabbitMQ and SeaweedFS for a whole test class (each takes seconds to start);
    every test gets its own database, broker queue and key file from .environ()."""

    def _setUp(self):
        from imaging_service.seaweed import EmbeddedSeaweed, free_port_pair
        self.dir = self.useFixture(fixtures.TempDir()).path
        self.pg = self.useFixture(sf.PostgreSQL())
        self.rabbit = self.useFixture(RabbitMQ())
        self.seaweed = EmbeddedSeaweed(os.path.join(self.dir, "seaweed"), port=free_port_pair())
        self.seaweed.write_identities([])
        self.seaweed.start()
        self.addCleanup(self.seaweed.stop)
        self.count = 0

    def environ(self, tmp):
        """IMAGING_SERVICE_* variables of one test: every `imaging-service` command the test runs
        (serve, worker, credentials) reaches its database and queue without a flag."""
        self.count += 1
        return {"IMAGING_SERVICE_DATABASE_URL": self.pg.create_database(f"test{self.count}"),
                "IMAGING_SERVICE_KEY_FILE": os.path.join(tmp, "secret.key"),
                "IMAGING_SERVICE_BROKER_URL": self.rabbit.url,
                "IMAGING_SERVICE_QUEUE": f"test{self.count}"}

    def sync_identities(self):
        """The store takes exactly the key pairs of the current test's database (what the
        embedded engine's front-end does by itself; an external store is the operator's)."""
        from imaging_service.credentials import Credentials
        from imaging_service.db import Database
        db = Database(os.environ["IMAGING_SERVICE_DATABASE_URL"])
        try:
            self.seaweed.write_identities(sorted(Credentials(db, os.environ["IMAGING_SERVICE_KEY_FILE"])
                                                 .identities()))
        finally:
            db.dispose()


class CeleryService(sf.Service):
    """A celery front-end whose new credentials are made valid on the shared store at once."""

    def __init__(self, servers, **kwargs):
        super().__init__(engine="celery", **kwargs)
        self.servers = servers

    def credential(self, operator=False):
        found = super().credential(operator)
        self.servers.sync_identities()
        return found


class CeleryEngine:
    """Mixin that runs a test class of the service's suite (tests/service/test_api.py,
    test_clients.py) again on the celery engine: PostgreSQL, RabbitMQ and SeaweedFS started once
    for the class, a fresh database and queue per test.  Put it first in the bases:
    `class TestXCelery(CeleryEngine, TestX)`; the test class starts its service with
    `engine=self.engine` (and, for imports, its workers through `celery_worker()`)."""

    engine = "celery"
    servers = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.servers = Servers()
        cls.servers.setUp()

    @classmethod
    def tearDownClass(cls):
        cls.servers.cleanUp()
        super().tearDownClass()

    def setUp(self):
        tmp = self.useFixture(fixtures.TempDir()).path
        for name, value in self.servers.environ(tmp).items():
            self.useFixture(fixtures.EnvironmentVariable(name, value))
        self.celery_dir = tmp
        super().setUp()

    def celery_worker(self, *args):
        """An `imaging-service worker` ("another machine") for this test's database and queue."""
        holder = types.SimpleNamespace(dir=self.celery_dir, args=list(args))
        return self.useFixture(Worker(holder))
