"""SAE parts and metrics against hand-computed cases."""

import collections
import copy

import numpy as np
import pytest
import torch

from shared.codec import to_storage
from trainer.config import ConfigError, SAEConfig, load_sweep, sae_names, split_cfgs
from trainer.data.permutation import permutation, places_of, seed_of
from trainer.data.scatter import _LINE_KERNELS, _kernel_for, _scatter_any_width, scatter_scaled
from trainer.data.stream import shuffled_on_device
from trainer.evaluation.metrics import evaluate, geometric_median
from trainer.sae.autoencoder import SparseAutoencoder
from trainer.sae.objectives import _matryoshka_dense, sae_loss
from trainer.sae.resample import resample_dead_neurons


def test_initialisation_small_decoder_rows_encoder_as_their_transpose():
    median = torch.tensor([1.0, -2.0, 0.5, 3.0])
    sae = SparseAutoencoder(SAEConfig(expansion=4), d_in=4, geometric_median_dataset=median)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((1, 16), 0.3))
    assert torch.equal(sae.W_enc, sae.W_dec.transpose(1, 2))
    assert torch.equal(sae.b_dec[0], median) and not sae.b_enc.any()
    assert not SparseAutoencoder(SAEConfig(expansion=4), d_in=4).b_dec.any()  # zeros without a median


def test_initialisation_from_data_points_each_latent_from_the_bias_to_a_distinct_row():
    rows = torch.randn(40, 4) + torch.tensor([5.0, 0.0, 0.0, 0.0])  # data off the origin
    centre = rows.mean(0)
    sae = SparseAutoencoder(SAEConfig(d_sae=16, seed=3), d_in=4, geometric_median_dataset=centre)
    sae.initialize_from_data(rows)
    directions = (rows - centre) / (rows - centre).norm(dim=-1, keepdim=True)
    cosines = (sae.W_dec[0] / 0.3) @ directions.T  # [16, 40]: each latent matches one row exactly
    torch.testing.assert_close(cosines.max(dim=1).values, torch.ones(16))
    assert len(set(cosines.argmax(dim=1).tolist())) == 16
    assert torch.equal(sae.W_enc, sae.W_dec.transpose(1, 2))
    few = SparseAutoencoder(SAEConfig(d_sae=16), d_in=4)
    before = few.W_dec.detach().clone()
    few.initialize_from_data(rows[:5])  # fewer rows than latents: the rest keep their random rows
    assert torch.equal(few.W_dec[0, 5:], before[0, 5:]) and not torch.equal(few.W_dec[0, :5], before[0, :5])


def test_zeros_init_is_sparsifys_transcoder_init_and_its_rows_stay_free():
    """decoder_init = "zeros": the decoder from zero, nn.Linear's encoder init, and the SAE computes
    with its rows as stored (no unit norm): the first step moves the decoder, not the encoder."""
    cfg = SAEConfig(d_sae=16, k=4, decoder_init="zeros", target_hook="blocks.0.hook_mlp_out")
    sae = SparseAutoencoder(cfg, d_in=9, d_out=5)
    assert not sae.W_dec.any() and not sae.b_enc.any()
    assert sae.W_enc.abs().max() <= 1 / 3 and sae.W_enc.std() > 0.15  # U(-1/sqrt(9), 1/sqrt(9)): std 0.19
    with torch.no_grad():
        sae.W_dec.normal_()
    w = sae.weights()
    assert torch.equal(w.W_dec, sae.W_dec) and torch.equal(w.W_enc, sae.W_enc)
    x, y = torch.randn(32, 9), torch.randn(32, 5)
    out = sae(x)
    acts = (x @ sae.W_enc[0] + sae.b_enc[0]).topk(4, dim=-1)
    dense = torch.zeros(32, 16).scatter(-1, acts.indices, acts.values.relu())
    torch.testing.assert_close(out.decoded_activations, dense @ sae.W_dec[0] + sae.b_dec[0])
    fresh = SparseAutoencoder(cfg, d_in=9, d_out=5)
    ((fresh(x).decoded_activations - y) ** 2).sum().backward()
    assert fresh.W_dec.grad.abs().sum() > 0 and not fresh.W_enc.grad.any()


