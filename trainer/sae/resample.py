"""Dead-latent resampling, sparse_autoencoder style: point dead latents at badly reconstructed
inputs and reset their optimizer state, so Adam's moments don't drag them back."""

import torch
from torch import Tensor

from trainer.sae.autoencoder import SparseAutoencoder

ENCODER_NORM_FACTOR = {"relu": 0.2, "jumprelu": 0.2, "topk": 1.0, "batchtopk": 1.0}
"""A resampled latent's encoder norm over the alive latents' mean. sparse_autoencoder's 0.2 suits a
ReLU, where any positive pre-activation fires; under TopK a latent must outbid the others, and at
0.2 none did (measured, k=32: 8.3% dead with resampling, 0.7% at 1.0)."""


@torch.no_grad()
def resample_dead_neurons(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead: Tensor,
                          inputs: Tensor, generator: torch.Generator) -> int:
    """Resample latents marked in ``dead`` ``[component, d_sae]`` from ``inputs`` ``[n, (component,) d]``.

    Inputs are drawn with probability proportional to their squared reconstruction loss.
    Returns the number of latents resampled.
    """
    xc, w = sae._components_first(inputs), sae.weights()
    recon = sae.decode(sae.activate(sae.pre_activations(xc, w), training=False), w)
    losses = (recon - xc).pow(2).sum(-1)  # [component, n]
    total = 0
    for c in range(xc.shape[0]):
        ids = dead[c].nonzero().squeeze(1)
        if ids.numel() == 0:
            continue
        weights = losses[c].pow(2).cpu()
        weights = weights if weights.sum() > 0 else torch.ones_like(weights)
        picks = torch.multinomial(weights, ids.numel(), replacement=True, generator=generator).to(xc.device)
        directions = xc[c, picks] - sae.b_dec[c]
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = ~dead[c]
        enc_norm = w.W_enc[c][:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        # Stored rows at the decoder's initial norm; the computing encoder as sparse_autoencoder sets it.
        row_norm = sae.cfg.row_norm()
        sae.W_dec[c, ids] = directions * row_norm
        sae.W_enc[c][:, ids] = directions.T * (enc_norm * ENCODER_NORM_FACTOR[sae.cfg.activation] / row_norm)
        sae.b_enc[c, ids] = 0
        for detail in sae.reset_optimizer_parameter_details:
            state = optimizer.state.get(detail.parameter, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][c].index_fill_(detail.axis, ids, 0)
        total += ids.numel()
    return total
