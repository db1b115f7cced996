"""Transcoders and skip transcoders (issue 31): an ``[[sae]]`` with a ``target_hook`` predicts that
hook's activations from its input hook's, both streamed row-aligned from one harvest, beside plain
SAEs on the same batches; exported in SAELens' transcoder layout."""

import json

import pytest
import torch
from safetensors.torch import load_file

from shared.codec import to_torch
from tests.conftest import TINY
from trainer.config import ConfigError, SAEConfig, load_sweep
from trainer.data.client import CacheClient
from trainer.outputs.export import export_transcoder, load_saelens
from trainer.sae.autoencoder import SparseAutoencoder
from trainer.sae.objectives import sae_loss
from trainer.training.train import RunError, Trainer

MLP_IN, MLP_OUT = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
SWEEP = f"""
[run]
batch_size = 256
tokens = 25600
shuffle_buffer_rows = 4096
log_every = 20
eval_chunks = 4

[[sae]]
activation = "topk"
k = 8

[[sae]]
activation = "topk"
k = 8
target_hook = "{MLP_OUT}"

[[sae]]
activation = "relu"
l1_coefficient = 1.0
target_hook = "{MLP_OUT}"
skip = true
"""


def _synthetic(n: int = 512, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """An input and a target that is a nonlinear function of it plus a linear part (what a skip path takes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    return x, torch.relu(x @ torch.randn(d, d, generator=g)) + 0.5 * x + 1.0


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
def test_a_transcoder_learns_its_target_and_its_export_computes_the_same_on_raw_activations(activation, skip, tmp_path):
    x, y = _synthetic()
    sae = SparseAutoencoder(SAEConfig(activation=activation, d_sae=64, k=4, target_hook="t", skip=skip), 16)
    assert sae.W_enc.shape == (1, 16, 64) and sae.W_dec.shape == (1, 64, 16) and sae.b_in.shape == (1, 16)
    sae.initialize_tied_parameters(x.mean(0), y.mean(0))
    sae.initialize_from_data(x, y)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(150):
        out = sae_loss(sae, x, 0.1, None, y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    if skip:
        assert sae.W_skip.abs().sum() > 0  # the skip path trains with the dictionary
    sae.eval()
    if activation in ("topk", "batchtopk"):
        sae.calibrate_threshold(x)
    with torch.no_grad():
        pred = sae(x).decoded_activations
    fvu = ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert fvu < 0.3, fvu  # the target's mean alone: 1
    # Exported with scales as the trainer uses them (x' = 2 x, y' = y / 2), computed on raw rows.
    s_in, s_out = 2.0, 0.5
    export_transcoder(sae, tmp_path, scales=(s_in, s_out), metadata={"hook_name": "a", "hook_name_out": "t"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    family = "transcoder" if activation == "relu" else "jumprelu_transcoder"
    assert cfg["architecture"] == (family.replace("transcoder", "skip_transcoder") if skip else family)
    assert cfg["d_out"] == 16 and cfg["apply_b_dec_to_input"] is False
    t = load_file(tmp_path / "sae_weights.safetensors")
    # SAELens' formula by hand (its Transcoder / SkipTranscoder / JumpReLUTranscoder forward)
    pre = (x / s_in) @ t["W_enc"] + t["b_enc"]
    acts = pre.relu() * (pre > t["threshold"]) if "threshold" in t else pre.relu()
    by_hand = acts @ t["W_dec"] + t["b_dec"] + ((x / s_in) @ t["W_skip"].T if skip else 0)
    if activation != "topk":  # a TopK exports as a JumpReLU at its calibrated threshold: close, not exact
        torch.testing.assert_close(by_hand * s_out, pred, atol=1e-4, rtol=1e-4)
    loaded, _ = load_saelens(tmp_path)  # this project's loader: the exact TopK
    with torch.no_grad():
        torch.testing.assert_close(loaded(x / s_in).decoded_activations * s_out, pred, atol=1e-4, rtol=1e-4)


def test_the_sparse_topk_path_gives_the_dense_path_s_loss_for_a_transcoder():
    x, y = _synthetic()
    sae = SparseAutoencoder(SAEConfig(activation="topk", d_sae=64, k=4, target_hook="t", skip=True), 16)
    sae.initialize_tied_parameters(x.mean(0), y.mean(0))
    sae.initialize_from_data(x, y)
    with torch.no_grad():
        sae.W_skip.normal_(0, 0.1)
    fast = sae_loss(sae, x, 0.0, None, y)
    dense = ((sae(x).decoded_activations - y) ** 2).sum(-1).mean()
    torch.testing.assert_close(fast.mse, dense, atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def mlp_dataset(server):
    request = {"model": TINY, "hooks": [MLP_IN, MLP_OUT], "n_tokens": 30_000, "context_size": 64}
    with CacheClient(server.url, token=server.token) as client:
        return client.wait(client.harvest(request), progress=False)


def test_a_sweep_trains_an_sae_a_transcoder_and_a_skip_transcoder_on_the_same_batches(server, mlp_dataset, tmp_path):
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(SWEEP)
    sweep = load_sweep(sweep_file)
    out = tmp_path / "run"
    with CacheClient(server.url, token=server.token) as client:
        trainer = Trainer(client, mlp_dataset, [MLP_IN], sweep, out, progress=False)
        assert trainer.stream_hooks == [MLP_IN, MLP_OUT]  # the target streamed beside the input
        trainer.prepare(resume=False)
        trainer.train()
        results = {r["sae"]: r for r in trainer.evaluate_and_export()}
        rows = torch.cat([torch.stack([to_torch(client.chunk(mlp_dataset, hook, i), mlp_dataset.dtype).float()
                                       for hook in (MLP_IN, MLP_OUT)], 1) for i in trainer.stream.eval_chunk_ids])
    assert sorted(results) == ["skip-transcoder-relu-vanilla-x8-l1_1-lr0.001-s0", "topk-vanilla-x8-k8-lr0.001-s0",
                               "transcoder-topk-vanilla-x8-k8-lr0.001-s0"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name, r in results.items():
        mine = [m for m in metrics if m["sae"] == name]
        assert mine[-1]["fvu"] < mine[0]["fvu"], name  # each learns, its FVU logged against its own target
        assert r["fvu"] < 0.5, r
    # The exported transcoder on the raw held-out rows, by hand: eval.json's FVU is against the target.
    x, y = rows[:, 0], rows[:, 1]
    for name in ("transcoder-topk-vanilla-x8-k8-lr0.001-s0", "skip-transcoder-relu-vanilla-x8-l1_1-lr0.001-s0"):
        exported, cfg = load_saelens(out / "saes" / name)
        assert cfg["metadata"]["hook_name"] == MLP_IN and cfg["metadata"]["hook_name_out"] == MLP_OUT
        with torch.no_grad():
            pred = exported(x).decoded_activations
        fvu = ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        assert fvu.item() == pytest.approx(results[name]["fvu"], abs=2e-3), name
    # and the run resumes with its transcoders (the checkpoint holds b_in and W_skip; the export's
    # threshold is calibrated after it)
    with CacheClient(server.url) as client:
        again = Trainer(client, mlp_dataset, [MLP_IN], sweep, out, progress=False)
        again.prepare(resume=True)
    for a, b in zip(trainer.saes, again.saes):
        for (name, p), q in zip(a.sae.state_dict().items(), b.sae.state_dict().values()):
            assert name == "threshold" or torch.equal(p.cpu(), q.cpu()), name


def test_transcoder_settings_it_cannot_train_are_refused_with_the_reason(server, mlp_dataset, tmp_path):
    def sweep(extra: str):
        path = tmp_path / "s.toml"
        path.write_text(f"[run]\ntokens = 2560\nbatch_size = 256\n[[sae]]\n{extra}\n")
        return load_sweep(path)

    with CacheClient(server.url) as client:
        def refusal(hooks, extra):
            with pytest.raises((RunError, ConfigError)) as info:
                Trainer(client, mlp_dataset, hooks, sweep(extra), tmp_path / "out", progress=False).prepare(resume=False)
            return str(info.value)

        assert "has no hook 'blocks.0.hook_mlp_out'" in refusal([MLP_IN], 'target_hook = "blocks.0.hook_mlp_out"')
        assert "a transcoder reads one input hook" in refusal([MLP_IN, MLP_OUT], f'target_hook = "{MLP_OUT}"')
        assert "is the input hook: an SAE" in refusal([MLP_OUT], f'target_hook = "{MLP_OUT}"')
        assert "skip = true is a transcoder's skip path: give target_hook too" in refusal([MLP_IN], "skip = true")
    with pytest.raises(ConfigError, match=r"skip='yes': must be a valid boolean"):
        sweep('skip = "yes"\ntarget_hook = "x"')
    assert not (tmp_path / "out").exists()