def test_the_sae_computes_with_unit_decoder_rows_and_scales_in_the_encoder():
    """weights() is the same function as the stored parameters (SAELens' decoder-norm rescaling):
    an activation is what the latent adds to the reconstruction, through a unit-norm row."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(activation="relu", expansion=2), d_in=8)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(1, 16, 1) * 3)  # rows of any norm
        sae.b_enc.normal_()
    x = torch.randn(32, 8)
    w = sae.weights()
    torch.testing.assert_close(w.W_dec.norm(dim=-1), torch.ones(1, 16))
    stored = torch.relu((x - sae.b_dec) @ sae.W_enc[0] + sae.b_enc) @ sae.W_dec[0] + sae.b_dec
    torch.testing.assert_close(sae(x).decoded_activations, stored)
    acts = sae(x).learned_activations
    torch.testing.assert_close(acts, torch.relu((x - sae.b_dec) @ sae.W_enc[0] + sae.b_enc) * sae.W_dec.norm(dim=-1))


def test_the_loss_is_on_saelens_scale():
    """Squared error summed over d_in and L1 summed over latents, both averaged over rows (SAELens'
    StandardTrainingSAE), so a coefficient carries over from a SAELens config."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(activation="relu", expansion=2), d_in=8)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(1, 16, 1) * 3)
    x = torch.randn(32, 8)
    out = sae_loss(sae, x, 3.0, None)
    pre = (x - sae.b_dec) @ sae.W_enc[0] + sae.b_enc
    acts = torch.relu(pre)
    recon = acts @ sae.W_dec[0] + sae.b_dec
    mse = (recon - x).pow(2).sum(-1).mean()
    l1 = (acts * sae.W_dec[0].norm(dim=-1)).sum(-1).mean()  # SAELens: decoder-norm-weighted, summed
    torch.testing.assert_close(out.mse, mse)
    torch.testing.assert_close(out.sparsity, l1)
    torch.testing.assert_close(out.loss, mse + 3.0 * l1)


@pytest.mark.parametrize("objective", ["vanilla", "matryoshka"])
@pytest.mark.parametrize("n_components", [None, 2])
def test_sparse_topk_matches_the_dense_computation(objective, n_components, monkeypatch):
    """The sparse TopK path (what trains: encoded a block of rows at a time, decoded through CSR
    matrices) gives the dense path's loss and gradients."""
    monkeypatch.setattr("trainer.sae.autoencoder.ENCODE_ROWS", 24)  # blocks of 24, 24 and 8 rows
    torch.manual_seed(0)
    x = torch.randn(56, 16) if n_components is None else torch.randn(56, n_components, 16)
    cfg = SAEConfig(activation="topk", k=4, expansion=4, objective=objective)
    sparse = SparseAutoencoder(cfg, d_in=16, n_components=n_components)
    sparse.b_enc.data.normal_()
    sparse.b_dec.data.normal_()
    dense = SparseAutoencoder(cfg, d_in=16, n_components=n_components)
    dense.load_state_dict(sparse.state_dict())
    sparse_loss = sae_loss(sparse, x, 0.0, None).loss
    xc, w = dense._components_first(x), dense.weights()
    acts = dense.activate(dense.pre_activations(xc, w), training=True)
    dense_loss = (_matryoshka_dense(dense, acts, xc, w) if objective == "matryoshka"
                  else (dense.decode(acts, w) - xc).pow(2).sum(-1).mean())
    torch.testing.assert_close(sparse_loss, dense_loss)
    sparse_loss.backward()
    dense_loss.backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sparse, name).grad, getattr(dense, name).grad, msg=name)


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
@pytest.mark.parametrize("objective", ["vanilla", "matryoshka"])
def test_every_activation_and_objective_trains(activation, objective):
    torch.manual_seed(0)
    x = torch.randn(256, 8) @ torch.randn(8, 8)
    sae = SparseAutoencoder(SAEConfig(activation=activation, objective=objective, k=4, expansion=4), d_in=8)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        out = sae_loss(sae, x, 1e-4, None)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        first = first if first is not None else out.mse.item()
    assert out.mse.item() < 0.5 * first
    if activation == "jumprelu":
        assert not torch.allclose(sae.log_threshold, torch.tensor(1e-3).log())  # the threshold learns


def test_aux_k_gives_dead_latents_a_gradient():
    sae = SparseAutoencoder(SAEConfig(activation="topk", k=2, expansion=4, aux_k=4), d_in=8)
    dead = torch.zeros(1, 32, dtype=torch.bool)
    dead[0, :8] = True
    out = sae_loss(sae, torch.randn(64, 8), 0.0, dead)
    assert out.aux > 0
    out.loss.backward()
    assert sae.W_enc.grad[0][:, :8].abs().sum() > 0


