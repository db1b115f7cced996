"""The decoder's least-squares refit (trainer.training.refit) against the naive solve, and what it
leaves alone: the encoder, so the latents (L0, the TopK ranking) are those trained."""

import pytest
import torch

from trainer.config import SAEConfig
from trainer.sae.autoencoder import SparseAutoencoder
from trainer.training.refit import refit_decoder


def _trained_like(cfg: SAEConfig, d_in: int = 8, d_out: int | None = None) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(cfg, d_in=d_in, d_out=d_out)
    with torch.no_grad():
        if not sae.W_dec.any():  # decoder_init = "zeros": rows as training leaves them
            sae.W_dec.normal_(0, 0.3)
        sae.W_dec.mul_(torch.rand(1, sae.d_sae, 1) + 0.5)  # stored rows of several norms, as Adam leaves them
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_()
        if cfg.skip:
            sae.W_skip.normal_(0, 0.1)
    return sae.eval()


def _stacked(blocks, old, lam):
    """The refit's objective as one least-squares system: each block's rows, then the ridge's."""
    ridge = torch.eye(old.shape[0], dtype=torch.float64)[:-1] * lam ** 0.5  # no pull on the bias (the last row)
    A = torch.cat([a.double() for a, _ in blocks] + [ridge])
    return A, torch.cat([t.double() for _, t in blocks] + [ridge @ old.double()])


def assert_optimal(sae, blocks, old, lam):
    """The refit decoder (rows as the SAE computes them, then the bias) reaches the objective's
    minimum, found by lstsq in float64, to 1e-5 of it; the products are float32 (see
    refit.NormalEquations), so coefficients along the objective's flat directions may differ."""
    A, T = _stacked(blocks, old, lam)
    w = sae.weights()
    got = torch.cat([w.W_dec[0], sae.b_dec[:1]]).detach().double()
    best = torch.linalg.lstsq(A, T).solution
    objective = lambda D: float(((A @ D - T) ** 2).sum())  # noqa: E731
    assert objective(got) <= objective(best) * (1 + 1e-5), (objective(got), objective(best))
    assert objective(best) < objective(old.double())


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu", "batchtopk"])
def test_the_refit_is_the_least_squares_decoder_of_the_trained_latents(activation):
    cfg = SAEConfig(activation=activation, expansion=4, k=3, jumprelu_threshold=0.05)
    sae = _trained_like(cfg)
    x = torch.randn(500, 8) * 2 + 1
    if activation == "batchtopk":
        sae.calibrate_threshold(x)
    before = sae(x)
    w = sae.weights()
    old = torch.cat([w.W_dec[0], sae.b_dec]).detach()
    z = before.learned_activations.detach()
    design = torch.cat([z, torch.ones(len(z), 1)], 1)
    lam = 0.01 * float((z ** 2).sum(0).mean())
    assert refit_decoder(sae, [(x[:256], None), (x[256:], None)], ridge=0.01) == 500
    after = sae(x)
    torch.testing.assert_close(after.learned_activations, z, atol=1e-5, rtol=1e-5)  # the encoder's latents
    assert_optimal(sae, [(design, x)], old, lam)
    assert ((after.decoded_activations - x) ** 2).sum() < ((before.decoded_activations - x) ** 2).sum()


def test_a_matryoshka_refit_weighs_each_latent_by_the_prefixes_that_hold_it():
    cfg = SAEConfig(activation="topk", objective="matryoshka", d_sae=16, k=4, matryoshka_prefixes=(4, 8, 16))
    sae = _trained_like(cfg)
    x = torch.randn(400, 8)
    z = sae(x).learned_activations.detach()
    w = sae.weights()
    old = torch.cat([w.W_dec[0], sae.b_dec]).detach()
    blocks = [(torch.cat([z * (torch.arange(16) < m), torch.ones(len(z), 1)], 1), x) for m in (4, 8, 16)]
    counts = torch.tensor([3.0] * 4 + [2.0] * 4 + [1.0] * 8)
    lam = 0.01 * float(((z ** 2).sum(0) * counts).mean())
    refit_decoder(sae, [(x, None)], ridge=0.01)
    assert_optimal(sae, blocks, old, lam)


@pytest.mark.parametrize("decoder_init", ["data", "zeros"])  # zeros: free rows, no gain
def test_a_skip_transcoders_refit_predicts_the_target_less_its_skip_path(decoder_init):
    cfg = SAEConfig(activation="topk", expansion=4, k=3, target_hook="blocks.0.hook_mlp_out", skip=True,
                    decoder_init=decoder_init)
    sae = _trained_like(cfg, d_in=8, d_out=6)
    x, y = torch.randn(300, 8), torch.randn(300, 6)
    z = sae(x).learned_activations.detach()
    w = sae.weights()
    old = torch.cat([w.W_dec[0], sae.b_dec]).detach()
    lam = 0.01 * float((z ** 2).sum(0).mean())
    blocks = [(torch.cat([z, torch.ones(300, 1)], 1), y - x @ sae.W_skip[0].detach())]
    refit_decoder(sae, [(x, y)], ridge=0.01)
    assert_optimal(sae, blocks, old, lam)
    torch.testing.assert_close(sae(x).learned_activations, z)


def test_a_multi_component_sae_refits_each_component_on_its_own_rows():
    cfg = SAEConfig(activation="relu", expansion=2)
    torch.manual_seed(0)
    sae = SparseAutoencoder(cfg, d_in=4, n_components=2).eval()
    x = torch.randn(200, 2, 4)
    singles = []
    for c in range(2):
        one = SparseAutoencoder(cfg, d_in=4).eval()
        one.load_state_dict({k: v[c : c + 1] for k, v in sae.state_dict().items()})
        refit_decoder(one, [(x[:, c], None)], ridge=0.01)
        singles.append(one(x[:, c]).decoded_activations)
    refit_decoder(sae, [(x, None)], ridge=0.01)
    torch.testing.assert_close(sae(x).decoded_activations, torch.stack(singles, 1), atol=1e-5, rtol=1e-5)


def test_past_the_largest_system_the_trained_decoder_stands_and_no_row_is_read():
    sae = SparseAutoencoder(SAEConfig(activation="topk", d_sae=16_385, k=4), d_in=4).eval()
    before = {k: v.clone() for k, v in sae.state_dict().items()}

    def unread():
        raise AssertionError("a row was read")
        yield

    assert refit_decoder(sae, unread(), ridge=0.01) == 0
    assert all(torch.equal(v, sae.state_dict()[k]) for k, v in before.items())
