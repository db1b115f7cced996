"""Transcoders and skip transcoders (issue 31): an ``[[sae]]`` with a ``target_hook`` predicts that
hook's activations from its input hook's, both streamed row-aligned from one harvest, beside plain
SAEs on the same batches; exported in SAELens' transcoder layout."""

import json

import pytest
import numpy as np
import torch
from safetensors.torch import load_file

import torch.nn.functional as F
from safetensors.torch import save

from shared.codec import to_torch
from tests.conftest import TINY
from tests.test_evaluations import TEXT, register_and_evaluate
from trainer.cli import main as sae_train
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


def transcoder_body(t: dict, hook_out: str | None = MLP_OUT) -> bytes:
    """A skip transcoder's upload (its tensors and SAELens cfg in one safetensors body)."""
    cfg = {"architecture": "skip_transcoder", "d_in": 64, "d_out": t["W_dec"].shape[1], "apply_b_dec_to_input": False,
           "metadata": {"hook_name": MLP_IN, **({"hook_name_out": hook_out} if hook_out else {})}}
    return save(t, metadata={"cfg": json.dumps(cfg)})


def _fit(sae, x: torch.Tensor, y: torch.Tensor, steps: int, coefficient: float = 0.0,
         dead: torch.Tensor | None = None) -> torch.optim.Optimizer:
    """Adam at 3e-3 on the whole of ``x`` for ``steps`` (``dead``: AuxK on every other step); its optimizer."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(steps):
        out = sae_loss(sae, x, coefficient, dead if step % 2 else None, y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return optimizer


def _synthetic(n: int = 512, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """An input and a target that is a nonlinear function of it plus a linear part (what a skip path takes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    return x, torch.relu(x @ torch.randn(d, d, generator=g)) + 0.5 * x + 1.0


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation,decoder_init", [("topk", "data"), ("batchtopk", "data"), ("relu", "data"),
                                                     ("jumprelu", "data"), ("topk", "zeros"), ("relu", "zeros")])
def test_a_transcoder_learns_its_target_and_its_export_computes_the_same_on_raw_activations(activation, decoder_init,
                                                                                           skip, tmp_path):
    x, y = _synthetic()
    cfg = SAEConfig(activation=activation, d_sae=64, k=4, target_hook="t", skip=skip, decoder_init=decoder_init)
    sae = SparseAutoencoder(cfg, 16)
    assert sae.W_enc.shape == (1, 16, 64) and sae.W_dec.shape == (1, 64, 16) and sae.input_mean.shape == (1, 16)
    sae.initialize_tied_parameters(x.mean(0), y.mean(0))
    if decoder_init == "data":
        sae.initialize_from_data(x, y)
    _fit(sae, x, y, steps=150, coefficient=0.1)
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


