"""Packing documents into windows (issue 18): back to back (the default), or one document per
window, its padding masked in the forward pass and stored as no row."""

import json

import numpy as np
import pytest
import torch

from cache_server.corpora.tokens import CorpusTokens
from shared.codec import to_torch
from shared.schemas import DatasetManifest, HookSpec
from tests.conftest import TINY
from tests.server import wait_job
from tests.test_evaluations import identity_body, wait_evaluation
from tests.test_harvest_api import read_rows

HOOK = "blocks.1.hook_resid_post"
CONTEXT = 16
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


def documents(n: int = 60, seed: int = 0) -> list[str]:
    """Documents of 0 to ~40 tokens: empty ones, ones shorter than a window, ones over two."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(0, 40)))) for _ in range(n)]


def upload_jsonl(client, docs: list[str]) -> str:
    body = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    answer = client.post("/v1/corpora?name=docs&format=jsonl", content=body)
    assert answer.status_code == 201, answer.text
    return answer.json()["corpus_id"]


def harvest(client, request: dict) -> DatasetManifest:
    answer = client.post("/v1/harvests", json=request)
    assert answer.status_code in (200, 202), answer.text  # 200: a cache hit
    job = wait_job(client, answer.json()["job_id"])
    assert job["status"] == "completed", job
    return DatasetManifest.model_validate(client.get(f"/v1/datasets/{job['dataset_id']}").json())


def expected_windows(tokenizer, docs: list[str], bos: int, body: int) -> list[list[int]]:
    """Each document tokenised alone, cut into windows of ``body`` tokens, each led by BOS."""
    out = []
    for text in docs:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out += [[bos, *ids[i : i + body]] for i in range(0, len(ids), body)]
    return out


@pytest.mark.parametrize("model_name", [TINY, "all-MiniLM-L6-v2"])  # causal, and an encoder (both ways)
def test_one_document_per_window_stores_no_padding_and_matches_each_window_alone(client, model_name):
    from cache_server.models import ModelRegistry

    docs = documents()
    corpus_id = upload_jsonl(client, docs)
    request = {"model": model_name, "hooks": [HOOK], "corpus": corpus_id, "n_tokens": 700, "context_size": CONTEXT,
               "dtype": "float32", "packing": "document", "batch_size": 8}
    manifest = harvest(client, request)
    assert manifest.packing == "document" and manifest.n_items == 700 and manifest.n_chunks > 1
    tokens = read_rows(client, manifest, manifest.tokens, "tokens")
    starts = tokens[manifest.chunk_rows :: manifest.chunk_rows, 2]
    assert (starts != 0).any()  # a chunk may start inside a window: its rows run on across chunks
    stored = to_torch(read_rows(client, manifest, manifest.hook(HOOK), f"hooks/{HOOK}"), "float32")
    model = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(model_name)
    windows = expected_windows(model.tokenizer, docs, model.bos_token_id, CONTEXT - 1)
    lengths = np.cumsum([len(w) for w in windows])
    n_windows = int(np.searchsorted(lengths, 700)) + 1
    assert np.array_equal(tokens[:, 0], np.concatenate(windows[:n_windows])[:700])  # no padding, no separator
    assert np.array_equal(tokens[:, 1], np.repeat(np.arange(n_windows), [len(w) for w in windows[:n_windows]])[:700])
    assert np.array_equal(tokens[:, 2], np.concatenate([np.arange(len(w)) for w in windows[:n_windows]])[:700])
    assert any(len(w) < CONTEXT for w in windows[:n_windows]) and any(len(w) == CONTEXT for w in windows[:n_windows])
    expected = torch.cat([model.run(torch.tensor([w]), [HookSpec(name=HOOK)])[HOOK][0] for w in windows[:n_windows]])
    torch.testing.assert_close(stored, expected[:700], atol=1e-4, rtol=1e-4)  # each window alone, unpadded


def test_packing_is_part_of_the_dataset_id_and_back_to_back_stays_the_default(client):
    corpus_id = upload_jsonl(client, documents(seed=1))
    base = {"model": TINY, "hooks": [HOOK], "corpus": corpus_id, "n_tokens": 256, "context_size": CONTEXT}
    concatenated = harvest(client, base)
    assert concatenated.packing == "concatenate"
    assert harvest(client, {**base, "packing": "concatenate"}).dataset_id == concatenated.dataset_id
    packed = harvest(client, {**base, "packing": "document"})
    assert packed.dataset_id != concatenated.dataset_id
    again = client.post("/v1/harvests", json={**base, "packing": "document"}).json()
    assert again["dataset_id"] == packed.dataset_id and again["status"] == "completed"  # a cache hit
    tokens = read_rows(client, concatenated, concatenated.tokens, "tokens")
    assert np.array_equal(tokens[:, 2], np.tile(np.arange(CONTEXT), 256 // CONTEXT))  # every window full
    refused = client.post("/v1/harvests", json={**base, "packing": "shuffled"})
    assert refused.status_code == 422 and "packing" in refused.text


def test_a_corpus_too_short_for_document_windows_is_refused_with_its_row_count(client):
    corpus_id = upload_jsonl(client, ["one two three", "four five"])  # 2 windows: 4 + 3 rows with BOS
    refused = client.post("/v1/harvests", json={"model": TINY, "hooks": [HOOK], "corpus": corpus_id, "n_tokens": 40,
                                                "context_size": CONTEXT, "packing": "document"})
    assert refused.status_code == 422, refused.text
    assert "fills at most 7 rows" in refused.json()["detail"] and "packing 'document'" in refused.json()["detail"]


def test_evaluation_of_a_document_packed_dataset_reads_past_its_last_window(client):
    docs = documents(n=200, seed=2)
    corpus_id = upload_jsonl(client, docs)
    manifest = harvest(client, {"model": TINY, "hooks": [HOOK], "corpus": corpus_id, "n_tokens": 300,
                                "context_size": CONTEXT, "packing": "document"})
    sae = client.post("/v1/saes", params={"dataset_id": manifest.dataset_id, "hook": HOOK}, content=identity_body(64))
    assert sae.status_code == 201, sae.text
    job = wait_evaluation(client, client.post("/v1/evaluations", json={"sae_id": sae.json()["sae_id"],
                                                                       "n_tokens": 64}).json()["evaluation_id"])
    assert job["status"] == "completed", job
    tokens = read_rows(client, manifest, manifest.tokens, "tokens")
    last_window_tokens = tokens[tokens[:, 1] == tokens[-1, 1], 0][1:]  # BOS left out
    first = job["result"]["first_token"]
    from cache_server.models import ModelRegistry

    model = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(TINY)
    stream = []
    for i, text in enumerate(docs):
        stream += ([model.separator_token_id] if i else []) + model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert stream[first - len(last_window_tokens) : first] == last_window_tokens.tolist()


def test_the_document_table_follows_the_stream_and_is_cut_back_after_a_crash(tmp_path):
    from cache_server.models import _minilm_tokenizer

    tokenizer = _minilm_tokenizer()
    docs = documents(n=300, seed=3)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stream = CorpusTokens(corpus, "jsonl", tmp_path / "tokens", "k", tokenizer, separator=102)
    stream.ensure(None)
    table, open_start = stream.documents()
    tokens = stream.array(stream.ensure(None)[0])
    assert open_start is None and len(table) == len(docs)
    for (start, end), text in zip(table, docs):
        assert tokens[start:end].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    with stream.docs_path.open("ab") as f:  # a crash after the table's write, before the state's
        f.write(np.array([7, 9], dtype=np.int64).tobytes())
    again = CorpusTokens(corpus, "jsonl", tmp_path / "tokens", "k", tokenizer, separator=102)
    again.ensure(None)
    assert np.array_equal(again.documents()[0], table)

    text = tmp_path / "book.txt"
    text.write_text("line of a book\n" * 100_000)  # more than one read (READ_BYTES)
    book = CorpusTokens(text, "text", tmp_path / "tokens", "b", tokenizer, separator=102)
    book.ensure(1000)
    table, open_start = book.documents()
    assert len(table) == 0 and open_start == 0  # one document, not finished: its tokens so far are open
    have, complete = book.ensure(None)
    table, open_start = book.documents()
    assert complete and open_start is None and table.tolist() == [[0, have]]
