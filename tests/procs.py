"""Real servers for tests, each started in its own session and stopped by its own PIDs (never
`ray stop`, which would stop every Ray on the machine): Ray head and worker nodes (a worker node
may get its own mount namespace, so it does not see the driver's working folder, as a second
machine would not), a local S3-compatible server, an MLflow server; and a TCP proxy to cut the
network to one of them for a while."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_where(field: int, value: int) -> list[int]:
    """PIDs whose /proc/PID/stat has `value` at `field`, counted after the name: 0 state, 1 ppid,
    2 pgrp, 3 session ..."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended
        if int(fields[field]) == value:
            pids.append(int(stat.parent.name))
    return pids


def session_pids(sid: int) -> list[int]:
    """PIDs of the processes in session `sid` (what we started with start_new_session)."""
    return _pids_where(3, sid)


def children(pid: int, title: bytes = b"") -> list[int]:
    """PIDs of `pid`'s children whose command line (a Ray process's title) starts with `title`."""
    found = []
    for child in _pids_where(1, pid):
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes().startswith(title):
                found.append(child)
        except OSError:
            continue  # it ended
    return found


def kill_session(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL every process of `proc`'s session (a SIGTERMed Ray head drains for 30 s)."""
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + timeout
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.3)


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 120, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read() if proc.stdout and proc.poll() is not None else ""
            raise RuntimeError(f"{what} did not come up on port {port}: {out[-2000:]}")
        time.sleep(0.3)


def cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process `pid` has used so far; None once it has ended."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def session_cpu_s(proc: subprocess.Popen) -> float:
    """CPU seconds (user + system) the processes of `proc`'s session have used so far."""
    return sum(cpu_s(pid) or 0.0 for pid in session_pids(proc.pid))


def start(cmd: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def ray_env() -> dict:
    """Join a token-authenticated cluster (Ray's default for `ray start`) with the local token."""
    return {"RAY_AUTH_MODE": "token"} if (Path.home() / ".ray" / "auth_token").is_file() else {}


def ray_head(port: int, temp_dir: str, num_cpus: int, log: Path) -> subprocess.Popen:
    head = start([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                  f"--num-cpus={num_cpus}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
                  "--disable-usage-stats"], log=log)
    wait_port(port, head, what="ray start --head")
    return head


def ray_worker(port: int, num_cpus: int, num_gpus: int, log: Path, hide: Path | None = None,
               env: dict | None = None) -> subprocess.Popen:
    """A worker node. With `hide`, it runs in its own mount namespace with an empty tmpfs over
    `hide` (as root, `unshare -m`): the driver's files there do not exist for it."""
    cmd = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", "--block", f"--num-cpus={num_cpus}",
           f"--num-gpus={num_gpus}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    if hide is not None:
        quoted = " ".join(f"'{c}'" for c in cmd)
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               f"mount -t tmpfs tmpfs '{hide}' && exec {quoted}"]
    worker = start(cmd, env={**ray_env(), **(env or {})}, log=log)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray worker node did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)
    return worker


def can_hide_folders() -> bool:
    """Root with `unshare` that may mount (a container may forbid it)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                       capture_output=True)
    return r.returncode == 0


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_server(port: int, bucket: str) -> subprocess.Popen:
    """moto's S3-compatible server on 127.0.0.1, with `bucket` created."""
    proc = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)])
    wait_port(port, proc, what="moto_server")
    import pyarrow.fs

    fs = pyarrow.fs.S3FileSystem(access_key=S3_ENV["AWS_ACCESS_KEY_ID"], secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                                 region="us-east-1", scheme="http", endpoint_override=f"127.0.0.1:{port}",
                                 allow_bucket_creation=True)
    fs.create_dir(bucket)
    return proc


def mlflow_server(port: int, folder: Path) -> subprocess.Popen:
    """`mlflow server` with a SQLite store, serving artifacts (clients upload through it). Its job
    runner (eight more processes for MLflow's GenAI jobs, which a sweep never uses) is off: on two
    cores their start competes with the trials."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                  "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                 env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, log=folder / "server.log")
    wait_port(port, proc, what="mlflow server")
    return proc


class Proxy:
    """A TCP forwarder in this process, 127.0.0.1:`port` → 127.0.0.1:`target`: `stop()` is a
    network outage (new connections refused, open ones cut), `start()` its end. The server behind
    it keeps running, with what it holds."""

    def __init__(self, target: int):
        self.target, self.port = target, free_port()
        self._listener, self._conns = None, []
        self.start()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return  # stopped
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for sock in (a, b):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        for sock in [self._listener, *self._conns]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._conns = []
