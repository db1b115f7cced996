"""The harvest service end to end over real HTTP: harvest, manifest, chunks, zarr, cache hits."""

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import FsspecStore

from shared.codec import decode_chunk, to_torch
from shared.reshape import reshape_hook
from shared.schemas import DatasetManifest, HookSpec
from tests.conftest import TINY
from tests.server import wait_job

HOOKS = ["blocks.1.hook_resid_post", {"name": "blocks.0.attn.hook_z", "concat_dims": 2}]
REQUEST = {"model": TINY, "hooks": HOOKS, "n_tokens": 3000, "context_size": 64, "dtype": "float16", "batch_size": 8}


@pytest.fixture(scope="module")
def dataset(server):
    with server.client() as client:
        r = client.post("/v1/harvests", json=REQUEST)
        assert r.status_code == 202, r.text
        body = r.json()
        job = wait_job(client, body["job_id"])
        assert job["status"] == "completed", job
        manifest = DatasetManifest.model_validate(client.get(f"/v1/datasets/{body['dataset_id']}").json())
    return body, job, manifest


def read_rows(client, manifest: DatasetManifest, array, route: str) -> np.ndarray:
    parts = []
    for i in range(manifest.n_chunks):
        r = client.get(f"/v1/datasets/{manifest.dataset_id}/{route}/chunks/{i}")
        assert r.status_code == 200, r.text
        assert r.headers["etag"] and r.headers["x-chunk-codec"].startswith(array.codec.name)
        assert r.headers["x-chunk-codec"].startswith("zstd" if route == "tokens" else "none")
        parts.append(decode_chunk(r.content, array, manifest.chunk_rows, manifest.rows_in_chunk(i)))
    return np.concatenate(parts)


