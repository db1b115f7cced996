"""SAEs come home and are judged downstream: POST /v1/saes, POST /v1/evaluations, against a real
server and the tiny random causal model; the figures are checked against a splice done by hand."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save

from tests.conftest import TINY
from tests.server import wait_job

HOOK = "blocks.0.hook_resid_post"
D = 64  # tiny-random-gpt's d_model
TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog number {i * 7 % 13}.\n" for i in range(40))


def sae_body(W_enc, b_enc, W_dec, b_dec, cfg: dict, **extra) -> bytes:
    return save({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, **extra},
                metadata={"cfg": json.dumps(cfg)})


def identity_body(d: int = D) -> bytes:
    """x_hat = relu(x) - relu(-x) = x exactly."""
    eye = torch.eye(d)
    return sae_body(torch.cat([eye, -eye], 1), torch.zeros(2 * d), torch.cat([eye, -eye], 0), torch.zeros(d),
                    {"architecture": "standard"})


def wait_evaluation(client, evaluation_id: str) -> dict:
    import time

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = client.get(f"/v1/evaluations/{evaluation_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise TimeoutError(evaluation_id)


def register_and_evaluate(client, dataset_id: str, body: bytes, hook: str = HOOK, **request) -> dict:
    sae = client.post("/v1/saes", params={"dataset_id": dataset_id, "hook": hook}, content=body)
    assert sae.status_code == 201, sae.text
    answer = client.post("/v1/evaluations", json={"sae_id": sae.json()["sae_id"], **request})
    assert answer.status_code in (200, 202), answer.text
    job = wait_evaluation(client, answer.json()["evaluation_id"])
    assert job["status"] == "completed", job
    return job


@pytest.fixture(scope="module")
def dataset_id(server):
    with server.client() as client:
        request = {"model": TINY, "hooks": [HOOK], "n_tokens": 2048, "context_size": 32}
        return wait_job(client, client.post("/v1/harvests", json=request).json()["job_id"])["dataset_id"]


@pytest.fixture(scope="module")
def small_corpus(server) -> str:
    with server.client() as client:
        return client.post("/v1/corpora", params={"name": "foxes"}, content=TEXT.encode()).json()["corpus_id"]


def test_an_identity_sae_scores_one_and_a_zero_sae_scores_zero(client, dataset_id):
    job = register_and_evaluate(client, dataset_id, identity_body(), n_tokens=512)
    result, down = job["result"], job["result"]["downstream"]
    assert result["n_tokens"] == 16 * 31  # 16 windows of 32, BOS positions not counted
    assert result["first_token"] == 64 * 31  # held-out text starts where the harvest stopped reading
    assert result["explained_variance"] == pytest.approx(1.0) and result["l2_ratio"] == pytest.approx(1.0)
    assert down["ce_loss_score"] == pytest.approx(1.0) and down["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-9)
    assert down["ce_loss_with_sae"] == pytest.approx(down["ce_loss_without_sae"])
    assert down["kl_div_with_ablation"] > 0 and down["kl_div_score"] == pytest.approx(1.0)

    zero = sae_body(torch.randn(D, 128), torch.zeros(128), torch.zeros(128, D), torch.zeros(D), {"architecture": "standard"})
    down = register_and_evaluate(client, dataset_id, zero, n_tokens=512)["result"]["downstream"]
    assert down["ce_loss_score"] == pytest.approx(0.0, abs=1e-9) and down["kl_div_score"] == pytest.approx(0.0, abs=1e-9)
    assert down["ce_loss_with_sae"] == pytest.approx(down["ce_loss_with_ablation"])

    again = client.post("/v1/evaluations", json={"sae_id": job["request"]["sae_id"], "n_tokens": 512})
    assert again.status_code == 200 and again.json()["evaluation_id"] == job["evaluation_id"]  # a cache hit


def test_the_figures_match_a_splice_done_by_hand(client, dataset_id, small_corpus):
    from cache_server.models import ModelRegistry

    torch.manual_seed(0)
    d_sae, k = 256, 8
    W_enc, W_dec = torch.randn(D, d_sae) / D**0.5, torch.randn(d_sae, D) / d_sae**0.5
    b_enc, b_dec = torch.randn(d_sae) * 0.1, torch.randn(D) * 0.1
    body = sae_body(W_enc, b_enc, W_dec, b_dec, {"architecture": "topk", "k": k})
    job = register_and_evaluate(client, dataset_id, body, n_tokens=4 * 32, corpus=small_corpus)
    result = job["result"]

    model = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(TINY)
    stream = model.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    windows = torch.tensor([[model.bos_token_id] + stream[i * 31:(i + 1) * 31] for i in range(4)])

    def splice(activation, hook):  # SAELens' TopK: top k pre-activations, then ReLU; BOS left alone
        pre = (activation - b_dec) @ W_enc + b_enc
        top = pre.topk(k, dim=-1)
        x_hat = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()) @ W_dec + b_dec
        return torch.cat([activation[:, :1], x_hat[:, 1:]], dim=1)

    with torch.no_grad():
        clean = model.bridge(windows)
        spliced = model.bridge.run_with_hooks(windows, fwd_hooks=[(HOOK, splice)])

    def ce(logits):
        return F.cross_entropy(logits[:, 1:-1].flatten(0, 1), windows[:, 2:].flatten()).item()

    kl = (F.softmax(clean, -1) * (F.log_softmax(clean, -1) - F.log_softmax(spliced, -1))).sum(-1)[:, 1:].mean()
    down = result["downstream"]
    assert result["n_tokens"] == 4 * 31 and result["first_token"] == 0
    assert down["ce_loss_without_sae"] == pytest.approx(ce(clean), rel=1e-4)
    assert down["ce_loss_with_sae"] == pytest.approx(ce(spliced), rel=1e-4)
    assert down["kl_div_with_sae"] == pytest.approx(kl.item(), rel=1e-3)
    assert result["l0"] == pytest.approx(k, abs=0.5)
    assert down["ce_loss_with_sae"] > down["ce_loss_without_sae"]  # a random SAE hurts


def test_bad_saes_and_evaluations_get_a_4xx_that_names_the_problem(server, client, dataset_id):
    def register(body: bytes, dataset=dataset_id, hook=HOOK, c=client):
        return c.post("/v1/saes", params={"dataset_id": dataset, "hook": hook}, content=body)

    assert register(identity_body(), dataset="0" * 24).status_code == 404
    assert register(identity_body(), dataset="../../etc").status_code == 422
    answer = register(identity_body(), hook="blocks.1.hook_resid_post")
    assert answer.status_code == 422 and f"has no hook 'blocks.1.hook_resid_post'; its hooks: {HOOK}" in answer.text
    answer = register(b"not a safetensors file at all")
    assert answer.status_code == 422 and "not a safetensors file" in answer.json()["detail"]
    answer = register(save({"W_enc": torch.zeros(D, 8)}))
    assert answer.status_code == 422 and "no 'cfg' entry" in answer.json()["detail"]
    answer = register(identity_body(32))
    assert answer.status_code == 422 and f"d_in is 32 but hook '{HOOK}'" in answer.json()["detail"]
    answer = register(sae_body(torch.zeros(D, 8), torch.zeros(8), torch.zeros(8, D), torch.zeros(D), {"architecture": "topk"}))
    assert answer.status_code == 422 and "needs cfg k" in answer.json()["detail"]
    answer = register(sae_body(torch.zeros(D, 8), torch.zeros(9), torch.zeros(8, D), torch.zeros(D), {"architecture": "standard"}))
    assert answer.status_code == 422 and "b_enc has shape [9]" in answer.json()["detail"]
    answer = register(sae_body(torch.zeros(D, 8), torch.zeros(8), torch.zeros(8, D), torch.zeros(D), {"architecture": "gated"}))
    assert answer.status_code == 422 and "architecture 'gated'" in answer.json()["detail"]
    with server.client(token=None) as anonymous:
        assert register(identity_body(), c=anonymous).status_code == 401
        assert anonymous.post("/v1/evaluations", json={"sae_id": "0" * 24}).status_code == 401

    sae_id = register(identity_body()).json()["sae_id"]
    answer = client.post("/v1/evaluations", json={"sae_id": "0" * 24})
    assert answer.status_code == 404 and "register it with POST /v1/saes" in answer.json()["detail"]
    answer = client.post("/v1/evaluations", json={"sae_id": sae_id, "n_tokens": 1_000_000})
    assert answer.status_code == 422
    assert "tokens left after the 1,984 the harvest read" in answer.json()["detail"]
    assert client.post("/v1/evaluations", json={"sae_id": sae_id, "n_tokens": "512"}).status_code == 422
    assert client.post("/v1/evaluations", json={"sae_id": sae_id, "corpus": "nope"}).status_code == 404
    assert client.get("/v1/evaluations/" + "0" * 24).status_code == 404
    assert client.get("/v1/saes/" + "0" * 24).status_code == 404


def test_the_batch_size_asked_for_does_not_set_the_memory_nor_the_figures(client, dataset_id, small_corpus):
    """Four logit tensors of a forward live at once, and a forward holds at most 2^24 logits, so
    batch_size 1024 costs what 16 does (issue 37: it grew to GBs); the figures are the same."""
    from cache_server.saes.downstream import MAX_LOGITS, windows_per_forward

    assert windows_per_forward(1024, 128, 50_257) == 2 and windows_per_forward(16, 32, 100) == 16
    assert windows_per_forward(1024, 100_000, 1_000) == 1 and MAX_LOGITS == 1 << 24
    eye, order = torch.eye(D), torch.randperm(2 * D, generator=torch.Generator().manual_seed(0))
    permuted = sae_body(torch.cat([eye, -eye], 1)[:, order], torch.zeros(2 * D), torch.cat([eye, -eye], 0)[order],
                        torch.zeros(D), {"architecture": "standard"})  # the identity again, as another file
    results = [register_and_evaluate(client, dataset_id, body, n_tokens=4 * 32, corpus=small_corpus,
                                     batch_size=size)["result"] for body, size in ((identity_body(), 1), (permuted, 1024))]
    assert results[0]["downstream"] == pytest.approx(results[1]["downstream"], rel=1e-5)
