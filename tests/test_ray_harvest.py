"""Harvests on a local Ray cluster (``cache-server --ray-address``): the dataset equals the
in-process server's bit for bit, with a Ray worker SIGKILLed mid-harvest; cancel stops the
workers; Ray is never imported by a server without the flag."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.test_compose import COMPOSE
from tests.server import ServerProcess, assert_same_as_single_harvest, free_port, wait_job

pytest.importorskip("ray")

REQUEST = {"model": TINY, "hooks": ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"],
           "n_tokens": 24_000, "context_size": 64, "batch_size": 8}
CHUNKS = {"CACHE_SERVER_CHUNK_BYTES": str(64 * 1024)}  # as the session server: 24 chunks
RAY_ENV = {k: str(v) for k, v in COMPOSE["x-ray-env"].items() if v}  # compose's: no Ray token by default
RAY = Path(sys.executable).with_name("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    """docker-compose.yml's ray profile on this machine: its head's and worker's exact command lines
    (the port moved, not blocking); the address."""
    port = free_port()
    env = {**os.environ, **RAY_ENV}
    for service in ("ray-head", "ray-worker"):
        command = [a for a in COMPOSE["services"][service]["command"] if a != "--block"]
        command = [a.replace("ray-head:6379", f"127.0.0.1:{port}").replace("6379", str(port)) for a in command]
        assert command[:2] == ["ray", "start"], command
        subprocess.run([str(RAY), *command[1:]], env=env, check=True, capture_output=True, timeout=120)
    yield f"127.0.0.1:{port}"
    subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)


def ray_server(tmp_path: Path, address: str, workers: int = 2) -> ServerProcess:
    return ServerProcess(store=tmp_path / "store", port=free_port(), env={**CHUNKS, **RAY_ENV},
                         extra_args=["--ray-address", address, "--ray-workers", str(workers)])


def worker_pids() -> list[int]:
    """The Ray harvest actors' processes (Ray titles them ``ray::HarvestWorker...``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::HarvestWorker"):
                pids.append(int(proc.name))
        except OSError:  # it ended meanwhile
            pass
    return pids


def progress(client, job: dict) -> dict:
    now = client.get(f"/v1/harvests/{job['job_id']}").json()
    assert now["status"] in ("queued", "running"), now
    return now


@pytest.mark.slow
def test_a_ray_harvest_with_a_killed_worker_equals_the_in_process_one(server, ray_cluster, tmp_path):
    ray_side = ray_server(tmp_path, ray_cluster).start()
    try:
        with ray_side.client() as client:
            job = client.post("/v1/harvests", json=REQUEST).json()
            deadline = time.monotonic() + 180
            while not (pids := worker_pids()) or progress(client, job)["tokens_done"] == 0:
                assert time.monotonic() < deadline, progress(client, job)
                time.sleep(0.05)
            os.kill(pids[0], signal.SIGKILL)  # a worker dies mid-harvest: Ray restarts it, retries its range
            done = wait_job(client, job["job_id"])
            assert done["status"] == "completed", done
            now = worker_pids()  # Ray restarted the killed worker (its range was retried there or on the other)
            assert pids[0] not in now and len(now) == 2, (pids, now)
            assert assert_same_as_single_harvest(server, client, REQUEST) == job["dataset_id"]
            assert "ray" in (ray_side.log.read_text()).lower()
    finally:
        ray_side.stop()


@pytest.mark.slow
def test_cancel_stops_the_ray_workers_of_a_private_cluster(tmp_path):
    """``--ray-address local``: the server starts its own cluster; cancel kills the pool."""
    ray_side = ray_server(tmp_path, "local", workers=1).start()
    try:
        with ray_side.client() as client:
            job = client.post("/v1/harvests", json={**REQUEST, "n_tokens": 96_000}).json()
            deadline = time.monotonic() + 180
            while progress(client, job)["tokens_done"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert client.delete(f"/v1/harvests/{job['job_id']}").status_code == 200
            assert wait_job(client, job["job_id"])["status"] == "cancelled"
            deadline = time.monotonic() + 30
            while worker_pids():  # cancel kills the pool: nothing holds the cluster's CPUs
                assert time.monotonic() < deadline, "the Ray workers outlived the cancelled harvest"
                time.sleep(0.2)
    finally:
        ray_side.stop()


def test_an_unreachable_ray_address_is_one_line_at_start_up(tmp_path):
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "cache_server", "--store", str(tmp_path / "s"), "--port",
                             str(free_port()), "--ray-address", f"127.0.0.1:{port}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    assert result.stderr.startswith("cache-server: error: no Ray cluster answers at --ray-address 127.0.0.1:"), result.stderr
    assert "Traceback" not in result.stderr


def test_the_in_process_server_never_imports_ray():
    code = ("import sys; from cache_server.app import create_app; from cache_server.settings import Settings; "
            "import tempfile; create_app(Settings(store=tempfile.mkdtemp())); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out
