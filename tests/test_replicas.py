"""One harvest split between two server replicas on one bucket, one of them killed and restarted
mid-harvest: the dataset equals a single harvester's, row for row and statistic for statistic."""

import json
import time

import pytest

from tests.server import ServerProcess, assert_same_as_single_harvest, free_port, wait_job
from tests.test_s3_store import CHUNKS, REQUEST, bucket_server

SHARED = {**REQUEST, "n_tokens": 14_000}  # its own dataset


def replica(tmp_path, env, name: str):
    server = bucket_server(tmp_path / name, env, prefix="shared", extra=("--replica", name))
    server.env["CACHE_SERVER_LEASE_SECONDS"] = "5"
    return server


@pytest.mark.slow
def test_two_replicas_one_restarted_harvest_what_one_server_harvests(server, bucket, tmp_path):
    env, s3 = bucket
    a, b = replica(tmp_path, env, "a").start(), replica(tmp_path, env, "b").start()
    try:
        with a.client() as ca, b.client() as cb:
            for c, n in ((ca, 640), (cb, 704)):  # the model loaded on both first, so that both take part
                assert wait_job(c, c.post("/v1/harvests", json={**SHARED, "n_tokens": n}).json()["job_id"])
            job_a = ca.post("/v1/harvests", json=SHARED).json()
            job_b = cb.post("/v1/harvests", json=SHARED).json()
            dataset_id = job_a["dataset_id"]
            assert job_b["dataset_id"] == dataset_id and job_b["job_id"], (job_a, job_b)
            key = f"shared/_harvest/{dataset_id}/ledger.json"

            def b_did_work() -> bool:
                try:
                    ranges = json.loads(s3.get_object(Bucket="acts", Key=key)["Body"].read())["ranges"]
                except s3.exceptions.NoSuchKey:  # not created yet
                    return False
                return any(r["owner"] == "b" and r["done"] > 0 for r in ranges)

            deadline = time.monotonic() + 120
            while not b_did_work():  # kill b once it has harvested chunks of its own
                assert time.monotonic() < deadline, "replica b took no part in the harvest"
                time.sleep(0.02)
            b.kill()
        b = replica(tmp_path, env, "b").start()  # picks its job up again at start-up
        with a.client() as ca, b.client() as cb:
            assert wait_job(ca, job_a["job_id"])["status"] == "completed"
            assert wait_job(cb, job_b["job_id"])["status"] == "completed"
            for c in (ca, cb):  # both replicas serve what one server harvests
                assert assert_same_as_single_harvest(server, c, SHARED) == dataset_id
            # a delete through one replica: the other stops serving its cached manifest (issue 14)
            assert ca.delete(f"/v1/datasets/{dataset_id}").status_code == 204
            deadline = time.monotonic() + 10
            while cb.get(f"/v1/datasets/{dataset_id}").status_code != 404:
                assert time.monotonic() < deadline, "replica b still serves a deleted dataset"
                time.sleep(0.1)
            assert cb.get(f"/v1/datasets/{dataset_id}/hooks/blocks.1.hook_resid_post/chunks/0").status_code == 404
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
def test_a_replica_that_never_returns_loses_its_ranges_on_a_shared_folder(server, tmp_path):
    """Two replicas on one store folder; b is killed for good, a takes b's ranges over once b's
    lease runs out, and the dataset still equals a single server's."""
    request = {**SHARED, "n_tokens": 24_000}
    shared = tmp_path / "shared-store"
    a, b = (ServerProcess(store=shared, port=free_port(), env={**CHUNKS, "CACHE_SERVER_LEASE_SECONDS": "3"},
                          extra_args=["--replica", name]).start() for name in ("a", "b"))
    try:
        with a.client() as ca, b.client() as cb:
            for c, n in ((ca, 640), (cb, 704)):  # the model loaded on both first, so that both take part
                assert wait_job(c, c.post("/v1/harvests", json={**request, "n_tokens": n}).json()["job_id"])
            job_a = ca.post("/v1/harvests", json=request).json()
            job_b = cb.post("/v1/harvests", json=request).json()
            assert job_a["job_id"] and job_b["job_id"], (job_a, job_b)
            ledger_file = shared / "datasets" / "_harvest" / job_a["dataset_id"] / "ledger.json"
            def b_holds_work() -> bool:
                ledger = json.loads(ledger_file.read_text()) if ledger_file.exists() else {"ranges": []}
                return any(r["owner"] == "b" and r["first"] + r["done"] < r["stop"] for r in ledger["ranges"])

            while not b_holds_work():
                time.sleep(0.01)
            b.kill()
            unfinished = [i for i, r in enumerate(json.loads(ledger_file.read_text())["ranges"])
                          if r["owner"] == "b" and r["first"] + r["done"] < r["stop"]]
            assert unfinished  # b died holding work
            assert wait_job(ca, job_a["job_id"])["status"] == "completed"
            ranges = json.loads(ledger_file.read_text())["ranges"]
            assert all(ranges[i]["owner"] == "a" for i in unfinished)  # taken over once b's lease ran out
            assert assert_same_as_single_harvest(server, ca, request) == job_a["dataset_id"]
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("where", ["disk", "bucket"])
def test_conditional_writes_let_one_writer_win(where, bucket, tmp_path, monkeypatch):
    """The compare-and-swap the replicas coordinate with, on both kinds of store."""
    from cache_server.store.dataset_store import DatasetStore

    env, _ = bucket
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    store = DatasetStore(tmp_path / "datasets" if where == "disk" else "s3://acts/conditional")
    cas = store.conditional
    assert cas.read("_harvest/x/ledger.json") == (None, None)
    assert cas.write("_harvest/x/ledger.json", b"first", None)
    assert not cas.write("_harvest/x/ledger.json", b"second", None)  # create-only: the first one won
    data, version = cas.read("_harvest/x/ledger.json")
    assert data == b"first"
    assert cas.write("_harvest/x/ledger.json", b"third", version)
    assert not cas.write("_harvest/x/ledger.json", b"stale", version)  # someone wrote since we read
    assert cas.read("_harvest/x/ledger.json")[0] == b"third"


def test_a_replica_starting_a_job_leaves_the_files_another_is_writing(tmp_path):
    """Issue 37: the second replica starting its job removed the first's in-flight .partial chunk
    files and failed its rename. Replicas now remove only temp files older than a lease."""
    import os
    import time

    from cache_server.store.dataset_store import DatasetStore

    store = DatasetStore(tmp_path / "datasets")
    folder = tmp_path / "datasets" / "0123456789abcdef01234567" / "blocks.0.hook_resid_post" / "c" / "3"
    folder.mkdir(parents=True)
    writing, orphan = folder / "0.1a2b.partial", folder / "0.9f8e.partial"
    writing.write_bytes(b"in flight")
    orphan.write_bytes(b"left by a killed writer")
    os.utime(orphan, (time.time() - 120, time.time() - 120))
    assert store.remove_partial_writes("0123456789abcdef01234567", older_than=60) == 1
    assert writing.exists() and not orphan.exists()
    assert store.remove_partial_writes("0123456789abcdef01234567") == 1 and not writing.exists()  # a lone server: all