def test_resampling_moves_dead_latents_and_resets_their_optimizer_state():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(activation="relu", expansion=2), d_in=4)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(128, 4)
    sae_loss(sae, x, 1e-3, None).loss.backward()
    optimizer.step()
    dead = torch.zeros(1, 8, dtype=torch.bool)
    dead[0, [1, 5]] = True
    before = sae.W_dec.detach().clone()
    assert resample_dead_neurons(sae, optimizer, dead, x, torch.Generator().manual_seed(0)) == 2
    assert not torch.equal(sae.W_dec[0, 1], before[0, 1]) and torch.equal(sae.W_dec[0, 0], before[0, 0])
    torch.testing.assert_close(sae.W_dec[0, [1, 5]].norm(dim=-1), torch.full((2,), 0.1))  # a ReLU's initial norm
    state = optimizer.state[sae.W_enc]
    assert not state["exp_avg"][0][:, [1, 5]].any() and state["exp_avg"][0][:, 0].any()
    assert not optimizer.state[sae.W_dec]["exp_avg_sq"][0][[1, 5]].any()


class SignSGD(torch.optim.Optimizer):
    """The naive sign step, ``p -= lr * sign(grad)``, for schedulefree's own wrapper to wrap."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad.sign(), alpha=-group["lr"])


def test_the_sign_step_is_schedulefree_s_wrapper_around_signsgd_until_a_row_restarts():
    """``ScheduleFreeSign`` against the package's ``ScheduleFreeWrapper(SignSGD)`` on the same
    gradients, through an LR warmup (the average's weights follow lr_max^2): the same y every step
    and the same x at the end. After ``restart`` of some rows, those rows' x is the plain mean of
    their z since (the wrapper's would still hold the restart value at weight t/T); the others'
    stay the wrapper's; a state_dict round trip resumes to the same step."""
    from schedulefree import ScheduleFreeWrapper
    from trainer.training.optimizers import ScheduleFreeSign

    torch.manual_seed(0)
    ours, theirs = (torch.nn.Parameter(torch.randn(2, 3, 5)) for _ in range(2))
    theirs.data.copy_(ours.data)
    fast, naive = ScheduleFreeSign([ours], lr=0.1), ScheduleFreeWrapper(SignSGD([theirs], lr=0.1), momentum=0.95)
    naive.train()
    for step in range(12):
        grad = torch.randn(2, 3, 5)
        for optimizer, p in ((fast, ours), (naive, theirs)):
            optimizer.param_groups[0]["lr"] = 0.1 * min(1.0, (step + 1) / 4)
            p.grad = grad.clone()
            optimizer.step()
        torch.testing.assert_close(ours.detach(), theirs.detach())
    index = (1, slice(None), torch.tensor([0, 3]))  # latents 0 and 3 of component 1, as resampling indexes
    with torch.no_grad():
        ours[index] = 7.0
    fast.restart(ours, index)
    zs = []
    for _ in range(5):
        grad = torch.randn(2, 3, 5)
        for optimizer, p in ((fast, ours), (naive, theirs)):
            p.grad = grad.clone()
            optimizer.step()
        zs.append(fast.state[ours]["z"][index].clone())
    # a checkpoint (the restarted rows' own weight sums included) resumes to the same steps
    resumed = torch.nn.Parameter(ours.detach().clone())
    again = ScheduleFreeSign([resumed], lr=0.1)
    again.load_state_dict(copy.deepcopy(fast.state_dict()))  # as torch.save / torch.load would: no shared tensors
    grad = torch.randn(2, 3, 5)
    for optimizer, p in ((fast, ours), (naive, theirs), (again, resumed)):
        p.grad = grad.clone()
        optimizer.step()
    zs.append(fast.state[ours]["z"][index].clone())
    torch.testing.assert_close(resumed.detach(), ours.detach())
    fast.eval(), naive.eval()
    torch.testing.assert_close(ours[index], torch.stack(zs).mean(0))
    others = torch.ones(2, 3, 5, dtype=torch.bool)
    others[1, :, [0, 3]] = False
    torch.testing.assert_close(ours[others], theirs[others])
    fast.train()
    assert not torch.allclose(ours[index], torch.stack(zs).mean(0))  # back at y


@pytest.mark.parametrize("step", ["signsgd", "schedulefree_adam"])
def test_a_schedule_free_step_trains_and_its_average_is_what_gets_exported(step):
    """sparsify's step (issue 32) and schedule-free Adam train an SAE; ``at_average`` puts the
    average x in the parameters; a resampled latent's base iterate z is reset with it, so its
    averaged weights are the new ones, not a blend with the old."""
    from trainer.training.optimizers import at_average, make_optimizer

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(activation="topk", k=2, expansion=2, optimizer=step, lr=1e-2), d_in=4)
    optimizer = make_optimizer(step, sae.parameters(), 1e-2)
    x = torch.randn(256, 4)
    first = None
    for _ in range(60):
        out = sae_loss(sae, x, 0.0, None)
        first = first if first is not None else out.mse.item()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.mse.item() < 0.7 * first
    dead = torch.zeros(1, 8, dtype=torch.bool)
    dead[0, [1, 5]] = True
    resample_dead_neurons(sae, optimizer, dead, x, torch.Generator().manual_seed(0))
    new_rows, old_row = sae.W_dec[0, [1, 5]].detach().clone(), sae.W_dec[0, 0].detach().clone()
    at_average(optimizer)
    torch.testing.assert_close(sae.W_dec[0, [1, 5]], new_rows)  # x = y = z for a resampled latent
    assert not torch.allclose(sae.W_dec[0, 0], old_row)  # the others' average is not their last point
    name = SAEConfig(optimizer=step).name()  # the default step (schedulefree_adam) is not named; another is
    assert name.endswith("-signsgd") if step == "signsgd" else name.endswith("-s0")


def test_a_resampled_topk_latent_can_outbid_the_others():
    """Under TopK a resampled latent gets the alive latents' mean encoder norm and no bias: at a
    fifth of it (sparse_autoencoder's ReLU choice) none was ever picked again (measured)."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(activation="topk", k=2, expansion=2), d_in=4)
    dead = torch.zeros(1, 8, dtype=torch.bool)
    dead[0, [1, 5]] = True
    alive_norm = sae.weights().W_enc[0][:, ~dead[0]].norm(dim=0).mean()
    resample_dead_neurons(sae, torch.optim.Adam(sae.parameters()), dead, torch.randn(64, 4), torch.Generator())
    torch.testing.assert_close(sae.weights().W_enc[0][:, [1, 5]].norm(dim=0), torch.full((2,), alive_norm.item()))
    assert not sae.b_enc[0, [1, 5]].any()


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk"])
def test_a_resampled_gated_latent_fires_like_an_average_alive_one(activation):
    """Behind a gate (ReLU's 0, JumpReLU's threshold, BatchTopK's inference threshold) a resampled
    latent fires on the resampling inputs as often as an alive latent does on average, with their
    mean activation: with a bias of 0 it fired on about half of them and died again (measured)."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(activation=activation, k=4, expansion=4, jumprelu_threshold=0.005), d_in=16)
    x = torch.randn(2048, 16) * 3
    with torch.no_grad():  # alive latents fire on a minority of rows: bias at minus a standard deviation
        spread = sae.pre_activations(sae._components_first(x), sae.weights())[0].std(0)
        sae.b_enc[0] = -spread / sae.W_dec[0].norm(dim=-1)
        sae.calibrate_threshold(x) if activation == "batchtopk" else None
    dead = torch.zeros(1, 64, dtype=torch.bool)
    dead[0, :8] = True
    w = sae.weights()

    def acts():
        return sae.activate(sae.pre_activations(sae._components_first(x), sae.weights()), training=False)[0]

    before = acts()[:, 8:]
    rate, mean = (before > 0).float().mean(), before.sum() / (before > 0).sum()
    resample_dead_neurons(sae, torch.optim.Adam(sae.parameters()), dead, x, torch.Generator().manual_seed(0))
    new = acts()[:, :8]
    assert 0.02 < rate < 0.5
    torch.testing.assert_close((new > 0).float().mean(0), torch.full((8,), rate.item()), atol=2 / 2048, rtol=0)
    torch.testing.assert_close(new.sum(0) / (new > 0).sum(0), torch.full((8,), mean.item()), rtol=1e-2, atol=0)
    torch.testing.assert_close(sae.weights().W_enc[0][:, 8:], w.W_enc[0][:, 8:])  # the alive ones untouched


def test_evaluate_against_a_hand_computed_case():
    sae = SparseAutoencoder(SAEConfig(activation="relu", d_sae=3), d_in=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, -1.0]]]))
        sae.b_enc.copy_(torch.tensor([[0.0, 0.0, -5.0]]))  # latent 2 never fires
        sae.W_dec.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]]))
        sae.b_dec.zero_()
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, 0.0]])
    m = evaluate(sae, rows)
    # acts: [1,0,0] [0,2,0] [0,0,0] [0,0,0]; only row 3 is misreconstructed (error 1).
    assert m.l0 == pytest.approx(0.5) and m.l1 == pytest.approx(0.75)
    assert m.mse == pytest.approx(1 / 8)
    assert m.fvu == pytest.approx(1 / 5) and m.explained_variance == pytest.approx(0.8)  # variance sum 5
    assert m.freqs.tolist() == [0.25, 0.25, 0.0] and m.mean_values.tolist() == [1.0, 2.0, 0.0]
    assert (m.n_dead, m.n_almost_dead, m.n_dense) == (1, 1, 2)


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.randn(200, 3) * 0.01 + torch.tensor([1.0, 2.0, 3.0]), torch.full((20, 3), 1000.0)])
    torch.testing.assert_close(geometric_median(points), torch.tensor([1.0, 2.0, 3.0]), atol=0.05, rtol=0)


