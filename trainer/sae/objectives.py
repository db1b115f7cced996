"""Training objectives: vanilla (MSE + decoder-norm-weighted L1, or JumpReLU's L0) and Matryoshka
(reconstruct from nested prefixes of the dictionary), plus AuxK for the TopK family.

On SAELens' scale: the squared error is summed over d_in and averaged over rows, and the sparsity
penalty is summed over latents and averaged over rows, so an ``l1_coefficient`` from a SAELens
config gives a comparable L0 here.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.sae.autoencoder import SparseAutoencoder, SparseCode, Weights, _StepL0
from trainer.sae.clt import CrossLayerTranscoder


@dataclass
class StepOutput:
    loss: Tensor
    mse: Tensor
    sparsity: Tensor
    aux: Tensor
    l0: Tensor
    fired: Tensor
    """[component, d_sae] bool: latents that fired on this batch."""


def _mse(recon: Tensor, x: Tensor) -> Tensor:
    """Squared error summed over d_in, averaged over rows (and components)."""
    return (recon - x).pow(2).sum(-1).mean()


def sae_loss(sae: SparseAutoencoder, x: Tensor, sparsity_coefficient: float, dead: Tensor | None,
             y: Tensor | None = None) -> StepOutput:
    """The loss of one training step on ``x`` ``[batch, (component,) d_in]``: its reconstruction,
    or for a transcoder its prediction of ``y`` ``[batch, (component,) d_out]``."""
    if isinstance(sae, CrossLayerTranscoder):
        return _clt_loss(sae, x, y, dead)
    cfg = sae.cfg
    xc, w = sae._components_first(x), sae.weights()
    target = sae.target(xc, sae._components_first(y)) if sae.transcoder else xc
    zero = xc.new_zeros(())
    if cfg.activation == "topk":
        code = sae.encode_sparse(xc, w)
        recon = sae.decode_sparse(code, w)
        mse = _matryoshka_sparse(sae, code, target, w) if cfg.objective == "matryoshka" else _mse(recon, target)
        active = code.values > 0
        fired = torch.zeros(xc.shape[0], sae.d_sae, dtype=torch.bool, device=x.device)
        fired.scatter_(1, code.indices.flatten(1), active.flatten(1))
        l0 = active.sum(-1).float().mean()
        sparsity = zero
    else:
        pre = sae.pre_activations(xc, w)
        acts = sae.activate(pre, training=True)
        recon = sae.decode(acts, w)
        mse = _matryoshka_dense(sae, acts, target, w) if cfg.objective == "matryoshka" else _mse(recon, target)
        fired = acts.detach().amax(dim=1) > 0  # one pass each, no [batch, d_sae] mask kept
        l0 = _count_positive(acts.detach()) / (acts.shape[0] * acts.shape[1])
        if cfg.activation == "relu":
            # acts are in unit-decoder units, so their plain L1 is the decoder-norm-weighted L1.
            sparsity = acts.sum() / (acts.shape[0] * acts.shape[1])
        elif cfg.activation == "jumprelu" and cfg.jumprelu_sparsity == "tanh":  # Anthropic's: reaches the encoder
            sparsity = torch.tanh(cfg.jumprelu_tanh_scale * acts).sum(-1).mean()
        elif cfg.activation == "jumprelu":  # DeepMind's L0: only the thresholds learn from it
            sparsity = _StepL0.apply(pre, sae.log_threshold.unsqueeze(1), cfg.jumprelu_bandwidth).sum(-1).mean()
        else:
            sparsity = zero
    aux = _aux_k(sae, xc, target, recon, dead, w) if cfg.activation in ("topk", "batchtopk") and dead is not None else zero
    loss = mse + sparsity_coefficient * sparsity + cfg.aux_coefficient * aux
    return StepOutput(loss, mse.detach(), sparsity.detach(), aux.detach(), l0.detach(), fired)


def _clt_loss(clt: CrossLayerTranscoder, x: Tensor, y: Tensor, dead: Tensor | None) -> StepOutput:
    """A CLT's loss: the squared error of every output layer's prediction (summed over d_out,
    averaged over rows and layers, as a multi-component SAE's), plus AuxK per layer."""
    xc, yc, w = clt._components_first(x), clt._components_first(y), clt.weights()
    code = clt.encode_sparse(xc, w)
    recon = clt.decode_sparse(code, w)
    mse = _mse(recon, yc)
    active = code.values > 0
    fired = torch.zeros(clt.n_layers, clt.d_sae, dtype=torch.bool, device=x.device)
    fired.scatter_(1, code.indices.flatten(1), active.flatten(1))
    zero = xc.new_zeros(())
    aux = clt.aux_k(xc, (yc - recon).detach(), dead, w) if dead is not None else zero
    loss = mse + clt.cfg.aux_coefficient * aux
    return StepOutput(loss, mse.detach(), zero, aux.detach(), active.sum(-1).float().mean().detach(), fired)


def _count_positive(acts: Tensor, rows: int = 256) -> Tensor:
    """Positive entries of ``[component, batch, d_sae]``, a block of rows at a time: a third of
    ``count_nonzero``'s time here, and no batch-sized mask allocated (measured)."""
    return sum((acts[:, lo : lo + rows] > 0).sum() for lo in range(0, acts.shape[1], rows))


def _matryoshka_dense(sae: SparseAutoencoder, acts: Tensor, target: Tensor, w: Weights) -> Tensor:
    losses = [_mse(torch.baddbmm(sae.b_dec.unsqueeze(1), acts[..., :m], w.W_dec[:, :m]), target)
              for m in sae.cfg.prefixes(sae.d_in)]
    return torch.stack(losses).mean()


def _matryoshka_sparse(sae: SparseAutoencoder, code: SparseCode, target: Tensor, w: Weights) -> Tensor:
    losses = [_mse(sae.decode_sparse(code, w, limit=m), target) for m in sae.cfg.prefixes(sae.d_in)]
    return torch.stack(losses).mean()


def _aux_k(sae: SparseAutoencoder, xc: Tensor, target: Tensor, recon: Tensor, dead: Tensor, w: Weights) -> Tensor:
    """AuxK (Gao et al.): the top ``aux_k`` dead latents must explain the residual, which keeps
    dead latents learning. In the main loss's units, so ``aux_coefficient`` weighs it against
    the reconstruction as their α = 1/32 does."""
    residual = (target - recon).detach()
    losses = []
    for c in range(xc.shape[0]):
        dead_ids = dead[c].nonzero().squeeze(1)
        if dead_ids.numel() == 0:
            continue
        pre = torch.addmm(w.b_enc[c, dead_ids], xc[c] - sae.centre[c], w.W_enc[c][:, dead_ids])
        values, indices = pre.topk(min(sae.cfg.aux_k, dead_ids.numel()), dim=-1)
        aux_recon = F.embedding_bag(indices, w.W_dec[c][dead_ids], per_sample_weights=values.relu(), mode="sum")
        losses.append(_mse(aux_recon, residual[c]))
    return torch.stack(losses).mean() if losses else xc.new_zeros(())
