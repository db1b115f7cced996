"""Training objectives: vanilla (MSE + decoder-norm-weighted L1, or JumpReLU's L0) and Matryoshka
(reconstruct from nested prefixes of the dictionary), plus AuxK for the TopK family.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.sae import SparseAutoencoder, SparseCode, _StepL0


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
    return (recon - x).pow(2).mean()


def sae_loss(sae: SparseAutoencoder, x: Tensor, sparsity_coefficient: float, dead: Tensor | None) -> StepOutput:
    """The loss of one training step on ``x`` ``[batch, (component,) d_in]``."""
    cfg = sae.cfg
    xc = sae._components_first(x)
    zero = xc.new_zeros(())
    if cfg.activation == "topk":
        code = sae.encode_sparse(xc)
        recon = sae.decode_sparse(code)
        mse = _matryoshka_sparse(sae, code, xc) if cfg.objective == "matryoshka" else _mse(recon, xc)
        active = code.values > 0
        fired = torch.zeros(xc.shape[0], sae.d_sae, dtype=torch.bool, device=x.device)
        fired.scatter_(1, code.indices.flatten(1), active.flatten(1))
        l0 = active.sum(-1).float().mean()
        sparsity = zero
    else:
        pre = sae.pre_activations(xc)
        acts = sae.activate(pre, training=True)
        recon = sae.decode(acts)
        mse = _matryoshka_dense(sae, acts, xc) if cfg.objective == "matryoshka" else _mse(recon, xc)
        fired = acts.detach().amax(dim=1) > 0  # one pass each, no [batch, d_sae] mask kept
        l0 = _count_positive(acts.detach()) / (acts.shape[0] * acts.shape[1])
        if cfg.activation == "relu":
            # Decoder-norm-weighted L1, summed over the batch first: no [batch, d_sae] product.
            sparsity = (acts.sum(dim=1) * sae.W_dec.norm(dim=-1)).sum() / (acts.shape[0] * acts.shape[1])
        elif cfg.activation == "jumprelu":
            sparsity = _StepL0.apply(pre, sae.log_threshold.unsqueeze(1), cfg.jumprelu_bandwidth).sum(-1).mean()
        else:
            sparsity = zero
    aux = _aux_k(sae, xc, recon, dead) if cfg.activation in ("topk", "batchtopk") and dead is not None else zero
    loss = mse + sparsity_coefficient * sparsity + cfg.aux_coefficient * aux
    return StepOutput(loss, mse.detach(), sparsity.detach(), aux.detach(), l0.detach(), fired)


def _count_positive(acts: Tensor, rows: int = 256) -> Tensor:
    """Positive entries of ``[component, batch, d_sae]``, a block of rows at a time: a third of
    ``count_nonzero``'s time here, and no batch-sized mask allocated (measured)."""
    return sum((acts[:, lo : lo + rows] > 0).sum() for lo in range(0, acts.shape[1], rows))


def _matryoshka_dense(sae: SparseAutoencoder, acts: Tensor, xc: Tensor) -> Tensor:
    losses = [_mse(torch.baddbmm(sae.b_dec.unsqueeze(1), acts[..., :m], sae.W_dec[:, :m]), xc)
              for m in sae.cfg.prefixes(sae.d_in)]
    return torch.stack(losses).mean()


def _matryoshka_sparse(sae: SparseAutoencoder, code: SparseCode, xc: Tensor) -> Tensor:
    losses = [_mse(sae.decode_sparse(code, limit=m), xc) for m in sae.cfg.prefixes(sae.d_in)]
    return torch.stack(losses).mean()


def _aux_k(sae: SparseAutoencoder, xc: Tensor, recon: Tensor, dead: Tensor) -> Tensor:
    """AuxK: the top dead latents must explain the residual (keeps dead latents learning)."""
    residual = (xc - recon).detach()
    losses = []
    for c in range(xc.shape[0]):
        dead_ids = dead[c].nonzero().squeeze(1)
        if dead_ids.numel() == 0:
            continue
        pre = torch.addmm(sae.b_enc[c, dead_ids], xc[c] - sae.b_dec[c], sae.W_enc[c][:, dead_ids])
        values, indices = pre.topk(min(sae.cfg.aux_k, dead_ids.numel()), dim=-1)
        aux_recon = F.embedding_bag(indices, sae.W_dec[c][dead_ids], per_sample_weights=values.relu(), mode="sum")
        losses.append(_mse(aux_recon, residual[c]) / residual[c].pow(2).mean().clamp_min(1e-8))
    return torch.stack(losses).mean() if losses else xc.new_zeros(())
