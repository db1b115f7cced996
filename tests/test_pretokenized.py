"""Pre-tokenized corpora (issue 18): an uploaded .npy of token ids is harvested as it is (no
tokenizer, no separator, no BOS unless asked), checked against the model's vocabulary."""

import io

import numpy as np
import pytest

from shared.schemas import DatasetManifest
from tests.conftest import TINY
from tests.server import wait_job
from tests.test_bad_input import assert_refused
from tests.test_harvest_api import read_rows

VOCABULARY = 30522  # tiny-random-gpt's (MiniLM's tokenizer)
REQUEST = {"model": TINY, "hooks": ["blocks.0.hook_resid_post"], "n_tokens": 640, "context_size": 32}


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def upload(client, array: np.ndarray):
    return client.post("/v1/corpora?name=ids&format=npy", content=npy(array))


@pytest.mark.parametrize("dtype, shape", [(np.int32, (3000,)), (np.int64, (30, 100))])
def test_token_ids_are_harvested_as_they_are(client, dtype, shape):
    ids = np.random.default_rng(0).integers(0, VOCABULARY, size=shape).astype(dtype)
    answer = upload(client, ids)
    assert answer.status_code == 201, answer.text
    info = answer.json()
    assert info["format"] == "npy" and info["n_tokens"] == ids.size and info["max_token_id"] == int(ids.max())
    for prepend_bos, body in ((None, 32), (True, 31)):  # unset: no BOS for ids
        request = {**REQUEST, "corpus": info["corpus_id"], **({} if prepend_bos is None else {"prepend_bos": True})}
        job = wait_job(client, client.post("/v1/harvests", json=request).json()["job_id"])
        assert job["status"] == "completed", job
        manifest = DatasetManifest.model_validate(client.get(f"/v1/datasets/{job['dataset_id']}").json())
        assert manifest.prepend_bos is bool(prepend_bos)
        tokens = read_rows(client, manifest, manifest.tokens, "tokens")[:, 0].reshape(-1, 32)
        expected = ids.reshape(-1)[: 20 * body].reshape(20, body)
        assert np.array_equal(tokens[:, 32 - body:], expected)
        if prepend_bos:
            assert np.all(tokens[:, 0] == 101)


def test_ids_outside_the_vocabulary_or_too_few_are_refused_at_submit(client):
    ids = np.arange(600, dtype=np.int64)
    ids[7] = VOCABULARY + 5
    corpus_id = upload(client, ids).json()["corpus_id"]
    assert_refused(client.post("/v1/harvests", json={**REQUEST, "corpus": corpus_id}), 422,
                   f"token id {VOCABULARY + 5}", f"vocabulary of {VOCABULARY} ids")
    # An evaluation checks its text as a harvest does (was: 202, then the job died on an IndexError).
    from tests.test_evaluations import HOOK, identity_body

    dataset = wait_job(client, client.post("/v1/harvests", json={**REQUEST, "hooks": [HOOK]}).json()["job_id"])["dataset_id"]
    sae = client.post("/v1/saes", params={"dataset_id": dataset, "hook": HOOK}, content=identity_body()).json()["sae_id"]
    assert_refused(client.post("/v1/evaluations", json={"sae_id": sae, "corpus": corpus_id, "n_tokens": 64}), 422,
                   f"token id {VOCABULARY + 5}", f"vocabulary of {VOCABULARY} ids")
    short = upload(client, np.arange(600, dtype=np.int32)).json()["corpus_id"]
    assert_refused(client.post("/v1/harvests", json={**REQUEST, "corpus": short}), 422, "fills at most 576 rows")


@pytest.mark.parametrize("body, phrase", [
    (npy(np.zeros(10, dtype=np.float32)), "int32 or int64 array, not 1-D float32"),
    (npy(np.zeros((2, 2, 2), dtype=np.int32)), "not 3-D int32"),
    (npy(np.array([3, -1], dtype=np.int32)), "must not be negative (found -1)"),
    (npy(np.zeros(0, dtype=np.int32)), "holds no token ids"),
    (b"just some text, not an array", "not a NumPy .npy array"),
    (npy(np.zeros(10, dtype=np.int32))[:-8], "not a NumPy .npy array"),  # truncated
    (npy(np.asfortranarray(np.zeros((20, 30), dtype=np.int32))), "Fortran (column-major) order"),
])
def test_an_upload_that_is_not_token_ids_is_refused(client, server, body, phrase):
    assert_refused(client.post("/v1/corpora?format=npy", content=body), 422, "format=npy", phrase)
    assert not list((server.store / "corpora").glob("*.partial"))
