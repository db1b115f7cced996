"""Crash safety: SIGKILL mid-harvest, restart, and the dataset is identical to an uninterrupted one."""

import json
import resource
import signal

import numpy as np
import pytest
import zarr

from tests.conftest import TINY
from tests.server import ServerProcess, free_port, kill_mid_harvest, wait_job

REQUEST = {"model": TINY, "hooks": ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"],
           "n_tokens": 20_000, "context_size": 64, "dtype": "bfloat16", "batch_size": 8}
SMALL_CHUNKS = {"CACHE_SERVER_CHUNK_BYTES": str(32 * 1024)}


def harvest_arrays(store, dataset_id) -> dict[str, np.ndarray]:
    group = zarr.open_group(store / "datasets" / dataset_id, mode="r")
    return {name: array[:] for name, array in group.arrays()}


@pytest.mark.slow
def test_sigkill_mid_harvest_resumes_to_an_identical_dataset(tmp_path):
    crashed = ServerProcess(store=tmp_path / "crashed" / "store", port=free_port(), env=SMALL_CHUNKS).start()
    job = kill_mid_harvest(crashed, REQUEST, after_tokens=4_000)
    job_id, dataset_id = job["job_id"], job["dataset_id"]
    _lose_running_sums(crashed.store / "datasets" / dataset_id / "zarr.json")

    restarted = ServerProcess(store=crashed.store, port=free_port(), env=SMALL_CHUNKS).start()
    try:
        with restarted.client() as client:
            job = wait_job(client, job_id)  # the same job, picked up again at start-up
            assert job["status"] == "completed", job
            manifest = client.get(f"/v1/datasets/{dataset_id}").json()
    finally:
        restarted.stop()

    reference = ServerProcess(store=tmp_path / "reference" / "store", port=free_port(), env=SMALL_CHUNKS).start()
    try:
        with reference.client() as client:
            accepted = client.post("/v1/harvests", json=REQUEST).json()
            assert accepted["dataset_id"] == dataset_id  # content-hash id: same request, same id
            assert wait_job(client, accepted["job_id"])["status"] == "completed"
            reference_manifest = client.get(f"/v1/datasets/{dataset_id}").json()
    finally:
        reference.stop()

    resumed, straight = harvest_arrays(crashed.store, dataset_id), harvest_arrays(reference.store, dataset_id)
    assert resumed.keys() == straight.keys() == {"blocks.0.hook_mlp_out", "blocks.1.hook_resid_post", "tokens"}
    for name in resumed:
        assert np.array_equal(resumed[name], straight[name]), name
    assert manifest["hooks"] == reference_manifest["hooks"]  # statistics too, to the last bit
    assert manifest["n_items"] == 20_000 and manifest["complete"]
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
