"""Big corpora (issue 14): a submit answers at once, the job tokenises only as far as its harvest
needs, a block at a time, onto disk; a corpus that runs out fails the job with what to change."""

import json

import pytest

from cache_server.corpora.corpus_store import _builtin_text
from tests.conftest import TINY, TOKEN
from tests.server import ServerProcess, free_port, wait_job

REQUEST = {"model": TINY, "hooks": ["blocks.0.hook_resid_post"], "context_size": 32}


def upload(client, data: bytes, fmt: str = "text") -> str:
    blocks = (data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20))
    answer = client.post(f"/v1/corpora?name=big&format={fmt}", content=blocks)
    assert answer.status_code == 201, answer.text
    return answer.json()["corpus_id"]


def token_state(server, corpus_id: str) -> dict:
    (state,) = (server.store / "corpora" / "tokens").glob(f"{corpus_id}-*.json")
    return json.loads(state.read_text())


def test_a_big_corpus_is_tokenised_only_as_far_as_the_harvest_needs(server, client):
    corpus_id = upload(client, _builtin_text() * 20)  # 22 MB: ~5.8M tokens for this tokenizer
    answer = client.post("/v1/harvests", json={**REQUEST, "corpus": corpus_id, "n_tokens": 4096})
    assert answer.status_code == 202
    assert wait_job(client, answer.json()["job_id"])["status"] == "completed"
    state = token_state(server, corpus_id)
    assert not state["complete"] and state["byte_offset"] <= 1 << 20  # one read of text, not 22 MB
    manifest = client.get(f"/v1/datasets/{answer.json()['dataset_id']}").json()
    assert manifest["complete"] and manifest["n_items"] == 4096


@pytest.fixture(scope="module")
def unchecked(tmp_path_factory):
    """A server whose submits read none of a corpus (as for one too big to read at submit)."""
    proc = ServerProcess(store=tmp_path_factory.mktemp("unchecked") / "store", port=free_port(), token=TOKEN,
                         env={"CACHE_SERVER_CORPUS_CHECK_BYTES": "0"}).start()
    yield proc
    proc.stop()


def test_a_corpus_that_runs_out_fails_the_job_saying_what_to_change(server, unchecked):
    documents = b"\n".join(json.dumps({"text": f"document {i} has a few words in it."}).encode() for i in range(40))
    request = {**REQUEST, "n_tokens": 4096}
    with unchecked.client() as client:
        corpus_id = upload(client, documents, "jsonl")
        answer = client.post("/v1/harvests", json={**request, "corpus": corpus_id})
        assert answer.status_code == 202  # nothing read at submit: the job finds out
        job = wait_job(client, answer.json()["job_id"])
        assert job["status"] == "failed"
        for phrase in (f"corpus '{corpus_id}' fills at most", "rows for this model", "asked for n_tokens=4,096",
                       f"DELETE /v1/datasets/{answer.json()['dataset_id']} and ask for fewer"):
            assert phrase in job["error"], job["error"]
        assert token_state(unchecked, corpus_id)["complete"]
    with server.client() as client:  # a server that reads a small corpus at submit refuses it there
        corpus_id = upload(client, documents, "jsonl")
        refused = client.post("/v1/harvests", json={**request, "corpus": corpus_id})
        assert refused.status_code == 422 and "rows for this model" in refused.json()["detail"]


def test_a_corpus_bigger_than_the_memory_allowed_harvests_within_it(tmp_path):
    """160 MB of text, a server allowed 120 MB more than it holds when ready: the old whole-corpus
    tokenisation took ~6 GB for such a corpus; reading a block at a time stays within the limit."""
    server = ServerProcess(store=tmp_path / "store", port=free_port(), token=TOKEN).start()
    try:
        with server.client() as client:
            wait_job(client, client.post("/v1/harvests", json={**REQUEST, "n_tokens": 256}).json()["job_id"])
            ready = _rss_kb(server.process.pid, "VmRSS")
            with open(f"/proc/{server.process.pid}/clear_refs", "w") as refs:
                refs.write("5")  # the peak (VmHWM) counts from here
            corpus_id = upload(client, _builtin_text() * 150)
            answer = client.post("/v1/harvests", json={**REQUEST, "corpus": corpus_id, "n_tokens": 65_536})
            assert wait_job(client, answer.json()["job_id"])["status"] == "completed"
            assert _rss_kb(server.process.pid, "VmHWM") - ready < 120 * 1024
    finally:
        server.stop()


def _rss_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def test_a_parquet_dataset_bigger_than_the_memory_allowed_harvests_within_it(tmp_path):
    """160 MB of parquet in --corpora-dir, the same 120 MB allowance: read a row group at a time
    (``datasets``' streaming reader held ~1.3 GB over a ready server for a 1 GB file, measured)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = _builtin_text().decode().splitlines(keepends=True)
    group = pa.table({"text": ["".join(lines[i : i + 12]) for i in range(0, len(lines), 12)]})
    (tmp_path / "corpora" / "big").mkdir(parents=True)
    with pq.ParquetWriter(tmp_path / "corpora" / "big" / "train.parquet", group.schema, compression="none") as writer:
        for _ in range(150):
            writer.write_table(group)
    server = ServerProcess(store=tmp_path / "store", port=free_port(), token=TOKEN,
                           extra_args=["--corpora-dir", str(tmp_path / "corpora")]).start()
    try:
        with server.client() as client:
            wait_job(client, client.post("/v1/harvests", json={**REQUEST, "n_tokens": 256}).json()["job_id"])
            ready = _rss_kb(server.process.pid, "VmRSS")
            with open(f"/proc/{server.process.pid}/clear_refs", "w") as refs:
                refs.write("5")
            answer = client.post("/v1/harvests", json={**REQUEST, "corpus": {"hf": {"path": "big"}}, "n_tokens": 65_536})
            assert answer.status_code == 202, answer.text
            assert wait_job(client, answer.json()["job_id"])["status"] == "completed"
            assert _rss_kb(server.process.pid, "VmHWM") - ready < 120 * 1024
    finally:
        server.stop()