def test_sweep_files(tmp_path):
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text('[run]\nbatch_size = 512\n[[sae]]\nactivation = "relu"\nl1_coefficient = [1e-3, 1e-2]\n'
                          '[[sae]]\nk = [16, 32]\n')
    sweep = load_sweep(sweep_file, {"tokens": 1000})
    assert sweep.run.batch_size == 512 and sweep.run.tokens == 1000
    assert [(c.activation, c.l1_coefficient, c.k) for c in sweep.saes] == [
        ("relu", 1e-3, 32), ("relu", 1e-2, 32), ("topk", 5.0, 16), ("topk", 5.0, 32)]
    assert [len(g) for g in split_cfgs(list(sweep.saes))] == [2, 2]
    # a grid over a setting the name does not show still gives each SAE its own folder
    sweep_file.write_text("[[sae]]\ndecoder_init_norm = [0.1, 0.3]\n")
    assert sae_names(load_sweep(sweep_file).saes) == ["topk-vanilla-x8-k32-lr0.008-s0-decoder_init_norm0.1",
                                                     "topk-vanilla-x8-k32-lr0.008-s0-decoder_init_norm0.3"]


@pytest.mark.parametrize("text, message", [
    ("[[sae]]\nl1_coef = 1\n", "unknown key(s) ['l1_coef']"),
    ("[[sae]]\nactivation = \"gelu\"\n", "activation='gelu': must be 'relu', 'jumprelu', 'topk' or 'batchtopk'"),
    ("[run]\nbatch_size = -4\n", "batch_size=-4: must be greater than or equal to 1"),
    ("[run]\ntokens = \"many\"\n", "tokens='many': must be a valid integer"),
    # issue 37: each was a traceback, an exit-0 NaN export, or nothing trained
    ("[[sae]]\nk = 3.5\n", "k=3.5: must be a valid integer"),
    ("[[sae]]\nseed = 1180591620717411303424\n", "seed=1180591620717411303424: must be less than 9223372036854775808"),
    ("sae = 5\n", "sae must be one or more [[sae]] tables, not 5"),
    ("run = 5\n", "[run] must be a table of settings, not 5"),
    ("[[sae]]\nobjective = \"matryoshka\"\nmatryoshka_prefixes = [1, \"a\"]\n", "matryoshka_prefixes[1]='a': must be a valid integer"),
    ("[run]\nlog_every = 0\n", "log_every=0: must be greater than or equal to 1"),
    ("[run]\ntokens = inf\n", "tokens=inf: must be a valid integer"),
    ("[[sae]]\nlr = inf\n", "lr=inf: must be a finite number"),
    ("[[sae]]\nl1_coefficient = nan\n", "l1_coefficient=nan: must be a finite number"),
    ("[[sae]]\njumprelu_bandwidth = 0\n", "jumprelu_bandwidth=0: must be greater than 0"),
    ("[[sae]]\ndecoder_init_norm = 0.0\n", "decoder_init_norm=0.0: must be greater than 0"),
    ("[[sae]]\nk = []\n", "k = []: an empty list gives no SAE"),
    ("[[sae]]\nd_sae = 0\n", "d_sae=0: must be greater than or equal to 1"),
    ("[[sae]]\nrefit_rows = -1\n", "refit_rows=-1: must be greater than or equal to 0"),
    ("[[sae]]\nrefit_rows = 1.5\n", "refit_rows=1.5: must be a valid integer"),
    ("[[sae]]\nrefit_ridge = -0.5\n", "refit_ridge=-0.5: must be greater than or equal to 0"),
    ("[[sae]]\nsparsity_warmup = 2.5\n", "sparsity_warmup=2.5: a float is a fraction of the run (at most 1)"),
    ("[trainer]\n", "unknown table(s) ['trainer']"),
    ("[run\n", "not valid TOML"),
    ("[[sae]]\nk = 16\n[[sae]]\nk = 16\n", "SAEs #1 and #2 of the sweep are the same config"),
    ("[[sae]]\ndead_after = 1.5\n", "dead_after=1.5: a float is a fraction of the run (at most 1); an int counts tokens"),
])
def test_bad_sweep_files(tmp_path, text, message):
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load_sweep(sweep_file)
    assert message in str(info.value)