@pytest.mark.parametrize("decoder_init", ["data", "zeros"])
def test_a_transcoder_s_encoder_reads_the_raw_input_from_pre_activations_centred_at_its_mean(decoder_init):
    """No input mean is subtracted (centred rows gave W_enc another gradient and trained worse:
    trainer/sae/autoencoder.py): b_enc starts the pre-activations at 0 on the mean input, and W_enc's
    gradient is the naive one on the raw rows."""
    x, y = _synthetic()
    x = x + 3.0  # a mean far from zero, where centring would change W_enc's gradient
    sae = SparseAutoencoder(SAEConfig(activation="topk", d_sae=64, k=4, target_hook="t", decoder_init=decoder_init), 16)
    sae.initialize_tied_parameters(x.mean(0), y.mean(0))
    if decoder_init == "data":
        sae.initialize_from_data(x, y)
    w = sae.weights()
    torch.testing.assert_close(x.mean(0) @ w.W_enc[0] + w.b_enc[0], torch.zeros(64), atol=1e-5, rtol=0)
    if decoder_init == "data":
        return
    with torch.no_grad():
        sae.W_dec.normal_()  # free rows, computed as stored: the naive loss below is the module's
    sae_loss(sae, x, 0.0, None, y).loss.backward()
    W_enc, b_enc = sae.W_enc[0].detach().clone().requires_grad_(), sae.b_enc[0].detach().clone().requires_grad_()
    top = (x @ W_enc + b_enc).topk(4, dim=-1)
    acts = torch.zeros(x.shape[0], 64).scatter(-1, top.indices, top.values.relu())
    ((acts @ sae.W_dec[0].detach() + sae.b_dec[0].detach() - y) ** 2).sum(-1).mean().backward()
    torch.testing.assert_close(sae.W_enc.grad[0], W_enc.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae.b_enc.grad[0], b_enc.grad, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def mlp_dataset(server):
    request = {"model": TINY, "hooks": [MLP_IN, MLP_OUT], "n_tokens": 30_000, "context_size": 64}
    with CacheClient(server.url, token=server.token) as client:
        return client.wait(client.harvest(request), progress=False)


def test_a_sweep_trains_an_sae_a_transcoder_and_a_skip_transcoder_on_the_same_batches(server, mlp_dataset, tmp_path,
                                                                                      capsys):
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(SWEEP)
    out = tmp_path / "run"
    code = sae_train(["--cache-url", server.url, "--token", server.token, "--dataset", mlp_dataset.dataset_id,
                      "--hook", MLP_IN, "--out", str(out), "--config", str(sweep_file), "--no-progress",
                      "--downstream-tokens", "1024"])
    assert code == 0, capsys.readouterr().err
    results = {r["sae"]: r for r in json.loads((out / "eval.json").read_text())}
    assert sorted(results) == ["skip-transcoder-relu-vanilla-x8-l1_1-lr0.008-s0", "topk-vanilla-x8-k8-lr0.008-s0",
                               "transcoder-topk-vanilla-x8-k8-lr0.008-s0"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name, r in results.items():
        mine = [m for m in metrics if m["sae"] == name]
        assert mine[-1]["fvu"] < mine[0]["fvu"], name  # each learns, its FVU logged against its own target
        assert r["fvu"] < 0.5, r
        # spliced into the model by the server (a transcoder in place of the MLP), and browsable there
        down, page = r["downstream"][MLP_IN], r["browser"][MLP_IN]
        # (a random model: its CE loss score may pass 1; the KL says the splice stays closer than an ablation)
        assert isinstance(down["ce_loss_score"], float) and 0 < down["kl_div_with_sae"] < down["kl_div_with_ablation"], down
        assert down["explained_variance"] == pytest.approx(1 - r["fvu"], abs=0.15), (name, down, r["l0"])  # other tokens, same target
        with CacheClient(server.url) as client:
            summary = client.request("GET", f"/v1/saes/{page['sae_id']}/summary").json()
            assert client.request("GET", page["path"]).status_code == 200
            assert client.request("GET", f"{page['path']}features/0").status_code == 200
        assert summary["fvu"] == pytest.approx(r["fvu"], abs=0.01) and summary["l0"] == pytest.approx(r["l0"], rel=0.05)
        assert summary["sae"]["hook_out"] == (None if name.startswith("topk") else MLP_OUT)
    # The exported transcoders on the raw held-out rows, by hand: eval.json's FVU is against the target.
    trainer = Trainer(CacheClient(server.url), mlp_dataset, [MLP_IN], load_sweep(sweep_file), out, progress=False)
    with CacheClient(server.url) as client:
        rows = torch.cat([torch.stack([to_torch(client.chunk(mlp_dataset, hook, i), mlp_dataset.dtype).float()
                                       for hook in (MLP_IN, MLP_OUT)], 1) for i in trainer.stream.eval_chunk_ids])
    x, y = rows[:, 0], rows[:, 1]
    for name in ("transcoder-topk-vanilla-x8-k8-lr0.008-s0", "skip-transcoder-relu-vanilla-x8-l1_1-lr0.008-s0"):
        exported, cfg = load_saelens(out / "saes" / name)
        assert cfg["metadata"]["hook_name"] == MLP_IN and cfg["metadata"]["hook_name_out"] == MLP_OUT
        with torch.no_grad():
            pred = exported(x).decoded_activations
        fvu = ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        assert fvu.item() == pytest.approx(results[name]["fvu"], abs=2e-3), name
    # and the run resumes with its transcoders (the checkpoint holds input_mean and W_skip)
    trainer.prepare(resume=True)
    assert trainer.finished and trainer.saes[2].sae.W_skip.abs().sum() > 0 and trainer.saes[1].sae.input_mean.abs().sum() > 0
    # A checkpoint from before transcoders read the raw input (a b_in subtracted) is refused in one line.
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["saes"][1]["model"]["b_in"] = checkpoint["saes"][1]["model"].pop("input_mean")
    torch.save(checkpoint, out / "checkpoint.pt")
    with pytest.raises(RunError, match="earlier version.*start the run again"):
        trainer.prepare(resume=True)


def test_the_server_splices_a_transcoder_in_place_of_the_mlp_as_by_hand(server, mlp_dataset):
    """A random skip transcoder, registered at the MLP's input: the server's CE loss and KL with the
    MLP's output replaced by its prediction equal a splice done by hand with TransformerLens."""
    from cache_server.models import ModelRegistry

    g = torch.Generator().manual_seed(0)
    d, d_sae = 64, 128
    t = {"W_enc": torch.randn(d, d_sae, generator=g) / d**0.5, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
         "W_dec": torch.randn(d_sae, d, generator=g) / d_sae**0.5, "b_dec": torch.randn(d, generator=g) * 0.1,
         "W_skip": torch.randn(d, d, generator=g) / d**0.5}
    with server.client() as client:
        corpus = client.post("/v1/corpora", params={"name": "foxes-tc"}, content=TEXT.encode()).json()["corpus_id"]
        job = register_and_evaluate(client, mlp_dataset.dataset_id, transcoder_body(t), hook=MLP_IN, n_tokens=4 * 64,
                                    corpus=corpus)
    model = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(TINY)
    stream = model.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    windows = torch.tensor([[model.bos_token_id] + stream[i * 63:(i + 1) * 63] for i in range(4)])
    seen = {}

    def read(activation, hook):
        seen["x"] = activation
        return activation

    def splice(activation, hook):  # SAELens' SkipTranscoder on the MLP's input; BOS left alone
        x = seen["x"]
        y_hat = (x @ t["W_enc"] + t["b_enc"]).relu() @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T
        return torch.cat([activation[:, :1], y_hat[:, 1:]], dim=1)

    with torch.no_grad():
        clean = model.bridge(windows)
        spliced = model.bridge.run_with_hooks(windows, fwd_hooks=[(MLP_IN, read), (MLP_OUT, splice)])

    def ce(logits):
        return F.cross_entropy(logits[:, 1:-1].flatten(0, 1), windows[:, 2:].flatten()).item()

    kl = (F.softmax(clean, -1) * (F.log_softmax(clean, -1) - F.log_softmax(spliced, -1))).sum(-1)[:, 1:].mean()
    result, down = job["result"], job["result"]["downstream"]
    assert result["n_tokens"] == 4 * 63
    assert down["ce_loss_without_sae"] == pytest.approx(ce(clean), rel=1e-4)
    assert down["ce_loss_with_sae"] == pytest.approx(ce(spliced), rel=1e-4) and down["ce_loss_with_sae"] != ce(clean)
    assert down["kl_div_with_sae"] == pytest.approx(kl.item(), rel=1e-3)


def test_bad_transcoder_uploads_get_a_422_that_names_the_problem(server, mlp_dataset):
    g = torch.Generator().manual_seed(1)
    t = {"W_enc": torch.randn(64, 32, generator=g), "b_enc": torch.zeros(32), "W_dec": torch.randn(32, 64, generator=g),
         "b_dec": torch.zeros(64), "W_skip": torch.zeros(64, 64)}
    cases = [(transcoder_body(t, hook_out=None), "needs its target hook: cfg metadata.hook_name_out"),
             (transcoder_body(t, hook_out="blocks.0.hook_mlp_out"), "target hook 'blocks.0.hook_mlp_out'"),
             (transcoder_body({**t, "W_skip": torch.zeros(64, 63)}), "W_skip has shape [64, 63]"),
             (transcoder_body({k: v for k, v in t.items() if k != "W_skip"}), "lacks tensor(s) ['W_skip']"),
             (transcoder_body({**t, "W_dec": torch.randn(32, 48), "b_dec": torch.zeros(48), "W_skip": torch.zeros(48, 64)}),
              "d_out is 48 but hook 'blocks.1.hook_mlp_out'")]
    with server.client() as client:
        for body, message in cases:
            answer = client.post("/v1/saes", params={"dataset_id": mlp_dataset.dataset_id, "hook": MLP_IN}, content=body)
            assert answer.status_code == 422 and message in answer.json()["detail"], (message, answer.text)


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
        assert "is an input hook (--hook): that is an SAE" in refusal([MLP_OUT], f'target_hook = "{MLP_OUT}"')
        assert "skip = true is a transcoder's skip path: give target_hook too" in refusal([MLP_IN], "skip = true")
    with pytest.raises(ConfigError, match=r"skip='yes': must be a valid boolean"):
        sweep('skip = "yes"\ntarget_hook = "x"')
    assert not (tmp_path / "out").exists()


def _layered(n: int = 1024, layers: int = 3, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs per layer and targets that each depend on that layer's input and every earlier one's
    (what a cross-layer latent can write in one go)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, layers, d, generator=g)
    maps = [torch.randn(d, d, generator=g) / 4 for _ in range(layers)]
    return x, torch.stack([sum(torch.relu(x[:, l] @ maps[l]) for l in range(j + 1)) for j in range(layers)], 1)


def test_a_clt_learns_every_layer_s_target_its_sparse_path_is_the_naive_one_and_its_export_round_trips(tmp_path):
    from trainer.outputs.export import export_clt, load_clt
    from trainer.sae.clt import CrossLayerTranscoder

    x, y = _layered()
    clt = CrossLayerTranscoder(SAEConfig(k=4, d_sae=64, target_hook=("a", "b", "c"), cross_layer=True), 16, 3)
    assert [tuple(w.shape) for w in clt.W_dec] == [(64, 3, 16), (64, 2, 16), (64, 1, 16)]  # layer l writes to l..2
    clt.initialize_tied_parameters(x.mean(0), y.mean(0))
    clt.initialize_from_data(x, y)
    dead = torch.zeros(3, 64, dtype=torch.bool)
    dead[:, :4] = True  # AuxK's path too, every other step
    _fit(clt, x, y, steps=300, dead=dead)
    clt.eval()
    with torch.no_grad():
        acts, pred = clt(x)
    assert ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum() < 0.3 and (acts > 0).sum(-1).float().mean() <= 4
    assert clt.W_dec[0][:, 1:].abs().sum() > 0  # cross-layer blocks learnt from zero
    # The naive CLT, by hand: dense TopK per layer, every earlier layer's decoder summed in.
    W_enc, b_enc, W_dec = clt.weights()
    with torch.no_grad():
        dense = []
        for l in range(3):
            pre = x[:, l] @ W_enc[l] + b_enc[l]
            top = pre.topk(4, dim=-1)
            dense.append(torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()))
        naive = torch.stack([clt.b_dec[j] + sum(dense[l] @ W_dec[l][:, j - l] for l in range(j + 1)) for j in range(3)], 1)
    torch.testing.assert_close(pred, naive, atol=1e-5, rtol=1e-5)
    # Exported in circuit-tracer's per-layer files at the trainer's scales; our loader computes the same.
    clt.calibrate_threshold(x)
    s_in, s_out = [2.0, 3.0, 4.0], [0.5] * 3
    export_clt(clt, tmp_path, in_scales=s_in, out_scales=s_out, hooks=["i0", "i1", "i2"], targets=["a", "b", "c"],
               metadata={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors",
                                                          "W_enc_0.safetensors", "W_enc_1.safetensors", "W_enc_2.safetensors",
                                                          "cfg.json"]
    raw = x / torch.tensor(s_in)[:, None]
    with torch.no_grad():
        torch.testing.assert_close(load_clt(tmp_path)(raw).decoded_activations * s_out[0], pred, atol=1e-4, rtol=1e-4)
    # circuit-tracer's JumpReLU, by hand from the files: each layer fires about k latents a row.
    for l in range(3):
        enc = load_file(tmp_path / f"W_enc_{l}.safetensors")
        assert enc[f"W_enc_{l}"].shape == (64, 16) and load_file(tmp_path / f"W_dec_{l}.safetensors")[f"W_dec_{l}"].shape == (64, 3 - l, 16)
        pre = raw[:, l] @ enc[f"W_enc_{l}"].T + enc[f"b_enc_{l}"]
        assert ((pre > enc[f"threshold_{l}"]) & (pre > 0)).sum(-1).float().mean().item() == pytest.approx(4, abs=0.1)


LAYERS_IN = ["blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in"]
LAYERS_OUT = ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]


@pytest.fixture(scope="module")
def layers_dataset(server):
    request = {"model": TINY, "hooks": LAYERS_IN + LAYERS_OUT, "n_tokens": 20_000, "context_size": 64}
    with CacheClient(server.url, token=server.token) as client:
        return client.wait(client.harvest(request), progress=False)


def test_per_layer_transcoders_and_a_clt_train_side_by_side_from_one_harvest(server, layers_dataset, tmp_path, capsys):
    targets = json.dumps(LAYERS_OUT)
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(f"[run]\nbatch_size = 256\ntokens = 15360\nshuffle_buffer_rows = 4096\nlog_every = 20\n"
                          f"eval_chunks = 4\n[[sae]]\nk = 8\ntarget_hook = {targets}\n"
                          f"[[sae]]\nk = 8\ntarget_hook = {targets}\ncross_layer = true\n")
    out = tmp_path / "run"
    args = ["--cache-url", server.url, "--token", server.token, "--dataset", layers_dataset.dataset_id,
            "--hook", LAYERS_IN[0], "--hook", LAYERS_IN[1], "--out", str(out), "--config", str(sweep_file),
            "--no-progress", "--downstream-tokens", "1024"]
    assert sae_train(args) == 0, capsys.readouterr().err
    results = {r["sae"]: r for r in json.loads((out / "eval.json").read_text())}
    per_layer, clt = results["transcoder-topk-vanilla-x8-k8-lr0.008-s0"], results["clt-topk-vanilla-x8-k8-lr0.008-s0"]
    print("per-layer transcoders", per_layer["fvu"], per_layer["l0"], "CLT", clt["fvu"], clt["l0"])
    assert per_layer["l0"] == clt["l0"] == 8  # per layer: the same total L0
    assert per_layer["fvu"] < 0.6 and clt["fvu"] < 0.6
    # Spliced by the server: the per-layer transcoders each at its layer; the CLT in place of both MLPs at
    # once (the replacement model) and of each alone.
    assert sorted(per_layer["downstream"]) == LAYERS_IN and list(clt["downstream"]) == [LAYERS_IN[0]]
    whole = clt["downstream"][LAYERS_IN[0]]
    assert whole["l0"] == pytest.approx(8) and len(whole["layers"]) == 2, whole
    assert 0 < whole["kl_div_with_sae"] < whole["kl_div_with_ablation"]
    assert all(0 < layer["kl_div_with_sae"] < layer["kl_div_with_ablation"] for layer in whole["layers"])
    page = clt["browser"][LAYERS_IN[0]]
    with CacheClient(server.url) as client:
        summary = client.request("GET", f"/v1/saes/{page['sae_id']}/summary").json()
        assert summary["sae"]["d_sae"] == 2 * clt["d_sae"] and summary["sae"]["hooks_out"] == LAYERS_OUT
        assert client.request("GET", f"{page['path']}features/{clt['d_sae'] + 1}").status_code == 200  # layer 1's
        rows = torch.cat([torch.stack([to_torch(client.chunk(layers_dataset, hook, i), layers_dataset.dtype).float()
                                       for hook in LAYERS_IN + LAYERS_OUT], 1)
                          for i in Trainer(client, layers_dataset, LAYERS_IN, load_sweep(sweep_file), out,
                                           progress=False).stream.eval_chunk_ids])
    assert summary["fvu"] == pytest.approx(clt["fvu"], abs=0.01)  # the held-out chunks, against both targets
    x, y = rows[:, :2], rows[:, 2:]
    from trainer.outputs.export import load_clt

    with torch.no_grad():  # the CLT export on raw rows, by hand: eval.json's FVU over both layers' targets
        pred = load_clt(out / "saes" / clt["sae"])(x).decoded_activations
    assert (((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()).item() == pytest.approx(clt["fvu"], abs=2e-3)
    for layer, (hook_in, hook_out) in enumerate(zip(LAYERS_IN, LAYERS_OUT)):  # one SAELens folder per layer
        exported, cfg = load_saelens(out / "saes" / per_layer["sae"] / hook_in)
        assert cfg["metadata"]["hook_name"] == hook_in and cfg["metadata"]["hook_name_out"] == hook_out


def clt_body(t: dict, k: int | None = 4, hooks_in=LAYERS_IN, hooks_out=LAYERS_OUT) -> bytes:
    cfg = {"architecture": "clt", "feature_input_hooks": hooks_in, "feature_output_hooks": hooks_out, "metadata": {},
           **({"k": k} if k else {})}
    return save(t, metadata={"cfg": json.dumps(cfg)})


def _random_clt(d: int = 64, d_sae: int = 96) -> dict:
    g = torch.Generator().manual_seed(2)
    t = {}
    for l in range(2):
        t |= {f"W_enc_{l}": torch.randn(d_sae, d, generator=g) / d**0.5, f"b_enc_{l}": torch.randn(d_sae, generator=g) * 0.1,
              f"b_dec_{l}": torch.randn(d, generator=g) * 0.1, f"W_dec_{l}": torch.randn(d_sae, 2 - l, d, generator=g) / d_sae**0.5,
              f"threshold_{l}": torch.full((d_sae,), 0.1)}
    return t


def test_the_server_splices_a_clt_in_place_of_every_mlp_and_of_each_alone_as_by_hand(server, layers_dataset):
    from cache_server.models import ModelRegistry

    t, k = _random_clt(), 4
    with server.client() as client:
        corpus = client.post("/v1/corpora", params={"name": "foxes-clt"}, content=TEXT.encode()).json()["corpus_id"]
        job = register_and_evaluate(client, layers_dataset.dataset_id, clt_body(t, k), hook=LAYERS_IN[0], n_tokens=4 * 64,
                                    corpus=corpus)
    model = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(TINY)
    stream = model.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    windows = torch.tensor([[model.bos_token_id] + stream[i * 63:(i + 1) * 63] for i in range(4)])

    def encode(x, l):  # circuit-tracer's CLT with TopK per layer
        pre = x @ t[f"W_enc_{l}"].T + t[f"b_enc_{l}"]
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def run(replace: list[int]):
        acts = {}

        def read(l):
            def fn(activation, hook):
                acts[l] = encode(activation, l)
                return activation
            return fn

        def write(j):
            def fn(activation, hook):
                y_hat = t[f"b_dec_{j}"] + sum(acts[l] @ t[f"W_dec_{l}"][:, j - l] for l in range(j + 1))
                return torch.cat([activation[:, :1], y_hat[:, 1:]], dim=1)  # BOS left alone
            return fn

        hooks = [(LAYERS_IN[l], read(l)) for l in range(2)] + [(LAYERS_OUT[j], write(j)) for j in replace]
        with torch.no_grad():
            return model.bridge.run_with_hooks(windows, fwd_hooks=hooks)

    def ce(logits):
        return F.cross_entropy(logits[:, 1:-1].flatten(0, 1), windows[:, 2:].flatten()).item()

    down = job["result"]["downstream"]
    assert down["ce_loss_with_sae"] == pytest.approx(ce(run([0, 1])), rel=1e-4)  # layer 1 reads the replaced stream
    for j, layer in enumerate(job["result"]["layers"]):
        assert layer["ce_loss_with_sae"] == pytest.approx(ce(run([j])), rel=1e-4), j
    assert job["result"]["l0"] == pytest.approx(k)
    with torch.no_grad():
        assert down["ce_loss_without_sae"] == pytest.approx(ce(model.bridge(windows)), rel=1e-4)


def test_bad_clt_uploads_get_a_422_that_names_the_problem(server, layers_dataset):
    t = _random_clt()
    cases = [(clt_body(t, hooks_out=LAYERS_OUT[:1]), "two lists of hook names of the same length"),
             (clt_body({k: v for k, v in t.items() if k != "W_dec_1"}), "lacks tensor(s) ['W_dec_1']"),
             (clt_body({**t, "W_dec_1": torch.zeros(96, 2, 64)}), "W_dec_1 has shape [96, 2, 64]"),
             (clt_body({k: v for k, v in t.items() if not k.startswith("threshold")}, k=None),
              "lacks tensor(s) ['threshold_0', 'threshold_1']"),
             (clt_body(t, hooks_out=["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"]), "'blocks.1.hook_resid_post' is not one of"),
             (clt_body(t, k=500), "a clt's k is a whole number from 1 to d_sae=96")]
    with server.client() as client:
        for body, message in cases:
            answer = client.post("/v1/saes", params={"dataset_id": layers_dataset.dataset_id, "hook": LAYERS_IN[0]},
                                 content=body)
            assert answer.status_code == 422 and message in answer.json()["detail"], (message, answer.text)
        answer = client.post("/v1/saes", params={"dataset_id": layers_dataset.dataset_id, "hook": LAYERS_IN[1]},
                             content=clt_body(t))
        assert answer.status_code == 422 and "registered at its first input hook" in answer.json()["detail"]


def test_clt_settings_it_cannot_train_are_refused(tmp_path):
    def refusal(table: str) -> str:
        path = tmp_path / "s.toml"
        path.write_text(f"[run]\ntokens = 2560\nbatch_size = 256\n[[sae]]\n{table}\n")
        from trainer.config import check_for_run

        with pytest.raises(ConfigError) as info:
            for cfg in load_sweep(path).saes:
                check_for_run(cfg, 64, 10, 2560)
        return str(info.value)

    assert "cross_layer = true needs target_hook as a list" in refusal(f'cross_layer = true\ntarget_hook = "{MLP_OUT}"')
    assert "a cross-layer transcoder is a vanilla TopK per layer" in refusal(
        'cross_layer = true\nactivation = "relu"\ntarget_hook = ["a", "b"]')
    assert "target_hook[1]=''" in refusal('target_hook = ["a", ""]')
    assert 'decoder_init = "zeros" (free decoder rows) is not available for a cross-layer' in refusal(
        'cross_layer = true\ndecoder_init = "zeros"\ntarget_hook = ["a", "b"]')


def test_a_clt_resamples_its_dead_latents_at_badly_predicted_rows():
    from trainer.sae.clt import CrossLayerTranscoder

    x, y = _layered()
    clt = CrossLayerTranscoder(SAEConfig(k=4, d_sae=64, target_hook=("a", "b", "c"), cross_layer=True), 16, 3)
    clt.initialize_tied_parameters(x.mean(0), y.mean(0))
    clt.initialize_from_data(x, y)
    optimizer = _fit(clt, x, y, steps=20)
    dead = torch.zeros(3, 64, dtype=torch.bool)
    dead[1, :10] = True  # layer 1's first ten latents
    before = clt.W_dec[0].detach().clone()
    assert clt.resample(optimizer, dead, x, y, torch.Generator().manual_seed(0)) == 10
    assert torch.equal(clt.W_dec[0], before)  # other layers' latents untouched
    assert clt.W_dec[1][:10, 1:].abs().sum() == 0  # no write to later layers yet
    torch.testing.assert_close(clt.W_dec[1][:10, 0].norm(dim=-1), torch.full((10,), clt.cfg.row_norm()))
    assert optimizer.state[clt.W_dec[1]]["exp_avg"][:10].abs().sum() == 0
    assert optimizer.state[clt.W_enc]["exp_avg_sq"][1, :, :10].abs().sum() == 0
    assert optimizer.state[clt.W_enc]["exp_avg_sq"][1, :, 10:].abs().sum() > 0
    with torch.no_grad():  # pointed at rows of the data, they are picked again on some rows
        assert (clt(x).learned_activations[:, 1, :10] > 0).any()


def test_text_steering_and_attribution_through_a_clt_and_a_transcoder_as_by_hand(server, layers_dataset, mlp_dataset):
    """Issue 34 for dictionaries that replace computations: a CLT's latents on a text are each
    layer's encoder on that layer's MLP input; steering one of layer 0 adds its decoder block at
    both MLP outputs; its attribution flows through every later layer's prediction. A transcoder's
    latents read the MLP's input and its steering writes to the MLP's output."""
    from cache_server.models import ModelRegistry

    t, k = _random_clt(), 4
    text, feature, strength = "the fox jumps over the dog and runs", 7, 30.0
    model = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(TINY)
    ids = [model.bos_token_id] + model.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(x, l):
        pre = x @ t[f"W_enc_{l}"].T + t[f"b_enc_{l}"]
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    with server.client() as client:
        sae = client.post("/v1/saes", params={"dataset_id": layers_dataset.dataset_id, "hook": LAYERS_IN[0]},
                          content=clt_body(t, k)).json()["sae_id"]
        answer = client.post(f"/v1/saes/{sae}/activations", json={"text": text, "feature": 96 + feature}).json()
        steered = client.post(f"/v1/saes/{sae}/steer", json={"prompt": text, "feature": feature, "strength": strength,
                                                             "max_new_tokens": 6}).json()
        attributed = client.post(f"/v1/saes/{sae}/attribution", json={"text": text, "top": 500}).json()
        d_sae = 96
        with torch.no_grad():
            _, cache = model.bridge.run_with_cache(torch.tensor([ids]), names_filter=LAYERS_IN)
            acts = torch.cat([encode(cache[h][0], l) for l, h in enumerate(LAYERS_IN)], -1)
        acts[0] = 0
        np.testing.assert_allclose(answer["values"], acts[:, d_sae + feature], rtol=1e-4, atol=1e-5)
        assert [f["feature"] for f in answer["tokens"][3]["features"]] == acts[3].topk(5).indices[acts[3].topk(5).values > 0].tolist()

        def push(j):
            def fn(activation, hook):
                out = activation.clone()
                out[:, 1:] += strength * t["W_dec_0"][feature, j]
                return out
            return fn

        sequence = list(ids)
        with torch.no_grad():
            for _ in range(6):
                logits = model.bridge.run_with_hooks(torch.tensor([sequence]), fwd_hooks=[(LAYERS_OUT[j], push(j)) for j in range(2)])
                sequence.append(int(logits[0, -1].argmax()))
        assert steered["steered"]["token_ids"] == sequence[len(ids):]
        assert steered["steered"]["token_ids"] != steered["unsteered"]["token_ids"]

        leaves = {}

        def read(l):
            def fn(activation, hook):
                leaves[l] = encode(activation.detach(), l).requires_grad_()
                return activation
            return fn

        def write(j):
            def fn(activation, hook):
                out = sum(leaves[l] @ t[f"W_dec_{l}"][:, j - l] for l in range(j + 1))
                return activation + out - out.detach()
            return fn

        hooks = [(h, read(l)) for l, h in enumerate(LAYERS_IN)] + [(h, write(j)) for j, h in enumerate(LAYERS_OUT)]
        logits = model.bridge.run_with_hooks(torch.tensor([ids]), fwd_hooks=hooks)
        position = len(ids) - 2
        loss = -F.log_softmax(logits[0, position], -1)[ids[-1]]
        grads = torch.autograd.grad(loss, [leaves[0], leaves[1]])
        scores = torch.cat([leaves[l].detach() * g for l, g in enumerate(grads)], -1)[0]
        scores[0] = 0
        summed = scores.sum(0)
        assert attributed["position"] == position and attributed["total"] == pytest.approx(float(summed.sum()), rel=1e-3, abs=1e-6)
        assert [f["feature"] for f in attributed["features"]] == summed.abs().argsort(descending=True)[: int((summed != 0).sum())].tolist()

        # a skip transcoder: latents from the MLP's input, steering at its output
        g = torch.Generator().manual_seed(0)
        tc = {"W_enc": torch.randn(64, 128, generator=g) / 8, "b_enc": torch.randn(128, generator=g) * 0.1,
              "W_dec": torch.randn(128, 64, generator=g) / 128**0.5, "b_dec": torch.randn(64, generator=g) * 0.1,
              "W_skip": torch.randn(64, 64, generator=g) / 8}
        transcoder = client.post("/v1/saes", params={"dataset_id": mlp_dataset.dataset_id, "hook": MLP_IN},
                                 content=transcoder_body(tc)).json()["sae_id"]
        values = client.post(f"/v1/saes/{transcoder}/activations", json={"text": text, "feature": 3}).json()["values"]
        with torch.no_grad():
            _, cache = model.bridge.run_with_cache(torch.tensor([ids]), names_filter=[MLP_IN])
            expected = (cache[MLP_IN][0] @ tc["W_enc"] + tc["b_enc"]).relu()[:, 3]
        np.testing.assert_allclose(values[1:], expected[1:], rtol=1e-4, atol=1e-5)
        clamped = client.post(f"/v1/saes/{transcoder}/steer", json={"prompt": text, "feature": 3, "strength": 50.0,
                                                                    "mode": "clamp", "max_new_tokens": 4}).json()
        seen, sequence = {}, list(ids)

        def keep(activation, hook):
            seen["a"] = (activation @ tc["W_enc"] + tc["b_enc"]).relu()[..., 3]
            return activation

        def clamp(activation, hook):
            out = activation.clone()
            out[:, 1:] += ((50.0 - seen["a"])[..., None] * tc["W_dec"][3])[:, 1:]
            return out

        with torch.no_grad():
            for _ in range(4):
                logits = model.bridge.run_with_hooks(torch.tensor([sequence]), fwd_hooks=[(MLP_IN, keep), (MLP_OUT, clamp)])
                sequence.append(int(logits[0, -1].argmax()))
        assert clamped["steered"]["token_ids"] == sequence[len(ids):]
