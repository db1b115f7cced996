"""One harvest split between two server replicas on one bucket, one of them killed and restarted
mid-harvest: the dataset equals a single harvester's, row for row and statistic for statistic."""

import json
import time

import pytest

from tests.server import wait_job
from tests.test_s3_store import REQUEST, bucket_server

SHARED = {**REQUEST, "n_tokens": 28_000}  # its own dataset


def replica(tmp_path, env, name: str):
    server = bucket_server(tmp_path / name, env, prefix="shared", extra=("--replica", name))
    server.env["CACHE_SERVER_LEASE_SECONDS"] = "5"
    return server


@pytest.mark.timeout(900)
def test_two_replicas_one_restarted_harvest_what_one_server_harvests(server, bucket, tmp_path):
    env, s3 = bucket
    a, b = replica(tmp_path, env, "a").start(), replica(tmp_path, env, "b").start()
    try:
        with a.client() as ca, b.client() as cb:
            job_a = ca.post("/v1/harvests", json=SHARED).json()
            job_b = cb.post("/v1/harvests", json=SHARED).json()
            dataset_id = job_a["dataset_id"]
            assert job_b["dataset_id"] == dataset_id and job_b["job_id"]
            # Kill b once it has done some of the work (its ranges' chunks count in everyone's job).
            while cb.get(f"/v1/harvests/{job_b['job_id']}").json()["tokens_done"] < 4_000:
                time.sleep(0.05)
            b.kill()
        b = replica(tmp_path, env, "b").start()  # picks its job up again at start-up
        with a.client() as ca, b.client() as cb:
            assert wait_job(ca, job_a["job_id"])["status"] == "completed"
            assert wait_job(cb, job_b["job_id"])["status"] == "completed"
            manifests = [c.get(f"/v1/datasets/{dataset_id}").json() for c in (ca, cb)]
            ledger = json.loads(s3.get_object(Bucket="acts", Key=f"shared/_harvest/{dataset_id}/ledger.json")["Body"].read())
            assert {r["owner"] for r in ledger["ranges"]} == {"a", "b"}  # both did part of it
            with server.client() as local:
                single = local.post("/v1/harvests", json=SHARED).json()
                if single["job_id"]:
                    assert wait_job(local, single["job_id"])["status"] == "completed"
                reference = local.get(f"/v1/datasets/{dataset_id}").json()
                for manifest in manifests:
                    assert manifest["complete"] and manifest["n_items"] == SHARED["n_tokens"]
                    assert manifest["hooks"] == reference["hooks"]  # statistics to the last bit
                for array in [f"hooks/{h}" for h in SHARED["hooks"]] + ["tokens"]:
                    for index in range(reference["n_chunks_total"]):
                        path = f"/v1/datasets/{dataset_id}/{array}/chunks/{index}"
                        assert ca.get(path).content == local.get(path).content, path
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("where", ["disk", "bucket"])
def test_conditional_writes_let_one_writer_win(where, bucket, tmp_path, monkeypatch):
    """The compare-and-swap the replicas coordinate with, on both kinds of store."""
    from cache_server.store import DatasetStore

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