def test_encoder_backward_matches_autograd():
    """The encoder's hand-written backward (b_dec's gradient as a matrix-vector product) is exact."""
    from trainer.sae.autoencoder import _Encode

    torch.manual_seed(0)
    shapes = [(2, 5, 3), (2, 3), (2, 3, 4), (2, 4)]
    args = tuple(torch.randn(s, dtype=torch.double, requires_grad=True) for s in shapes)
    assert torch.autograd.gradcheck(_Encode.apply, args)


def _window(rows: int, components: int, d: int, misaligned: bool) -> np.ndarray:
    """A float32 window of -1s starting on a cache line, or 4 bytes past one."""
    block = np.empty(rows * components * d + 32, np.float32)
    start = (-block.ctypes.data % 64) // 4 + misaligned
    window = block[start : start + rows * components * d].reshape(rows, components, d)
    window[:] = -1
    return window


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d, misaligned, kernel", [(96, False, "non-temporal"), (96, True, "line"), (100, False, "any width")])
def test_scatter_scaled_equals_the_torch_shuffle(dtype, d, misaligned, kernel):
    """Each kernel (whole lines past the cache, whole lines, any width) writes bit for bit what
    the torch ops of a GPU window give, for every stored dtype, several components, and the edge
    values of half floats (signed zero, subnormal, infinity, the largest finite); and leaves the
    window's other rows alone."""
    torch.manual_seed(0)
    stored = torch.randn(3, 500, d).to(dtype)
    stored[1, 7, :6] = torch.tensor([0.0, -0.0, 6e-8, float("inf"), -float("inf"), 65504.0]).to(dtype)
    order, scales = torch.randperm(600)[:500], torch.tensor([1.3, 0.7, 2.0])  # row r goes to order[r]
    window = _window(600, 3, d, misaligned)
    name = str(dtype).removeprefix("torch.")
    for c in range(3):
        rows = to_storage(stored[c], name)
        scatter_scaled(rows[:200], order[:200].numpy(), scales[c].item(), window, c, name)  # a chunk at a time
        scatter_scaled(rows[200:], order[200:].numpy(), scales[c].item(), window, c, name)
    expected = shuffled_on_device(stored, torch.argsort(order), scales)
    assert torch.equal(torch.from_numpy(window)[order.sort().values], expected)
    padded = torch.full((502, 3, d), -1.0)  # a GPU window's rows, with a free row before and after
    assert shuffled_on_device(stored, torch.argsort(order), scales, out=padded[1:501]).data_ptr() == padded[1].data_ptr()
    assert torch.equal(padded[1:501], expected) and (padded[[0, 501]] == -1).all()
    assert (np.delete(window, order.numpy(), axis=0) == -1).all()
    expected_kernel = {"non-temporal": _LINE_KERNELS.get((name, True)), "line": _LINE_KERNELS.get((name, False)),
                       "any width": _scatter_any_width}[kernel]
    assert _kernel_for(to_storage(stored[0], name), window, name) is expected_kernel


