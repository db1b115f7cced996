"""A full disk (issue 14): the server says so, keeps working, and runs the next job once there is
room again, without a restart. "Full" is made real with the server process' file-size limit
(RLIMIT_FSIZE, changed from outside with prlimit): every write past it fails with EFBIG, as writes
on a full disk fail with ENOSPC."""

import resource
import signal

from tests.conftest import TINY
from tests.server import ServerProcess, free_port, wait_job

REQUEST = {"model": TINY, "hooks": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], "context_size": 64,
           "dtype": "float32"}
UNLIMITED = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)


def _ignore_sigxfsz() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing


def test_a_full_disk_fails_the_jobs_with_its_reason_and_the_worker_survives(tmp_path):
    server = ServerProcess(store=tmp_path / "store", port=free_port(), env={"CACHE_SERVER_CHUNK_BYTES": str(64 << 10)})
    server.start(preexec_fn=_ignore_sigxfsz)
    pid = server.process.pid
    try:
        with server.client() as client:
            running = client.post("/v1/harvests", json={**REQUEST, "n_tokens": 200_000}).json()
            wait_job(client, running["job_id"], until=("running",))
            queued = client.post("/v1/harvests", json={**REQUEST, "n_tokens": 20_000}).json()
            assert queued["status"] == "queued"
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))  # the disk fills up
            for job_id in (running["job_id"], queued["job_id"]):  # not stuck queued behind a dead worker
                failed = wait_job(client, job_id, timeout=120, until=("failed", "completed"))
                assert failed["status"] == "failed" and failed["error"].startswith("the disk is full ("), failed
                assert "free some space" in failed["error"] and "this harvest needs about" in failed["error"]
            assert client.get("/health").json() == {"status": "ok", "skipped": []}
            upload = client.post("/v1/corpora", params={"name": "notes"}, content=b"some text " * 100)
            assert upload.status_code == 507 and upload.json()["detail"].startswith("the disk is full")

            resource.prlimit(pid, resource.RLIMIT_FSIZE, UNLIMITED)  # room again: no restart needed
            small = client.post("/v1/harvests", json={**REQUEST, "n_tokens": 4_000}).json()
            assert wait_job(client, small["job_id"])["status"] == "completed"
            retried = client.post("/v1/harvests", json={**REQUEST, "n_tokens": 20_000}).json()
            assert wait_job(client, retried["job_id"])["status"] == "completed"  # resumes the failed dataset
            assert client.post("/v1/corpora", params={"name": "notes"}, content=b"some text " * 100).status_code == 201
        leftovers = [p for p in (tmp_path / "store").rglob("*.partial")]
        assert leftovers == [], leftovers
    finally:
        server.stop()


def test_a_harvest_larger_than_the_free_space_is_refused_up_front(tmp_path):
    server = ServerProcess(store=tmp_path / "store", port=free_port(),
                           env={"CACHE_SERVER_MIN_FREE_BYTES": str(10**18)}).start()
    try:
        with server.client() as client:
            answer = client.post("/v1/harvests", json={**REQUEST, "n_tokens": 1_000})
            assert answer.status_code == 507
            detail = answer.json()["detail"]
            # rows x (two hooks x 64 floats x 4 bytes + the tokens' 12 bytes)
            assert detail.startswith(f"the harvest needs about {1_000 * (2 * 64 * 4 + 12):,} bytes and the store's disk has 0 free")
            assert client.get("/v1/datasets").json() == []  # nothing created
    finally:
        server.stop()


def test_a_job_refused_on_a_full_disk_is_not_left_queued(tmp_path):
    """507 means no job: after room is freed the same POST starts one, and it runs (was: 202 naming
    a job stuck 'queued' in memory, never on the worker's queue)."""
    from tests.test_evaluations import HOOK, identity_body, wait_evaluation
    from tests.test_features import wait_features

    server = ServerProcess(store=tmp_path / "store", port=free_port()).start(preexec_fn=_ignore_sigxfsz)
    try:
        with server.client() as client:
            harvest = {"model": TINY, "hooks": [HOOK], "n_tokens": 1024, "context_size": 32}
            dataset = wait_job(client, client.post("/v1/harvests", json=harvest).json()["job_id"])["dataset_id"]
            sae = client.post("/v1/saes", params={"dataset_id": dataset, "hook": HOOK}, content=identity_body()).json()
            resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))
            posts = {"features": lambda: client.post(f"/v1/saes/{sae['sae_id']}/features", params={"max_rows": 256}),
                     "evaluation": lambda: client.post("/v1/evaluations", json={"sae_id": sae["sae_id"], "n_tokens": 256}),
                     "harvest": lambda: client.post("/v1/harvests", json={**harvest, "n_tokens": 512})}
            for name, post in posts.items():
                assert post().status_code == 507, name
            resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, UNLIMITED)
            assert wait_features(client, posts["features"]().json()["sae_id"])["status"] == "completed"
            assert wait_evaluation(client, posts["evaluation"]().json()["evaluation_id"])["status"] == "completed"
            assert wait_job(client, posts["harvest"]().json()["job_id"])["status"] == "completed"
    finally:
        server.stop()
