"""Dead-latent resampling, sparse_autoencoder style: point dead latents at badly reconstructed
inputs and reset their optimizer state, so Adam's moments don't drag them back."""

import torch
from torch import Tensor

from trainer.sae.autoencoder import SparseAutoencoder, Weights


@torch.no_grad()
def resample_dead_neurons(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead: Tensor,
                          inputs: Tensor, generator: torch.Generator, targets: Tensor | None = None) -> int:
    """Resample latents marked in ``dead`` ``[component, d_sae]`` from ``inputs`` ``[n, (component,) d]``
    (a transcoder's: with its ``targets``).

    Inputs are drawn with probability proportional to their squared reconstruction loss.
    Returns the number of latents resampled.
    """
    xc, w = sae._components_first(inputs), sae.weights()
    yc = sae.target(xc, sae._components_first(targets)) if sae.transcoder else xc
    acts = sae.activate(sae.pre_activations(xc, w), training=False)
    recon = sae.decode(acts, w)
    losses = (recon - yc).pow(2).sum(-1)  # [component, n]
    total = 0
    for c in range(xc.shape[0]):
        ids = dead[c].nonzero().squeeze(1)
        if ids.numel() == 0:
            continue
        weights = losses[c].pow(2).cpu()
        weights = weights if weights.sum() > 0 else torch.ones_like(weights)
        picks = torch.multinomial(weights, ids.numel(), replacement=True, generator=generator).to(xc.device)
        directions = _unit(xc[c, picks] - sae.origin[c])
        alive = ~dead[c]
        # Stored rows at the decoder's initial norm; the encoder and bias set in computing units.
        row_norm = sae.cfg.row_norm() if sae.unit_rows else 1.0  # free rows: stored is computing
        sae.W_dec[c, ids] = (_unit(yc[c, picks] - sae.b_dec[c]) if sae.transcoder else directions) * row_norm
        scale, bias = _encoder(sae, c, ids, directions, xc[c], acts[c], alive, w)
        sae.W_enc[c][:, ids] = directions.T * (scale / row_norm)
        sae.b_enc[c, ids] = bias / row_norm
        for detail in sae.reset_optimizer_parameter_details:
            index = [slice(None)] * detail.parameter.dim()
            index[0], index[detail.axis] = c, ids
            reset_rows(optimizer, detail.parameter, tuple(index))
        total += ids.numel()
    return total


def reset_rows(optimizer, parameter: torch.Tensor, index: tuple) -> None:
    """A resampled latent starts afresh: Adam's moments zeroed; a schedule-free optimizer's base
    iterate set to the new weights (so its average and interpolation are them too), and under the
    sign step its average restarted (``ScheduleFreeSign.restart``)."""
    if hasattr(optimizer, "restart"):
        optimizer.restart(parameter, index)
        return
    state = optimizer.state.get(parameter, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][index] = 0
    if "z" in state:
        state["z"][index] = parameter.detach()[index]


def _unit(rows: Tensor) -> Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _encoder(sae: SparseAutoencoder, c: int, ids: Tensor, directions: Tensor, x: Tensor, acts: Tensor,
             alive: Tensor, w: Weights) -> tuple[Tensor, Tensor]:
    """A resampled latent's computing encoder norm and bias.

    TopK: the alive latents' mean encoder norm, the bias centring it at ``sae.origin`` (a latent
    fires by outbidding the others).
    Gated activations (ReLU, JumpReLU, BatchTopK's threshold): chosen on ``x`` so that the new
    latent fires as often as an alive latent does on average, and its mean activation where it fires
    is theirs. sparse_autoencoder's bias of 0 (with 0.2 of the mean norm) makes a latent fire on about
    half the inputs, and the sparsity penalty or BatchTopK's competition kills it again within
    steps; an encoder at the alive norm gives it activations tens of times too large, and a
    Matryoshka-BatchTopK run resampled late diverged (FVU 0.37 -> 5, measured)."""
    if not alive.any():
        return torch.ones(()), torch.zeros(())
    if sae.cfg.activation == "topk":
        scale = w.W_enc[c][:, alive].norm(dim=0).mean()
        return scale, -scale * (directions @ (sae.origin[c] - sae.centre[c]))
    alive_acts = acts[:, alive]
    active = alive_acts > 0
    n = x.shape[0]
    mean_act = alive_acts.sum() / active.sum().clamp_min(1)
    # The new latent fires on its m best rows: m is fractional and the cut and the mean above it are
    # interpolated between order statistics, so a rate one firing off (float noise between a
    # data-parallel and a one-process run) moves them a hair, not to the next row.
    m = min(max(float(active.float().mean()) * n, 1.0), n - 2.0)
    whole, part = int(m), m - int(m)
    top = ((x - sae.centre[c]) @ directions.T).topk(whole + 2, dim=0).values  # [whole + 2, dead], descending
    cut = (1 - part) * top[whole] + part * top[whole + 1]
    mean_above = (top[:whole].sum(0) + part * top[whole]) / m
    if sae.cfg.activation == "relu":
        gate = torch.zeros((), device=x.device)
    elif sae.cfg.activation == "jumprelu":
        gate = sae.log_threshold[c, ids].exp()
    else:  # batchtopk's inference threshold
        gate = sae.threshold[c]
    scale = ((mean_act - gate) / (mean_above - cut).clamp_min(1e-6)).clamp_min(1e-6)
    return scale, gate - scale * cut