def test_scatter_scaled_rejects_bad_rows_places_and_windows():
    rows, window = np.zeros((2, 16), np.float16), _window(10, 1, 16, False)
    for bad in ([0, 10], [-1, 3]):
        with pytest.raises(IndexError, match="out of range"):
            scatter_scaled(rows, np.array(bad), 1.0, window, 0, "float16")
    with pytest.raises(IndexError, match="out of range"):
        scatter_scaled(rows, np.array([0]), 1.0, window, 0, "float16")  # fewer places than rows
    with pytest.raises(TypeError, match="cannot widen"):
        scatter_scaled(rows.astype(np.float64), np.array([0, 1]), 1.0, window, 0, "float16")
    with pytest.raises(TypeError, match="cannot widen"):
        scatter_scaled(rows, np.array([0, 1]), 1.0, window, 0, "int8")
    with pytest.raises(ValueError, match="cannot write"):
        scatter_scaled(rows, np.array([0, 1]), 1.0, window, 1, "float16")  # no component 1
    with pytest.raises(ValueError, match="cannot write"):
        scatter_scaled(rows, np.array([0, 1]), 1.0, window.astype(np.float64), 0, "float16")
    assert (window == -1).all()


def test_window_permutation_is_seeded_uniform_and_inverted_by_places():
    order = permutation(1000, seed_of(0, 1, 2))
    assert sorted(order.tolist()) == list(range(1000))
    assert np.array_equal(order, permutation(1000, seed_of(0, 1, 2)))  # the same seed, the same order
    assert not np.array_equal(order, permutation(1000, seed_of(0, 1, 3)))
    assert permutation(1000, seed_of(0, 1, 2))[:5].tolist() == [169, 154, 351, 342, 787]  # fixed: resumes rely on it
    places = places_of(order, 7)
    assert np.array_equal(places[order], np.arange(7, 1007))
    # Each of the 6 orders of 3 items about equally often (60,000 draws: 10,000 +- 100 each, 5 sigma = 500).
    counts = collections.Counter(tuple(permutation(3, seed_of(7, k)).tolist()) for k in range(60_000))
    assert len(counts) == 6 and all(abs(c - 10_000) < 500 for c in counts.values())
    assert permutation(0, seed_of(1)).shape == (0,) and permutation(1, seed_of(1)).tolist() == [0]


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk", "batchtopk"])
def test_an_export_computes_what_the_trained_sae_computes_on_raw_inputs(activation, tmp_path):
    """Input scale folded into the files and decoder rows of any norm (stored, and a refit's gain):
    the loaded SAE on raw rows is the trained SAE on scaled rows, unscaled (BatchTopK through its
    calibrated threshold), its latents the trained ones in the file's units."""
    from trainer.outputs.export import export_saelens, load_saelens

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(activation=activation, expansion=4, k=3, jumprelu_threshold=0.05), d_in=8)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(1, 32, 1) * 3)
        sae.decoder_gain.uniform_(0.5, 2)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_()
    raw, scale = torch.randn(64, 8) * 5, 0.3
    if activation == "batchtopk":
        sae.calibrate_threshold(raw * scale)
    export_saelens(sae.eval(), tmp_path, component=0, scale=scale, metadata={})
    loaded, cfg = load_saelens(str(tmp_path))  # a str works as well as a Path
    sparsity = {"k"} if activation in ("topk", "batchtopk") else {"l1_coefficient"}
    assert set(cfg["trainer"]) == {"activation", "objective", "input_scale"} | sparsity  # no irrelevant k
    expected = sae(raw * scale)
    got = loaded(raw)
    torch.testing.assert_close(got.decoded_activations, expected.decoded_activations / scale, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.learned_activations, expected.learned_activations, atol=1e-4, rtol=1e-4)


