"""A real two-host ssh cluster on one machine, for multi-node DeepSpeed launch tests.

Usage (the fixture is registered in ``tests/conftest.py``)::

    def test_launch(ssh_cluster, tmp_path):
        hostfile = ssh_cluster.write_hostfile(tmp_path / "hostfile")      # 127.0.0.1 / 127.0.0.2
        ssh_cluster.write_deepspeed_env(tmp_path, {"FOO": "1"})          # tmp_path/.deepspeed_env
        subprocess.run(["deepspeed", "--hostfile", str(hostfile), "--master_addr", "127.0.0.1",
                        "--master_port", str(port), "train.py"],
                       cwd=tmp_path, env=ssh_cluster.env(), timeout=...)

What runs: one ``sshd`` (absolute path, own config, host key, pid file and log, all in a temp
dir) listening on 127.0.0.1 and 127.0.0.2 at a free port, key-only login as the current user
(``AuthorizedKeysFile`` in the temp dir; ``~/.ssh`` and ``/etc/ssh`` are never touched). The
two addresses are the two "hosts": DeepSpeed's pdsh runner runs
``pdsh -S -f 1024 -w 127.0.0.1,127.0.0.2 <launch cmd>`` and pdsh's ssh module runs ``ssh``
from PATH, once per host.

How ssh finds our config: ``env()`` puts a directory first on PATH holding an ``ssh`` wrapper
script, ``exec /usr/bin/ssh -F <our ssh_config> "$@"``. The config gives, for both addresses,
the port, the identity file, ``StrictHostKeyChecking no``, ``UserKnownHostsFile /dev/null``.
A wrapper (rather than only ``PDSH_SSH_ARGS_APPEND=-F …``) also covers the launcher's own
``ssh <first host> hostname`` reachability check and its ``ssh <host> hostname -I`` master
address probe, which do not go through pdsh.

What the ranks see: the remote shell is a fresh ssh session (sshd's default PATH, no
inherited environment). The launcher forwards only variables whose names start with
``PYTHON``, ``MLFLOW``, ``MV2``, ``UCX`` (``PYTHONPATH`` gets the launcher's cwd prepended),
plus every ``KEY=VALUE`` line of ``.deepspeed_env`` (looked up in ``~`` and in the launcher's
cwd; ``write_deepspeed_env`` writes PATH with the venv's bin first and OMP_NUM_THREADS=1).
``SSH_CONNECTION`` in a rank's environment names the address it was reached at.

If ``pdsh``/``sshd``/``ssh``/``ssh-keygen`` are missing, ``ensure_ssh_tools`` tries
``apt-get install pdsh openssh-server`` (root only); otherwise the fixture skips with the reason.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HOSTS = ["127.0.0.1", "127.0.0.2"]
START_TIMEOUT_S = 30.0
APT_TIMEOUT_S = 180.0
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SBIN_PATH)


def _missing_tools() -> list[str]:
    missing = [t for t in ("pdsh", "sshd", "ssh", "ssh-keygen") if _which(t) is None]
    pdsh = _which("pdsh")
    if pdsh is not None:  # the ssh rcmd module ships separately on some distributions
        try:
            out = subprocess.run([pdsh, "-V"], capture_output=True, text=True, timeout=10)
            if "ssh" not in (out.stdout + out.stderr):
                missing.append("pdsh ssh rcmd module")
        except (OSError, subprocess.SubprocessError):
            missing.append("working pdsh")
    return missing


def ensure_ssh_tools() -> str | None:
    """None when pdsh + sshd + ssh are usable; else install them with apt-get (root only,
    quietly, ~180 s budget) and return a skip reason if they are still missing."""
    missing = _missing_tools()
    if not missing:
        return None
    apt = shutil.which("apt-get")
    if os.geteuid() != 0 or apt is None:
        why = "not root" if os.geteuid() != 0 else "no apt-get"
        return (f"ssh cluster needs {', '.join(missing)} ({why}: cannot install them; "
                f"install the pdsh and openssh-server packages)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt, "install", "-y", "-qq", "--no-install-recommends", "pdsh", "openssh-server"]
    deadline = time.monotonic() + APT_TIMEOUT_S
    last = ""
    for cmd in (install, [apt, "update", "-qq"], install):  # install; on failure refresh lists, retry
        left = deadline - time.monotonic()
        if left <= 1:
            last = "timed out"
            break
        try:
            r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=left)
        except subprocess.TimeoutExpired:
            last = f"`{' '.join(cmd[1:3])}` timed out"
            break
        except OSError as e:
            last = str(e)
            break
        out = (r.stderr or r.stdout).strip().splitlines()
        last = out[-1] if out else f"exit status {r.returncode}"
        if cmd is install and r.returncode == 0:
            break
    missing = _missing_tools()
    if not missing:
        return None
    return (f"ssh cluster needs {', '.join(missing)}; apt-get install pdsh openssh-server "
            f"failed ({last or 'no output'})")


def free_port(hosts: list[str] | None = None) -> int:
    """A TCP port free on every address in ``hosts`` (default: both cluster hosts)."""
    import random

    rng = random.Random()
    for _ in range(2000):
        p = rng.randrange(20000, 32000)  # below the ephemeral range (32768+)
        ok = True
        for host in hosts or HOSTS:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return p
    raise RuntimeError("no free port found")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class SshCluster:
    """Two ssh "hosts" (127.0.0.1, 127.0.0.2) served by one private sshd.

    ``start()``/``stop()``; ``hosts``; ``env()`` for the ``deepspeed`` launcher subprocess;
    ``write_hostfile(path, slots=1)``; ``write_deepspeed_env(dir, extra)``;
    ``ssh(host, *cmd)`` runs a command on a host; ``kill_strays()`` kills processes started
    through this cluster's ssh sessions that are still alive (by PID)."""

    def __init__(self, workdir: Path | str):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        self.hosts = list(HOSTS)
        self.port: int | None = None
        self.sshd = _which("sshd")
        self.ssh_bin = _which("ssh")
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.client_key = self.workdir / "id_ed25519"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.sshd_config = self.workdir / "sshd_config"
        self.ssh_config = self.workdir / "ssh_config"
        self.pid_file = self.workdir / "sshd.pid"
        self.log = self.workdir / "sshd.log"
        self.bin_dir = self.workdir / "bin"  # holds the `ssh` wrapper, first on PATH
        # written into every .deepspeed_env: marks processes started through this cluster
        self.token = "mirl-ssh-" + secrets.token_hex(8)
        self._proc: subprocess.Popen | None = None

    # -- lifecycle

    def _keygen(self, path: Path, comment: str) -> None:
        if not path.exists():
            subprocess.run([_which("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", comment,
                            "-f", str(path)], check=True, stdin=subprocess.DEVNULL, timeout=30)

    def _write_configs(self) -> None:
        self._keygen(self.host_key, "mirl-ds test sshd host key")
        self._keygen(self.client_key, "mirl-ds test client key")
        self.authorized_keys.write_text(Path(str(self.client_key) + ".pub").read_text())
        os.chmod(self.authorized_keys, 0o600)
        listen = "\n".join(f"ListenAddress {h}:{self.port}" for h in self.hosts)
        self.sshd_config.write_text(f"""\
# private sshd for the mirl_ds two-host launch tests (not the system one)
{listen}
HostKey {self.host_key}
PidFile {self.pid_file}
AuthorizedKeysFile {self.authorized_keys}
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {_user()}
UsePAM no
StrictModes no
PrintMotd no
PrintLastLog no
UseDNS no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
MaxStartups 100:30:200
MaxSessions 100
LogLevel ERROR
""")
        hosts = " ".join(self.hosts)
        self.ssh_config.write_text(f"""\
Host {hosts}
    Port {self.port}
    User {_user()}
    IdentityFile {self.client_key}
    IdentitiesOnly yes
    IdentityAgent none
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    GlobalKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
    ConnectTimeout 10
""")
        self.bin_dir.mkdir(exist_ok=True)
        wrapper = self.bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {self.ssh_bin} -F {self.ssh_config} "$@"\n')
        os.chmod(wrapper, 0o755)

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        if self.sshd is None or self.ssh_bin is None:
            raise RuntimeError("sshd/ssh not found")
        # the privilege-separation directory sshd insists on
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        last_err = ""
        for _attempt in range(5):  # a port can be taken between our probe and sshd's bind
            self.port = free_port(self.hosts)
            self._write_configs()
            test = subprocess.run([self.sshd, "-t", "-f", str(self.sshd_config)],
                                  capture_output=True, text=True, timeout=30)
            if test.returncode != 0:
                raise RuntimeError(f"sshd -t rejected {self.sshd_config}: {test.stderr.strip()}")
            with open(self.log, "ab") as log:
                self._proc = subprocess.Popen(
                    [self.sshd, "-D", "-e", "-f", str(self.sshd_config)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
            atexit.register(self.stop)
            try:
                self._wait_ready(timeout)
                return
            except RuntimeError as e:
                last_err = str(e)
                self.stop()
        raise RuntimeError(last_err)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.hosts)
        last = ""
        while pending:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sshd exited with status {self._proc.returncode}; log:\n"
                                   f"{_tail(self.log)}")
            host = pending[0]
            r = self.ssh(host, "echo", "ok", timeout=15, check=False)
            if r.returncode == 0 and r.stdout.strip() == "ok":
                pending.pop(0)
                continue
            last = (r.stderr or r.stdout).strip()
            if time.monotonic() > deadline:
                raise RuntimeError(f"ssh to {host}:{self.port} failed after {timeout:.0f} s ({last});"
                                   f" sshd log:\n{_tail(self.log)}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop sshd (by its own PID), and anything still running from its sessions."""
        self.kill_strays()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        atexit.unregister(self.stop)

    def kill_strays(self, sig: int = signal.SIGKILL) -> list[int]:
        """Kill processes that carry this cluster's marker in their environment (everything a
        ``.deepspeed_env`` from ``write_deepspeed_env`` reached: the remote launchers, ranks).
        Use after a timed-out launch: DeepSpeed's own SIGTERM handler would run
        ``pdsh … pkill -f <python -u -m deepspeed.launcher.launch>``, which matches every
        DeepSpeed launch on the machine, not only ours."""
        marker = f"MIRL_SSH_CLUSTER={self.token}".encode()
        killed = []
        me = os.getpid()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == me:
                continue
            try:
                env = (d / "environ").read_bytes()
            except OSError:
                continue
            if marker in env.split(b"\0"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(d.name), sig)
                    killed.append(int(d.name))
        return killed

    # -- helpers for tests

    def ssh(self, host: str, *cmd: str, timeout: float = 30, check: bool = True):
        return subprocess.run([self.ssh_bin, "-F", str(self.ssh_config), host, *cmd],
                              capture_output=True, text=True, timeout=timeout, check=check,
                              stdin=subprocess.DEVNULL)

    def env(self, base: dict | None = None, ds_env_file: str | os.PathLike | None = None) -> dict[str, str]:
        """Environment for the ``deepspeed`` launcher process: our ``ssh`` wrapper and the
        venv's bin first on PATH, pdsh's ssh module selected, OMP_NUM_THREADS=1.
        ``ds_env_file``: an absolute .deepspeed_env path, read whatever the launcher's cwd
        (via DS_ENV_FILE; without it the launcher reads ``./.deepspeed_env`` and ``~/``)."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join([str(self.bin_dir), _venv_bin(), env.get("PATH", "")])
        env["PDSH_RCMD_TYPE"] = "ssh"
        env.pop("PDSH_SSH_ARGS", None)
        env.pop("PDSH_SSH_ARGS_APPEND", None)
        env.pop("WCOLL", None)
        env["OMP_NUM_THREADS"] = "1"
        env["PYTHONUNBUFFERED"] = "1"  # exported to the ranks too (PYTHON* names are)
        env["MIRL_SSH_CLUSTER"] = self.token  # local-launch children carry the marker too
        if ds_env_file is not None:
            env["DS_ENV_FILE"] = str(Path(ds_env_file).resolve())
        return env

    def write_hostfile(self, path: str | os.PathLike, slots: int = 1) -> Path:
        path = Path(path)
        path.write_text("".join(f"{h} slots={slots}\n" for h in self.hosts))
        return path

    def write_deepspeed_env(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write ``directory/.deepspeed_env``: PATH (venv bin first), OMP_NUM_THREADS=1, the
        cluster marker, then ``extra``. One KEY=VALUE per line and no blank lines (the launcher
        splits every line on '='; a blank line crashes it). Values with characters outside
        ``[\\w@%+=:,./-]`` get double-quoted by the launcher, so keep them simple."""
        values = {
            "PATH": os.pathsep.join([_venv_bin(), "/usr/local/bin", "/usr/bin", "/bin",
                                     "/usr/local/sbin", "/usr/sbin", "/sbin"]),
            "OMP_NUM_THREADS": "1",
            "MIRL_SSH_CLUSTER": self.token,
        }
        values.update({k: str(v) for k, v in (extra or {}).items()})
        for k, v in values.items():
            if "\n" in v or "=" in k or not k:
                raise ValueError(f"bad .deepspeed_env entry {k!r}={v!r}")
        path = Path(directory) / ".deepspeed_env"
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        return path


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _venv_bin() -> str:
    return os.path.dirname(sys.executable)


@pytest.fixture(scope="session")
def ssh_cluster():
    reason = ensure_ssh_tools()
    if reason is not None:
        pytest.skip(reason)
    workdir = Path(tempfile.mkdtemp(prefix="mirl-ssh-"))  # short path; 0700, no ~/.ssh involved
    cluster = SshCluster(workdir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
