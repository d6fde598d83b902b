"""Service fixtures shared by the service tests (FRONT and BACK): a temporary
directory, and the service itself started as `imaging-service serve` in a
child process on a free port with a temporary --state-dir."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import boto3
import botocore.config
import fixtures

TempDir = fixtures.TempDir
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REGION = "us-east-1"


def free_port():
    """A free port below the kernel's ephemeral range (32768 and up): a port the kernel
    picked for bind(0) is one it also hands to outgoing connections, which the tests
    running beside this one make by the thousand, so it was often taken again before
    the server bound it."""
    for _ in range(500):
        port = 20000 + secrets.randbelow(12000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port on 127.0.0.1 between 20000 and 32000")


def cli(*args, env=None, check=True):
    """Run `imaging-service ARGS` (as `python -m imaging_service.cli`); the CompletedProcess."""
    result = subprocess.run([sys.executable, "-m", "imaging_service.cli", *map(str, args)],
                            capture_output=True, text=True, cwd=ROOT, check=False,
                            env=dict(os.environ, **(env or {})))
    if check and result.returncode != 0:
        raise AssertionError(f"imaging-service {' '.join(map(str, args))}: exit {result.returncode}\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


class Service(fixtures.Fixture):
    """`imaging-service serve` in a child process.

    engine: "none" (API only, no object store or workers), "embedded" or "celery" (a
    front-end; tests/service/celery_fixtures.py gives it its database and broker).
    args: more flags; env: more environment.  After setUp: .url, .state_dir,
    .credential() -> (access, secret, account), .client(access, secret).
    """

    def __init__(self, engine="none", args=(), env=None, state_dir=None, start_timeout=60, healthy=True):
        super().__init__()
        self.healthy = healthy  # False: started once /healthz answers at all (503 too)
        self.engine, self.args, self.env = engine, list(args), dict(env or {})
        self.state_dir, self.start_timeout = state_dir, start_timeout
        self.process = None

    def _setUp(self):
        if self.state_dir is None:
            self.state_dir = os.path.join(self.useFixture(TempDir()).path, "state")
        self.addCleanup(self.stop)
        for attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.log_path = os.path.join(os.path.dirname(self.state_dir), f"service-{self.port}.log")
            try:
                self.start()
                return
            except AssertionError:
                # Another process took the port between our check and the bind: another one.
                if attempt == 2 or "Address already in use" not in self.log():
                    raise

    def common_args(self):
        return ["--state-dir", self.state_dir, *self.args]

    @property
    def database_url(self):
        """The database this service uses (a flag, IMAGING_SERVICE_DATABASE_URL as the celery
        engine's tests set it, or the default SQLite file)."""
        if "--database-url" in self.args:
            return self.args[self.args.index("--database-url") + 1]
        return (self.env.get("IMAGING_SERVICE_DATABASE_URL") or os.environ.get("IMAGING_SERVICE_DATABASE_URL")
                or "sqlite:///" + os.path.join(self.state_dir, "service.db"))

    def start(self):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "imaging_service.cli", "serve", "--port", str(self.port),
                 "--engine", self.engine, *self.common_args()],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, **self.env),
                start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the service exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                if not self.healthy:
                    return
                e.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the service did not answer /healthz in {self.start_timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Stop the service (SIGTERM: orderly; SIGKILL: as a crash)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig) if sig == signal.SIGKILL else self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError(f"the service did not stop within {timeout} s:\n{self.log()}") from None

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def credential(self, operator=False):
        args = ["credentials", "create", "--json", *self.common_args()] + (["--operator"] if operator else [])
        found = json.loads(cli(*args).stdout)
        return found["access_key"], found["secret_key"], found["account_id"]

    def client(self, access, secret, service="ec2", endpoint_url=None):
        return boto3.session.Session().client(
            service, endpoint_url=endpoint_url or self.url, region_name=REGION, aws_access_key_id=access,
            aws_secret_access_key=secret,
            config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=10, read_timeout=60))


PG_BIN = "/usr/lib/postgresql/15/bin"


class PostgreSQL(fixtures.Fixture):
    """A PostgreSQL server of Debian's binaries in a temporary directory, on 127.0.0.1 and a
    free port, run as the user `postgres` (it refuses root).  .url: an SQLAlchemy URL of a
    fresh database.  Tests skip when the binaries are missing (see `missing()`)."""

    @staticmethod
    def missing():
        """Why PostgreSQL cannot run here, or None."""
        for tool in ("initdb", "pg_ctl"):
            if not os.access(os.path.join(PG_BIN, tool), os.X_OK):
                return f"{PG_BIN}/{tool} is missing (Debian package postgresql)"
        try:
            import pwd
            pwd.getpwnam("postgres")
        except KeyError:
            return "no user postgres (Debian package postgresql makes it)"
        return None

    def _as_postgres(self, *argv):
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, text=True)

    def _setUp(self):
        import pwd
        user = pwd.getpwnam("postgres")
        self.dir = os.path.join(self.useFixture(TempDir()).path, "pg")
        os.mkdir(self.dir, 0o700)
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        os.chmod(os.path.dirname(self.dir), 0o711)  # postgres must reach its directory
        data = os.path.join(self.dir, "data")
        self._as_postgres(f"{PG_BIN}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                          "--no-sync")
        self.port = free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c max_connections=200"
        self._as_postgres(f"{PG_BIN}/pg_ctl", "-D", data, "-o", options, "-l", os.path.join(self.dir, "log"),
                          "-w", "-t", "60", "start")
        self.addCleanup(self._as_postgres, f"{PG_BIN}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        import psycopg
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE imaging")
        self.url = self.database_url("imaging")

    def database_url(self, name):
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def create_database(self, name):
        """A fresh database on this server (a test's own, when a test class shares the server)."""
        import psycopg
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)