def test_job_reports_progress_and_manifest_describes_the_store(dataset):
    body, job, manifest = dataset
    assert job["tokens_done"] == job["tokens_total"] == 3000
    assert job["tokens_per_second"] > 0 and job["eta_seconds"] == 0
    assert manifest.complete and manifest.n_items == manifest.n_items_total == 3000
    assert manifest.chunk_rows % 64 == 0 and manifest.n_chunks == -(-3000 // manifest.chunk_rows) > 1
    widths = {h.name: h.d for h in manifest.hooks}
    assert widths == {"blocks.0.attn.hook_z": 64, "blocks.1.hook_resid_post": 64}  # 4 heads x 16 concatenated
    assert all(h.stats.count == 3000 for h in manifest.hooks)


def test_same_request_again_is_a_cache_hit(client, dataset):
    body, job, manifest = dataset
    reordered = {**REQUEST, "hooks": list(reversed(HOOKS)), "batch_size": 4}  # neither changes the data
    r = client.post("/v1/harvests", json=reordered)
    assert r.status_code == 200
    assert r.json() == {"job_id": body["job_id"], "dataset_id": body["dataset_id"], "status": "completed"}
    assert len([j for j in client.get("/v1/harvests").json() if j["dataset_id"] == body["dataset_id"]]) == 1
    other = client.post("/v1/harvests", json={**REQUEST, "dtype": "float32"})
    assert other.status_code == 202 and other.json()["dataset_id"] != body["dataset_id"]
    wait_job(client, other.json()["job_id"])


def test_rows_are_the_model_activations_aligned_across_hooks(client, dataset):
    """Recompute the stored rows from the stored token ids with the model itself."""
    _, _, manifest = dataset
    tokens = read_rows(client, manifest, manifest.tokens, "tokens")
    assert tokens.shape == (3000, 3)
    seq, pos = tokens[:, 1], tokens[:, 2]
    assert np.array_equal(seq, np.arange(3000) // 64) and np.array_equal(pos, np.arange(3000) % 64)
    assert np.all(tokens[pos == 0, 0] == 101)  # every sequence starts with CLS (the BOS here)

    from cache_server.models import ModelRegistry

    model = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(TINY)
    n_seq = 3000 // 64
    windows = torch.from_numpy(tokens[: n_seq * 64, 0].reshape(n_seq, 64)).long()
    specs = [HookSpec(name="blocks.0.attn.hook_z", concat_dims=2), HookSpec(name="blocks.1.hook_resid_post")]
    cache = model.run(windows, specs)
    for spec in specs:
        stored = to_torch(read_rows(client, manifest, manifest.hook(spec.name), f"hooks/{spec.name}"), "float16")
        expected = reshape_hook(cache[spec.name], spec.concat_dims)
        torch.testing.assert_close(stored[: n_seq * 64].float(), expected.half().float(), atol=2e-3, rtol=2e-3)
        stats = manifest.hook(spec.name).stats
        mean = client.get(f"/v1/datasets/{manifest.dataset_id}/hooks/{spec.name}/mean").json()
        np.testing.assert_allclose(mean, stored.double().mean(0).numpy(), rtol=1e-6, atol=1e-9)
        assert stats.mean_norm == pytest.approx(stored.double().norm(dim=1).mean().item(), rel=1e-9)
    # The manifest stays small (no per-dimension vectors); the list shows each hook's width (issue 16).
    assert len(client.get(f"/v1/datasets/{manifest.dataset_id}").content) < 4096
    summary = next(d for d in client.get("/v1/datasets").json() if d["dataset_id"] == manifest.dataset_id)
    assert summary["d"] == {h.name: h.d for h in manifest.hooks}
    assert client.get(f"/v1/datasets/{manifest.dataset_id}/hooks/blocks.7.nope/mean").status_code == 404


def test_stock_zarr_client_reads_the_store_over_http(server, client, dataset):
    _, _, manifest = dataset
    group = zarr.open_group(FsspecStore.from_url(f"{server.url}/zarr/{manifest.dataset_id}/", read_only=True), mode="r")
    assert sorted(group.array_keys()) == sorted([h.name for h in manifest.hooks] + ["tokens"])
    assert group.attrs["manifest"]["dataset_id"] == manifest.dataset_id
    array = group["blocks.1.hook_resid_post"]
    assert array.shape == (3000, 64) and array.dtype == np.float16
    via_api = read_rows(client, manifest, manifest.hook("blocks.1.hook_resid_post"), "hooks/blocks.1.hook_resid_post")
    assert np.array_equal(array[:], via_api)


def test_chunk_etag_supports_conditional_get(client, dataset):
    _, _, manifest = dataset
    url = f"/v1/datasets/{manifest.dataset_id}/hooks/blocks.1.hook_resid_post/chunks/0"
    etag = client.get(url).headers["etag"]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304


def test_listings_and_metrics(client, dataset):
    body, _, manifest = dataset
    assert any(d["dataset_id"] == manifest.dataset_id and d["complete"] for d in client.get("/v1/datasets").json())
    corpora = client.get("/v1/corpora").json()
    assert corpora[0]["builtin"] and corpora[0]["name"] == "tiny-shakespeare"
    metrics = client.get("/metrics").text
    assert "harvest_tokens_total" in metrics and 'chunks_served_total{api="v1"}' in metrics
    assert client.get("/docs").status_code == 200 and "/v1/harvests" in client.get("/openapi.json").text


def test_uploaded_corpora_are_content_addressed_and_harvestable(client):
    text = ("The quick brown fox jumps over the lazy dog. " * 400).encode()
    r = client.post("/v1/corpora?name=fox", content=text, headers={"content-type": "text/plain"})
    assert r.status_code == 201, r.text
    info = r.json()
    assert client.post("/v1/corpora?name=fox-again", content=text).json()["corpus_id"] == info["corpus_id"]
    jsonl = b'{"text": "one document"}\n{"text": "another document"}\n' * 200
    r2 = client.post("/v1/corpora?name=docs&format=jsonl", content=jsonl)
    assert r2.status_code == 201 and r2.json()["format"] == "jsonl"
    for corpus in (info["corpus_id"], r2.json()["corpus_id"]):
        job = client.post("/v1/harvests", json={**REQUEST, "corpus": corpus, "n_tokens": 500}).json()
        assert wait_job(client, job["job_id"])["status"] == "completed"


def test_cancel_and_delete(client):
    r = client.post("/v1/harvests", json={**REQUEST, "n_tokens": 60000, "dtype": "bfloat16"})
    job_id, dataset_id = r.json()["job_id"], r.json()["dataset_id"]
    busy = client.delete(f"/v1/datasets/{dataset_id}")  # its harvest queued or running: refused (issue 14)
    assert busy.status_code == 409 and "cancel its job first" in busy.json()["detail"]
    assert client.delete(f"/v1/harvests/{job_id}").json()["status"] in ("cancelled", "running")
    job = wait_job(client, job_id)
    assert job["status"] == "cancelled"
    assert client.delete(f"/v1/harvests/{job_id}").status_code == 409
    manifest = client.get(f"/v1/datasets/{dataset_id}").json()
    assert not manifest["complete"] and manifest["n_items"] < 60000
    # Readers see exactly the committed rows: zarr's shape stops there, the next chunk is absent.
    meta = client.get(f"/zarr/{dataset_id}/blocks.1.hook_resid_post/zarr.json").json()
    assert meta["shape"] == [manifest["n_items"], 64]
    next_chunk = f"/v1/datasets/{dataset_id}/hooks/blocks.1.hook_resid_post/chunks/{manifest['n_chunks']}"
    assert client.get(next_chunk).status_code == 404
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    assert client.get(f"/v1/datasets/{dataset_id}").status_code == 404
