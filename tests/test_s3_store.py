"""The store in an S3 bucket: a real S3 wire protocol on 127.0.0.1 (moto's server), the same API,
the same bytes as a store on disk, and the same resume after SIGKILL."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr
from zarr.storage import FsspecStore

from tests.conftest import TINY
from tests.server import ServerProcess, assert_same_as_single_harvest, free_port, kill_mid_harvest, wait_job
from trainer.data.client import CacheClient, StoreReader
from trainer.data.stream import ChunkStream

REQUEST = {"model": TINY, "hooks": ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"],
           "n_tokens": 16_000, "context_size": 64, "batch_size": 8}
CHUNKS = {"CACHE_SERVER_CHUNK_BYTES": str(64 * 1024)}  # as the session server


def bucket_server(state: Path, env: dict, prefix: str = "caches", extra: tuple[str, ...] = ()) -> ServerProcess:
    # --store and --state-dir given last win over ServerProcess's own --store (argparse keeps the last)
    return ServerProcess(store=state, port=free_port(), env={**env, **CHUNKS},
                         extra_args=["--store", f"s3://acts/{prefix}", "--state-dir", str(state), *extra])


def assert_bucket_stream_equals_server_stream(server, dataset_id, env, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with CacheClient(server.url) as client:
        manifest = client.manifest(dataset_id)
        batches = []
        for source in (client, StoreReader.for_manifest(manifest)):
            stream = ChunkStream(source, manifest, REQUEST["hooks"], batch_size=500, window_rows=2000, eval_chunks=2)
            batches.append([b for _, b in zip(range(6), stream.batches())])
        for via_server, via_bucket in zip(*batches, strict=True):
            assert torch.equal(via_server.activations, via_bucket.activations)
            assert torch.equal(via_server.row_ids, via_bucket.row_ids)


@pytest.mark.slow
def test_a_harvest_into_a_bucket_survives_sigkill_and_equals_one_on_disk(server, bucket, tmp_path, monkeypatch):
    env, s3 = bucket
    job = kill_mid_harvest(bucket_server(tmp_path / "state", env).start(), REQUEST, after_tokens=4_000)
    job_id, dataset_id = job["job_id"], job["dataset_id"]

    restarted = bucket_server(tmp_path / "state", env).start()
    try:
        with restarted.client() as client:
            assert wait_job(client, job_id)["status"] == "completed"  # picked up again at start-up
            assert [d["dataset_id"] for d in client.get("/v1/datasets").json()] == [dataset_id]
            assert assert_same_as_single_harvest(server, client, REQUEST) == dataset_id  # the one on disk
            manifest = client.get(f"/v1/datasets/{dataset_id}").json()
            # The stored objects are in the bucket, under the prefix.
            keys = {o["Key"] for o in s3.list_objects_v2(Bucket="acts", Prefix="caches/")["Contents"]}
            assert f"caches/{dataset_id}/zarr.json" in keys
            assert f"caches/{dataset_id}/tokens/c/0/0" in keys
            # A stock zarr client reads the bucket-backed dataset through the server, as on disk.
            group = zarr.open_group(FsspecStore.from_url(f"{restarted.url}/zarr/{dataset_id}/", read_only=True), mode="r")
            tokens = group["tokens"][:]
            assert tokens.shape == (REQUEST["n_tokens"], 3) and tokens[-1, 2] == (REQUEST["n_tokens"] - 1) % 64
            # A trainer with read credentials streams the same rows straight from the bucket.
            assert manifest["store_url"] == f"s3://acts/caches/{dataset_id}"
            assert_bucket_stream_equals_server_stream(restarted, dataset_id, env, monkeypatch)
            out = tmp_path / "run"
            result = subprocess.run([sys.executable, "-m", "trainer", "--cache-url", restarted.url, "--dataset",
                                     dataset_id, "--hook", REQUEST["hooks"][1], "--from-bucket", "--tokens", "5120",
                                     "--batch-size", "256", "--out", str(out), "--no-progress", "--downstream-tokens", "0"],
                                    capture_output=True, text=True, timeout=300, env={**os.environ, **env})
            assert result.returncode == 0, result.stderr[-2000:]
            assert json.loads((out / "eval.json").read_text())[0]["tokens"] == 5120  # trained, evaluated, exported
            # Deleting a dataset deletes its objects, once the SAEs the trainer registered on it are gone.
            assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 409
            for sae in client.get("/v1/saes").json():
                assert sae["dataset_id"] != dataset_id or client.delete(f"/v1/saes/{sae['sae_id']}").status_code == 204
            assert client.delete(f"/v1/datasets/{dataset_id}").status_code in (200, 204)
            assert "Contents" not in s3.list_objects_v2(Bucket="acts", Prefix=f"caches/{dataset_id}/")
    finally:
        restarted.stop()


def test_an_unreachable_bucket_is_one_line_at_start(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cache_server", "--store", "s3://acts/x", "--state-dir", str(tmp_path),
         "--port", str(free_port())], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
             "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1",
             "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert result.stderr.startswith("cache-server: error: cannot use store s3://acts/x")
    assert "Traceback" not in result.stderr
