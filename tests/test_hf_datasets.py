"""Hugging Face datasets as corpora (issue 18): a folder in --corpora-dir (save_to_disk output or
parquet files) is read a block of rows at a time into the same token stream as an uploaded JSONL
of the same documents; a column of token ids is used as it is; the corpus id covers the files."""

import json
import shutil

import numpy as np
import pytest

from cache_server.corpora.corpus_store import _builtin_text
from shared.schemas import DatasetManifest
from tests.conftest import TINY, TOKEN
from tests.server import ServerProcess, free_port, wait_job
from tests.test_bad_input import assert_refused
from tests.test_harvest_api import read_rows

REQUEST = {"model": TINY, "hooks": ["blocks.0.hook_resid_post"], "n_tokens": 4096, "context_size": 64}
LINES = _builtin_text().decode().splitlines(keepends=True)
DOCS = ["".join(LINES[i:i + 12]) for i in range(0, 2400, 12)]  # 200 documents, ~50k tokens


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("hf")
    corpora = root / "corpora"
    table = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    table.save_to_disk(str(corpora / "shakes-disk"))
    (corpora / "shakes-parquet").mkdir(parents=True)
    table.to_parquet(str(corpora / "shakes-parquet" / "train-00000-of-00001.parquet"))
    ids = [list(range(i, i + 50)) for i in range(0, 5000, 50)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": ids})}).save_to_disk(str(corpora / "org" / "ids"))
    bad = [[1, 2, 3]] * 10 + [[40_000]]
    datasets.Dataset.from_dict({"input_ids": bad}).save_to_disk(str(corpora / "bad-ids"))
    server = ServerProcess(store=root / "store", port=free_port(), token=TOKEN, env={"CACHE_SERVER_CHUNK_BYTES": "65536"},
                           extra_args=["--corpora-dir", str(corpora)]).start()
    yield server, corpora
    server.stop()


def harvest(client, corpus, **changes) -> DatasetManifest:
    answer = client.post("/v1/harvests", json={**REQUEST, "corpus": corpus, **changes})
    assert answer.status_code in (200, 202), answer.text
    if answer.json()["job_id"]:
        assert wait_job(client, answer.json()["job_id"])["status"] == "completed"
    return DatasetManifest.model_validate(client.get(f"/v1/datasets/{answer.json()['dataset_id']}").json())


def test_a_dataset_folder_gives_the_tokens_its_documents_give_as_jsonl(hf):
    server, _ = hf
    with server.client() as client:
        jsonl = "\n".join(json.dumps({"text": d}) for d in DOCS).encode()
        uploaded = client.post("/v1/corpora?format=jsonl&name=same", content=jsonl).json()["corpus_id"]
        expected = read_rows(client, (m := harvest(client, uploaded)), m.tokens, "tokens")
        for folder in ("shakes-disk", "shakes-parquet"):
            manifest = harvest(client, {"hf": {"path": folder}})
            assert manifest.prepend_bos  # text: a BOS, as for any text corpus
            assert np.array_equal(read_rows(client, manifest, manifest.tokens, "tokens"), expected), folder
        again = client.post("/v1/harvests", json={**REQUEST, "corpus": {"hf": {"path": "shakes-disk"}}})
        assert again.status_code == 200 and again.json()["status"] == "completed"  # a cache hit
        listed = {c["name"]: c for c in client.get("/v1/corpora").json()}
        assert listed["shakes-disk"]["format"] == "dataset" and listed["shakes-disk"]["source"]["kind"] == "disk"


def test_a_column_of_token_ids_is_used_as_it_is(hf):
    server, _ = hf
    with server.client() as client:
        manifest = harvest(client, {"hf": {"path": "org/ids", "column": "input_ids"}})
        assert not manifest.prepend_bos
        tokens = read_rows(client, manifest, manifest.tokens, "tokens")[:, 0]
        assert np.array_equal(tokens, np.arange(4096))


def test_a_changed_file_is_another_corpus(hf, tmp_path):
    import datasets

    server, corpora = hf
    with server.client() as client:
        first = harvest(client, {"hf": {"path": "shakes-parquet"}}, n_tokens=2048)
        shutil.copytree(corpora / "shakes-parquet", tmp_path / "kept")
        datasets.Dataset.from_dict({"text": DOCS[::-1]}).to_parquet(
            str(corpora / "shakes-parquet" / "train-00000-of-00001.parquet"))
        try:
            second = harvest(client, {"hf": {"path": "shakes-parquet"}}, n_tokens=2048)
            assert second.corpus_id != first.corpus_id and second.dataset_id != first.dataset_id
        finally:
            shutil.rmtree(corpora / "shakes-parquet")
            shutil.copytree(tmp_path / "kept", corpora / "shakes-parquet")


@pytest.mark.parametrize("corpus, status, phrases", [
    ({"hf": {"path": "shakes-disk", "column": "body"}}, 422, ["no column 'body'", "['n', 'text']"]),
    ({"hf": {"path": "org/ids", "split": "test"}}, 422, ["no split 'test'", "['train']"]),
    ({"hf": {"path": "nowhere"}}, 404, ["unknown dataset 'nowhere'", "--corpora-dir", "the hub is disabled"]),
    ({"hf": {"path": "../corpora/shakes-disk"}}, 422, ["path"]),
    ({"hf": {"path": "shakes-disk", "surprise": 1}}, 422, ["surprise"]),
    ({"hf": {"path": "bad-ids", "column": "input_ids"}}, 422, ["token id 40000", "vocabulary of 30522"]),
])
def test_what_each_bad_dataset_reference_gets(hf, corpus, status, phrases):
    server, _ = hf
    with server.client() as client:
        assert_refused(client.post("/v1/harvests", json={**REQUEST, "n_tokens": 256, "corpus": corpus}), status, *phrases)


def test_sae_train_and_the_pipeline_take_a_dataset_corpus(hf, tmp_path):
    from tests.test_trainer_e2e import sae_train_here
    from trainer.pipeline import main as pipeline

    server, _ = hf
    common = ["--cache-url", server.url, "--token", TOKEN, "--model", TINY, "--hook", "blocks.0.hook_resid_post"]
    for corpus in ("hf:shakes-disk", "hf:org/ids:train:input_ids"):
        done = sae_train_here(*common, "--corpus", corpus, "--harvest-tokens", "4096", "--context-size", "64",
                              "--tokens", "2048", "--batch-size", "256", "--no-progress", "--downstream-tokens", "0",
                              "--out", str(tmp_path / corpus.replace(":", "-").replace("/", "-")))
        assert done.returncode == 0, done.stderr
    bad = sae_train_here(*common, "--corpus", "hf:", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "use hf:PATH" in bad.stderr
    code = pipeline([*common, "--corpus", "hf:shakes-parquet", "--tokens", "8192", "--packing", "document",
                     "--train-tokens", "4096", "--downstream-tokens", "128", "--out", str(tmp_path / "pipeline")])
    assert code == 0
    run = json.loads((tmp_path / "pipeline" / "train" / "run.json").read_text())
    with server.client() as client:  # the report's contexts came from one-document windows
        assert client.get(f"/v1/datasets/{run['dataset_id']}").json()["packing"] == "document"


def _hub_reachable() -> bool:
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info("stas/openwebtext-10k", timeout=3)
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _hub_reachable(), reason="no Hugging Face hub reachable from here")
def test_a_hub_dataset_streams_at_its_resolved_commit(tmp_path):
    server = ServerProcess(store=tmp_path / "store", port=free_port(), hub=True, env={"HF_HUB_OFFLINE": "0"}).start()
    try:
        with server.client() as client:
            manifest = harvest(client, {"hf": {"path": "stas/openwebtext-10k"}}, n_tokens=2048)
            corpus = next(c for c in client.get("/v1/corpora").json() if c["corpus_id"] == manifest.corpus_id)
            assert corpus["source"]["kind"] == "hub" and len(corpus["source"]["fingerprint"]) == 40
    finally:
        server.stop()
