"""The cross-layer transcoder (CLT): one encoder per layer reading that layer's MLP input, and from
each layer's latents a decoder to the MLP output of that layer and of every later one (Anthropic's
circuit tracing, 2025: the replacement model behind attribution graphs).

Sparsity is TopK per layer (``cfg.k`` latents of each layer a row): the L0 budget is explicit per
layer, so a CLT compares with per-layer transcoders at the same total L0 without tuning a
coefficient, and the decode costs ``k * (layers - l) * d_out`` per row of layer ``l`` (the sparse
kernels of ``trainer.sae.autoencoder``). Anthropic's JumpReLU with a tanh penalty needs its
coefficient tuned per width and longer runs than these CPUs give; this project's measured best
short-run recipe is the TopK family's.

As in the SAE, each latent computes with a unit-norm decoder row (the concatenation of its blocks
for every layer it writes to), its scale moved into its encoder column; as the transcoder's, each
encoder reads its input as it is, its bias starting at ``-input_mean @ W_enc`` (see
``trainer.sae.autoencoder``). Memory: the decoders hold ``d_sae * d_out * L (L + 1) / 2``
weights, growing with the layers squared (``memory_bytes``). Dead latents: AuxK per layer (on the
residual of every layer the latent writes to) and resampling (``resample``) as the TopK SAE's.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from trainer.config import SAEConfig
from trainer.sae.autoencoder import ForwardPassResult, SparseCode, _at_norm, _SparseDecode, _TopKEncode, \
    centre_pre_activations
from trainer.sae.resample import reset_rows


def memory_bytes(cfg: SAEConfig, d_in: int, d_out: int, n_layers: int) -> int:
    """Float32 parameters of a CLT (encoders, decoders, biases)."""
    d_sae = cfg.width(d_in)
    return 4 * (n_layers * (d_in * d_sae + d_sae + d_out) + d_sae * d_out * n_layers * (n_layers + 1) // 2)


class CrossLayerTranscoder(nn.Module):
    def __init__(self, cfg: SAEConfig, d_in: int, n_layers: int, d_out: int | None = None):
        super().__init__()
        self.cfg, self.d_in, self.d_out, self.n_layers = cfg, d_in, d_out or d_in, n_layers
        self.d_sae, self.n_components, self.transcoder = cfg.width(d_in), n_layers, True
        L = n_layers
        self.W_enc = nn.Parameter(torch.empty(L, d_in, self.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(L, self.d_sae))
        # W_dec[l] [d_sae, L - l, d_out]: layer l's latents into the outputs of layers l..L-1.
        self.W_dec = nn.ParameterList([nn.Parameter(torch.zeros(self.d_sae, L - l, self.d_out)) for l in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, self.d_out))
        self.register_buffer("input_mean", torch.zeros(L, d_in))
        self.register_buffer("threshold", torch.zeros(L))  # per layer, for the JumpReLU export
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random encoder columns and own-layer decoder blocks at the initial norm; blocks to later
        layers from zero (a latent starts as a per-layer transcoder's and learns to reach further)."""
        generator = torch.Generator().manual_seed(self.cfg.seed)
        norm = self.cfg.row_norm()
        with torch.no_grad():
            for l in range(self.n_layers):
                self.W_dec[l].zero_()
                self.W_dec[l][:, 0] = _at_norm(torch.randn(self.d_sae, self.d_out, generator=generator), norm)
                self.W_enc[l] = _at_norm(torch.randn(self.d_sae, self.d_in, generator=generator), norm).T

    @torch.no_grad()
    def initialize_from_data(self, rows: Float[Tensor, "n layer d_in"], targets: Float[Tensor, "n layer d_out"]) -> None:
        """Latent j of layer l reads its random row of layer l's input (from ``input_mean``) and
        writes towards that row's target at layer l (from ``b_dec``)."""
        n = min(rows.shape[0], self.d_sae)
        picks = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(self.cfg.seed))[:n]
        x, y = rows[picks.to(rows.device)], targets[picks.to(targets.device)]
        for l in range(self.n_layers):
            self.W_dec[l][:n, 0] = _at_norm(y[:, l] - self.b_dec[l], self.cfg.row_norm())
            self.W_enc[l][:, :n] = _at_norm(x[:, l] - self.input_mean[l], self.cfg.row_norm()).T
        self._centre_pre_activations()

    def initialize_tied_parameters(self, centre: Float[Tensor, "layer d_in"], target_centre: Float[Tensor, "layer d_out"]):
        with torch.no_grad():
            self.input_mean.copy_(centre)
            self.b_dec.copy_(target_centre)
            self._centre_pre_activations()

    def _centre_pre_activations(self) -> None:
        centre_pre_activations(self.b_enc, self.input_mean, self.W_enc)

    @property
    def centre(self) -> Tensor:
        """What the encoders subtract from their inputs: nothing."""
        return torch.zeros_like(self.input_mean)

    def target(self, xc: Tensor, yc: Tensor) -> Tensor:
        return yc

    def _components_first(self, x: Tensor) -> Tensor:
        return x.transpose(0, 1)

    def weights(self) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(W_enc, b_enc, W_dec) as the CLT computes: unit-norm decoder rows, each latent's norm
        (over all the layers it writes to) moved into its encoder column and bias."""
        norms = torch.stack([w.flatten(1).norm(dim=1).clamp_min(1e-8) for w in self.W_dec])  # [L, d_sae]
        W_dec = [w / norms[l, :, None, None] for l, w in enumerate(self.W_dec)]
        return self.W_enc * norms.unsqueeze(1), self.b_enc * norms, W_dec

    def encode_sparse(self, xc: Float[Tensor, "layer batch d_in"], w) -> SparseCode:
        codes = [_TopKEncode.apply(xc[l], self.centre[l], w[0][l], w[1][l], self.cfg.k) for l in range(self.n_layers)]
        return SparseCode(torch.stack([v for v, _ in codes]), torch.stack([i for _, i in codes]))

    def decode_sparse(self, code: SparseCode, w) -> Float[Tensor, "layer batch d_out"]:
        """Each output layer's prediction: its bias plus what the latents of it and every earlier
        layer write to it."""
        batch, L = code.values.shape[1], self.n_layers
        writes = [_SparseDecode.apply(code.values[l], code.indices[l], w[2][l].flatten(1),
                                      w[2][l].new_zeros((L - l) * self.d_out)).view(batch, L - l, self.d_out)
                  for l in range(L)]
        return torch.stack([self.b_dec[j] + sum(writes[l][:, j - l] for l in range(j + 1)) for j in range(L)])

    def forward(self, x: Float[Tensor, "batch layer d_in"]) -> ForwardPassResult:
        w = self.weights()
        code = self.encode_sparse(self._components_first(x), w)
        acts = torch.zeros(self.n_layers, x.shape[0], self.d_sae, device=x.device, dtype=code.values.dtype)
        acts.scatter_(-1, code.indices, code.values)
        return ForwardPassResult(acts.transpose(0, 1), self.decode_sparse(code, w).transpose(0, 1))

    def aux_k(self, xc: Tensor, residual: Tensor, dead: Tensor, w) -> Tensor:
        """AuxK per layer: the top ``aux_k`` dead latents of layer ``l`` must explain the residual
        of layers ``l`` onwards."""
        losses = []
        for l in range(self.n_layers):
            dead_ids = dead[l].nonzero().squeeze(1)
            if dead_ids.numel() == 0:
                continue
            pre = torch.addmm(w[1][l, dead_ids], xc[l], w[0][l][:, dead_ids])
            values, indices = pre.topk(min(self.cfg.aux_k, dead_ids.numel()), dim=-1)
            recon = F.embedding_bag(indices, w[2][l][dead_ids].flatten(1), per_sample_weights=values.relu(), mode="sum")
            losses.append((recon - residual[l:].transpose(0, 1).flatten(1)).pow(2).sum(-1).mean() / (self.n_layers - l))
        return torch.stack(losses).mean() if losses else xc.new_zeros(())

    @torch.no_grad()
    def resample(self, optimizer: torch.optim.Optimizer, dead: Tensor, x: Float[Tensor, "n layer d_in"],
                 y: Float[Tensor, "n layer d_out"], generator: torch.Generator) -> int:
        """Point each layer's dead latents at rows whose targets are predicted worst (drawn by the
        squared error's square, as ``trainer.sae.resample``): the encoder column at the row's input
        (from ``input_mean``, at the alive latents' mean encoder norm, its bias centring it there), the own-layer decoder block at its
        target (from ``b_dec``, at the initial norm), the blocks to later layers zero; their optimizer
        state reset. Returns how many."""
        xc, yc, w = self._components_first(x), self._components_first(y), self.weights()
        losses = (self.decode_sparse(self.encode_sparse(xc, w), w) - yc).pow(2).sum(-1)  # [layer, n]
        norm, total = self.cfg.row_norm(), 0
        for l in range(self.n_layers):
            ids = dead[l].nonzero().squeeze(1)
            if ids.numel() == 0:
                continue
            weights = losses[l].pow(2).cpu()
            picks = torch.multinomial(weights if weights.sum() > 0 else torch.ones_like(weights), ids.numel(),
                                      replacement=True, generator=generator).to(xc.device)
            alive = ~dead[l]
            scale = w[0][l][:, alive].norm(dim=0).mean() if alive.any() else torch.ones(())
            self.W_dec[l][ids] = 0
            self.W_dec[l][ids, 0] = _at_norm(yc[l, picks] - self.b_dec[l], norm)
            self.W_enc[l][:, ids] = _at_norm(xc[l, picks] - self.input_mean[l], 1.0).T * (scale / norm)
            self.b_enc[l, ids] = -(self.input_mean[l] @ self.W_enc[l][:, ids])
            for parameter, index in ((self.W_enc, (l, slice(None), ids)), (self.b_enc, (l, ids)), (self.W_dec[l], ids)):
                reset_rows(optimizer, parameter, index)
            total += ids.numel()
        return total

    @torch.no_grad()
    def calibrate_threshold(self, x: Float[Tensor, "n layer d_in"], rows: int = 1024) -> Tensor:
        """Each layer's JumpReLU threshold for the export: midway between its ``k * n``-th and next
        largest pre-activations on ``x``, so it fires k latents a row on average there."""
        xc, w = self._components_first(x), self.weights()
        keep = self.cfg.k * xc.shape[1] + 1
        for l in range(self.n_layers):
            pre = torch.cat([torch.addmm(w[1][l], xc[l, lo : lo + rows], w[0][l]).relu_().flatten()
                             for lo in range(0, xc.shape[1], rows)])
            kept = pre.topk(min(keep, pre.numel())).values
            self.threshold[l] = ((kept[-1] + kept[-2]) / 2).clamp_min(torch.finfo(kept.dtype).tiny)
        return self.threshold
