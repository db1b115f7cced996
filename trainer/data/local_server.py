"""Start a cache server as a child process (``python -m cache_server``) and stop it on exit.

Used by the one-command pipeline; the trainer still only talks to it over HTTP.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _die_with_parent() -> None:
    """Linux: SIGTERM this (child) process when the process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the server outlives a killed parent, as before


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalServer:
    def __init__(self, store: Path, port: int | None = None, host: str = "127.0.0.1", log: Path | None = None,
                 extra_args: list[str] | None = None, cpus: set[int] | None = None):
        self.store, self.host, self.cpus = store, host, cpus
        self.port = port or free_port(host)
        self.log = log or store.parent / "cache-server.log"
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "LocalServer":
        self._check_port_free()  # else /health could be answered by whatever holds it
        self.log.parent.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "cache_server", "--store", str(self.store), "--host", self.host,
                "--port", str(self.port), *self.extra_args]
        with self.log.open("ab") as log:
            # Its own session: a terminal's Ctrl-C reaches only us, and we stop the server on the way
            # out (after the trainer's checkpoint); it dies with us if we are killed.
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                            preexec_fn=self._in_child, start_new_session=True)
        self._wait_healthy(timeout=180)
        return self

    def _check_port_free(self) -> None:
        with socket.socket() as sock:
            try:
                sock.bind((self.host, self.port))
            except OSError:
                raise RuntimeError(f"port {self.port} on {self.host} is in use; pick another one") from None

    def _in_child(self) -> None:
        _die_with_parent()
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)  # benchmarks: its own core

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise RuntimeError(f"cache server exited: {tail[0]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"cache server did not answer on {self.url} within {timeout:.0f}s (log: {self.log})")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
