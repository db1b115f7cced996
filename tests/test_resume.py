"""Crash safety: SIGKILL mid-harvest, restart, and the dataset is identical to an uninterrupted one."""

import json
import resource
import signal

import numpy as np
import pytest
import zarr

from tests.conftest import TINY
from tests.server import ServerProcess, assert_same_as_single_harvest, free_port, kill_mid_harvest, wait_job

REQUEST = {"model": TINY, "hooks": ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"],
           "n_tokens": 20_000, "context_size": 64, "dtype": "bfloat16", "batch_size": 8}
SMALL_CHUNKS = {"CACHE_SERVER_CHUNK_BYTES": str(64 * 1024)}  # as the session server


def harvest_arrays(store, dataset_id) -> dict[str, np.ndarray]:
    group = zarr.open_group(store / "datasets" / dataset_id, mode="r")
    return {name: array[:] for name, array in group.arrays()}


@pytest.mark.slow
def test_sigkill_mid_harvest_resumes_to_an_identical_dataset(server, tmp_path):
    """The reference, an uninterrupted harvest of the same request, is the session server's (the
    same chunk size): every chunk's bytes and the statistics to the last bit."""
    crashed = ServerProcess(store=tmp_path / "crashed" / "store", port=free_port(), env=SMALL_CHUNKS).start()
    job = kill_mid_harvest(crashed, REQUEST, after_tokens=4_000)
    job_id, dataset_id = job["job_id"], job["dataset_id"]
    _lose_running_sums(crashed.store / "datasets" / dataset_id / "zarr.json")

    restarted = ServerProcess(store=crashed.store, port=free_port(), env=SMALL_CHUNKS).start()
    try:
        with restarted.client() as client:
            job = wait_job(client, job_id)  # the same job, picked up again at start-up
            assert job["status"] == "completed", job
            assert client.get(f"/v1/datasets/{dataset_id}").json()["n_items"] == 20_000
            assert assert_same_as_single_harvest(server, client, REQUEST) == dataset_id  # content-hash id
    finally:
        restarted.stop()
    assert harvest_arrays(crashed.store, dataset_id).keys() == {"blocks.0.hook_mlp_out", "blocks.1.hook_resid_post", "tokens"}
    assert not list(crashed.store.rglob("*.partial"))


def _lose_running_sums(group_metadata):
    """Wipe the stored running sums: the resumed harvest must rebuild them from the committed rows."""
    meta = json.loads(group_metadata.read_text())
    for sums in meta["attributes"]["harvest_state"].values():
        sums.update(sum=[0.0] * len(sums["sum"]), norm_sum=0.0, sq_norm_sum=0.0, count=0)
    group_metadata.write_text(json.dumps(meta))


@pytest.mark.slow
def test_graceful_stop_leaves_the_job_queued_and_restart_finishes_it(tmp_path):
    server = ServerProcess(store=tmp_path / "store", port=free_port(), env=SMALL_CHUNKS).start()
    with server.client() as client:
        job_id = client.post("/v1/harvests", json=REQUEST).json()["job_id"]
        wait_job(client, job_id, until=("running",))
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=60)
    server = ServerProcess(store=server.store, port=free_port(), env=SMALL_CHUNKS).start()
    try:
        with server.client() as client:
            assert wait_job(client, job_id)["status"] == "completed"
    finally:
        server.stop()


def _limit_file_size() -> None:
    # Files past 2 MiB fail with EFBIG, as writes do on a full disk; job and corpus files fit.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))


def test_a_failing_disk_fails_the_job_with_its_reason_and_the_server_stays_up(tmp_path):
    server = ServerProcess(store=tmp_path / "store", port=free_port(),
                           env={"CACHE_SERVER_CHUNK_BYTES": str(4 << 20)})
    server.start(preexec_fn=_limit_file_size)
    try:
        with server.client() as client:
            job = client.post("/v1/harvests", json={**REQUEST, "n_tokens": 60_000, "dtype": "float32"}).json()
            failed = wait_job(client, job["job_id"])
            assert failed["status"] == "failed"
            assert "File too large" in failed["error"] or "No space" in failed["error"], failed["error"]
            assert client.get("/health").status_code == 200
            small = client.post("/v1/harvests", json={**REQUEST, "n_tokens": 1_000}).json()
            assert wait_job(client, small["job_id"])["status"] == "completed"
    finally:
        server.stop()
