"""Run the real cache server in a subprocess on 127.0.0.1, as a user would (``python -m cache_server``)."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from trainer.data.local_server import free_port  # noqa: F401  (tests import it from here)


@dataclass
class ServerProcess:
    store: Path
    port: int
    token: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    hub: bool = False  # tests load nothing from the hub unless they say so (its cache, offline)
    cwd: Path | None = None
    process: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = "use-server-token", timeout: float = 60) -> httpx.Client:
        token = self.token if token == "use-server-token" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def start(self, wait: float = 120, preexec_fn=None) -> "ServerProcess":
        args = [sys.executable, "-m", "cache_server", "--store", str(self.store), "--port", str(self.port)]
        args += [] if self.hub else ["--no-hub"]
        if self.token:
            args += ["--token", self.token]
        args += self.extra_args
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **self.env}
        self.store.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.store.parent / f"server-{self.port}.log"
        self.process = subprocess.Popen(args, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                        preexec_fn=preexec_fn, cwd=self.cwd)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise TimeoutError(f"server did not start:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300, until=("completed", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/harvests/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")


def kill_mid_harvest(server: ServerProcess, request: dict, after_tokens: int) -> dict:
    """Request a harvest, SIGKILL the server once ``after_tokens`` are committed; the job as last seen."""
    with server.client() as client:
        job_id = client.post("/v1/harvests", json=request).json()["job_id"]
        while (job := client.get(f"/v1/harvests/{job_id}").json())["tokens_done"] < after_tokens:
            assert job["status"] in ("queued", "running"), job
            time.sleep(0.05)
        server.kill()
    assert 0 < job["tokens_done"] < request["n_tokens"]
    return job


def assert_same_as_single_harvest(single: ServerProcess, client: httpx.Client, request: dict) -> str:
    """The dataset ``client``'s server holds for ``request`` equals ``single``'s own harvest of the
    same request: the manifest's statistics to the last bit, and every chunk's bytes. Its id."""
    with single.client() as local:
        accepted = local.post("/v1/harvests", json=request).json()
        if accepted["job_id"]:
            assert wait_job(local, accepted["job_id"])["status"] == "completed"
        dataset_id = accepted["dataset_id"]
        manifest, reference = (c.get(f"/v1/datasets/{dataset_id}").json() for c in (client, local))
        assert manifest["complete"] and manifest["n_items"] == reference["n_items"] == request["n_tokens"]
        assert manifest["hooks"] == reference["hooks"]
        for array in [f"hooks/{h}" for h in request["hooks"]] + ["tokens"]:
            for index in range(reference["n_chunks_total"]):
                path = f"/v1/datasets/{dataset_id}/{array}/chunks/{index}"
                assert client.get(path).content == local.get(path).content, path
    return dataset_id