def test_batchtopk_threshold_is_calibrated_to_k_on_the_rows_given():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(activation="batchtopk", k=4, expansion=4), d_in=8)
    x = torch.randn(300, 8)
    sae.calibrate_threshold(x, rows=64)  # blocks of 64 rows: the same as all at once
    acts = sae.eval()(x).learned_activations
    assert (acts > 0).sum().item() == 4 * 300


def test_report_contexts_read_as_the_text_for_byte_level_bpe_and_wordpiece():
    from transformers import AutoTokenizer

    from cache_server.models import _minilm_path, _shakespeare_gpt_path
    from trainer.report import _detokenize, is_byte_level

    gpt = AutoTokenizer.from_pretrained(str(_shakespeare_gpt_path()))
    text = "ROMEO: café — naïve,\nthou art"
    pieces = gpt.convert_ids_to_tokens(gpt(text, add_special_tokens=False)["input_ids"])
    assert is_byte_level(gpt.convert_ids_to_tokens(list(range(len(gpt)))))
    assert _detokenize(pieces, byte_level=True) == text.replace("\n", "⏎")
    bert = AutoTokenizer.from_pretrained(str(_minilm_path()))
    assert not is_byte_level(bert.convert_ids_to_tokens(list(range(len(bert)))))
    assert _detokenize(bert.tokenize("the quickest fox")) == "the quickest fox"


def test_report_contexts_are_whole_words_without_special_tokens():
    from trainer.report import _example, _Text

    pieces = ["<|endoftext|>", "ĠRom", "eo", ",", "Ġsweet", "ĠRom", "eo", "Ġdoth", "Ġsp", "eak", "Ġsoft", "ly", "Ġnow"]
    text = _Text({(0, p): i for p, i in enumerate(range(len(pieces)))}, {}, pieces, byte_level=True)
    # the left window (10 pieces) starts inside "Romeo": that half word is dropped
    def shown(pos):
        e = _example(text, 1.0, 0, pos)
        return e.before, e.token, e.after

    assert shown(12) == (", sweet Romeo doth speak softly", " now", "")
    # BOS is never shown, and the right side ends where a word does (not inside "speak")
    assert shown(2) == (" Rom", "eo", ", sweet Romeo")


def test_the_progress_bar_summarises_each_group_of_saes():
    """Two ReLU SAEs are two, with their ranges, not one 'relu:' loss (issue 16)."""
    from trainer.config import SAEConfig
    from trainer.training.train import _progress

    relu = [SAEConfig(activation="relu", l1_coefficient=c) for c in (2.0, 5.0)]
    topk = SAEConfig(activation="topk", k=16)

    rows = [{"fvu": 0.2, "l0": 80.0}, {"fvu": 0.31, "l0": 41.0}, {"fvu": 0.1, "l0": 16.0}]
    text = _progress([relu, [topk]], [*relu, topk], rows)
    assert text == "2 relu: FVU 0.200-0.310 L0 41-80 | 1 topk: FVU 0.100 L0 16"


def test_run_json_records_only_the_settings_an_sae_uses():
    """Issue 16: a ReLU's run.json entry has no k, a TopK's no l1_coefficient or JumpReLU settings."""
    relu, topk = SAEConfig(activation="relu").record(), SAEConfig(activation="topk", k=8).record()
    jump = SAEConfig(activation="jumprelu", objective="matryoshka", jumprelu_sparsity="step").record()
    assert "k" not in relu and "aux_k" not in relu and relu["l1_coefficient"] == SAEConfig().l1_coefficient
    assert topk["k"] == 8 and not {"l1_coefficient", "sparsity_warmup", "jumprelu_threshold"} & set(topk)
    assert jump["jumprelu_sparsity"] == "step" and "jumprelu_tanh_scale" not in jump and "matryoshka_prefixes" in jump
    assert "matryoshka_prefixes" not in relu and relu["lr"] == topk["lr"]


def test_the_harvest_bar_says_what_it_knows_and_no_dash():
    """Issue 16: a resumed or queued harvest has no rate yet; the bar says so instead of "-"."""
    from datetime import datetime, timezone

    from shared.schemas import HarvestJob, HarvestRequest
    from trainer.data.client import harvest_postfix

    now = datetime.now(timezone.utc)
    job = HarvestJob(job_id="a" * 24, dataset_id="b" * 24, status="running", tokens_total=100, created_at=now,
                     updated_at=now, request=HarvestRequest(model="m", hooks=["blocks.0.hook_resid_post"], n_tokens=100))
    assert harvest_postfix(job) == "running, measuring its rate"
    assert harvest_postfix(job.model_copy(update={"status": "queued"})) == "queued"
    measured = job.model_copy(update={"tokens_per_second": 12345.6, "eta_seconds": 7.2})
    assert harvest_postfix(measured) == "server 12,346 tok/s, ETA 7s, running"


def test_a_topk_step_runs_under_bf16_autocast_and_agrees_with_fp32():
    """Issue 19's bench found the sparse kernels fail under bf16 autocast (none on CPU): they run
    at the parameters' precision, and the step's loss and gradients agree with fp32's."""
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    sae = SparseAutoencoder(SAEConfig(activation="topk", k=4, expansion=4), d_in=16)
    losses, grads = [], []
    for autocast in (False, True):
        sae.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = sae_loss(sae, x, 0.0, None)
            out.loss.backward()
        losses.append(out.loss.item())
        grads.append(sae.W_dec.grad.clone())
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
    assert torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0) > 0.98
