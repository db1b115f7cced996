"""The sparse autoencoder: one file, plain PyTorch.

Parts as in sparse_autoencoder: a tied bias (subtracted before the encoder, added after the
decoder; the mean of the data, zeros, or its geometric median), an encoder initialised as the decoder's
transpose, and an optional component axis (several hooks or layers, one SAE each, in
one module). Parameter names and shapes follow SAELens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae,
d_in]``, ``b_enc``, ``b_dec``, with a leading component axis when ``n_components`` is set.

The SAE computes with unit-norm decoder rows: each latent's scale, the norm of its stored decoder
row, is moved into its encoder column and bias (``weights()``). So a latent's activation is what
it adds to the reconstruction, TopK picks the latents that add most, and the plain L1 of the
activations is the decoder-norm-weighted L1 of Anthropic's and SAELens' recipe. Rows start small,
at norm ``decoder_init_norm`` (0.3 for the TopK family; SAELens and Anthropic use 0.1, as ReLU
and JumpReLU do here): Adam's steps are about ``lr`` per entry whatever the norm, so small rows let directions and scales move quickly early in a run,
where unit rows learn ten times slower (measured, TopK k=32, 100 steps at lr 4e-4: held-out FVU
0.332 with unit rows, 0.295 at 0.1; at lr 1e-3, 0.195 at 0.1 and 0.169 at 0.3, with the tied
bias at the data's mean and resampling on). With ``decoder_init = "zeros"`` (sparsify's transcoder
init) the rows start at zero, where no direction exists, so the SAE computes with them as stored
(``unit_rows`` false): the encoder ranks latents and the rows carry their scale.

A transcoder (``cfg.target_hook``) is the same module predicting another hook's activations
(``d_out`` wide) from its input: its decoder bias is the target's, and its encoder reads the input
as it is, with no centre subtracted (``b_enc`` starts at ``-input_mean @ W_enc``, so the
pre-activations start centred, and then learns freely). Subtracting a fixed input mean instead is
the same function but another gradient for ``W_enc`` (taken on centred rows), and it trained worse:
held-out FVU 0.089 against 0.070 after 100 steps on shakespeare-gpt's layer-1 MLP (k = 16,
schedule-free Adam; 0.089 against 0.063 under sparsify's step, whose encoder reads the raw input
too: 0.064 there). With ``cfg.skip``, a linear path
``x @ W_skip`` (from zero) is added to the prediction. ``target(x, y)`` is what the dictionary
itself must produce: ``y`` less the skip path.

Activations: ReLU, JumpReLU (straight-through threshold), TopK and BatchTopK. TopK is computed
sparsely: only the k active latents of each row are decoded, forward and backward, so its step
costs about one encoder matmul.
"""

import warnings
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from trainer.config import SAEConfig


class ForwardPassResult(NamedTuple):
    learned_activations: Float[Tensor, "batch *component d_sae"]
    decoded_activations: Float[Tensor, "batch *component d_in"]


class Weights(NamedTuple):
    """The SAE as it computes (``SparseAutoencoder.weights()``): unit-norm decoder rows, each
    latent's scale in its encoder column and bias. Differentiable in the stored parameters."""

    W_enc: Float[Tensor, "component d_in d_sae"]
    b_enc: Float[Tensor, "component d_sae"]
    W_dec: Float[Tensor, "component d_sae d_in"]


class SparseCode(NamedTuple):
    """TopK latents of each row: values and indices, ``[component, batch, k]``."""

    values: Float[Tensor, "component batch k"]
    indices: Int[Tensor, "component batch k"]


class ResetOptimizerParameterDetails(NamedTuple):
    """A parameter whose optimizer state must be reset along ``axis`` when latents are resampled."""

    parameter: nn.Parameter
    axis: int


warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # used for two matmuls only

ENCODE_ROWS = 1024
"""TopK encodes this many rows at a time: their pre-activations stay in cache for the top-k, and
no [batch, d_sae] array is allocated (and page-faulted in) every step."""


def _csr(indices: Int[Tensor, "batch k"], values: Float[Tensor, "batch k"], d_sae: int) -> Tensor:
    """``[batch, d_sae]`` holding ``values`` at ``indices``, k a row, as a CSR matrix: multiplied
    by a dense matrix it costs batch * k * width (MKL's sparse kernels on CPU)."""
    batch, k = indices.shape
    crow = torch.arange(0, batch * k + 1, k, device=indices.device)
    return torch.sparse_csr_tensor(crow, indices.reshape(-1), values.reshape(-1), (batch, d_sae),
                                   check_invariants=False)


def _csr_transposed(indices: Int[Tensor, "batch k"], values: Float[Tensor, "batch k"], d_sae: int) -> Tensor:
    """The same matrix transposed, ``[d_sae, batch]``: its entries grouped by latent (a stable
    sort), for the weight gradients ``G^T @ dense``."""
    batch, k = indices.shape
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    crow = torch.zeros(d_sae + 1, dtype=torch.long, device=flat.device)
    torch.cumsum(torch.bincount(flat, minlength=d_sae), 0, out=crow[1:])
    return torch.sparse_csr_tensor(crow, order.div(k, rounding_mode="floor"), values.reshape(-1)[order], (d_sae, batch),
                                   check_invariants=False)


def _full_precision(t: Tensor):
    """Autocast off: the sparse kernels below have no bf16 on every device (none on CPU), and
    they are cheap at the parameters' precision."""
    return torch.autocast(t.device.type, enabled=False)


class _TopKEncode(torch.autograd.Function):
    """``topk(relu((x - b_dec) @ W + b))`` with a sparse backward: gradients touch only the chosen
    latents (cost batch * k * d_in instead of a second dense matmul)."""

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, k: int):
        centred = x - b_dec
        batch = x.shape[0]
        values = centred.new_empty(batch, k)
        indices = torch.empty(batch, k, dtype=torch.long, device=x.device)
        pre = centred.new_empty(min(batch, ENCODE_ROWS), W_enc.shape[1])
        for lo in range(0, batch, ENCODE_ROWS):
            hi = min(lo + ENCODE_ROWS, batch)
            torch.addmm(b_enc, centred[lo:hi], W_enc, out=pre[: hi - lo])
            torch.topk(pre[: hi - lo], k, dim=1, sorted=False, out=(values[lo:hi], indices[lo:hi]))
        values = values.relu_()
        ctx.save_for_backward(centred, indices, values > 0, W_enc)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices):
        with _full_precision(grad_values):
            return _TopKEncode._backward(ctx, grad_values)

    @staticmethod
    def _backward(ctx, grad_values: Tensor):
        centred, indices, positive, W_enc = ctx.saved_tensors
        grad = grad_values.to(centred.dtype) * positive
        d_sae = W_enc.shape[1]
        # grad W_enc^T [d_sae, d_in] = G^T x, with G [batch, d_sae] holding k nonzeros per row.
        grad_W_t = _csr_transposed(indices, grad, d_sae) @ centred
        grad_b = torch.zeros(d_sae, device=grad.device, dtype=grad.dtype).index_add_(0, indices.reshape(-1),
                                                                                      grad.reshape(-1))
        # x - b_dec feeds every row, so b_dec's gradient is -W_enc @ (the summed latent gradients).
        return None, -(W_enc @ grad_b), grad_W_t.t(), grad_b, None


class _SparseDecode(torch.autograd.Function):
    """``sum_j values[:, j] * W_dec[indices[:, j]] + b_dec``: the k active decoder rows of each
    row, forward and backward (embedding_bag's backward costs twice as much, measured)."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor):
        values = values.to(W_dec.dtype)
        ctx.save_for_backward(values, indices, W_dec)
        with _full_precision(values):
            return torch.addmm(b_dec, _csr(indices, values, W_dec.shape[0]), W_dec)

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        with _full_precision(grad):
            return _SparseDecode._backward(ctx, grad.to(W_dec.dtype), values, indices, W_dec)

    @staticmethod
    def _backward(ctx, grad: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor):
        grad_values = None
        if ctx.needs_input_grad[0]:  # (grad @ W_dec^T) at the active latents only
            pattern = _csr(indices, torch.ones_like(values), W_dec.shape[0])
            grad_values = torch.sparse.sampled_addmm(pattern, grad, W_dec.t(), beta=0.0).values().view_as(values)
        grad_W = _csr_transposed(indices, values, W_dec.shape[0]) @ grad
        return grad_values, None, grad_W, grad.sum(0)


class _Encode(torch.autograd.Function):
    """``(x - b_dec) @ W_enc + b_enc`` for ``[component, batch, d_in]`` inputs that need no gradient.

    Autograd would find b_dec's gradient through ``x - b_dec`` with a full ``grad @ W_enc^T``
    matmul (a sixth of a dense step); it is ``-W_enc @ grad.sum(batch)``, a matrix-vector product.
    """

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor):
        centred = x - b_dec.unsqueeze(1)
        ctx.save_for_backward(centred, W_enc)
        return torch.baddbmm(b_enc.unsqueeze(1), centred, W_enc)

    @staticmethod
    def backward(ctx, grad: Tensor):
        centred, W_enc = ctx.saved_tensors
        summed = grad.sum(dim=1)
        grad_x = torch.bmm(grad, W_enc.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_b_dec = -torch.bmm(W_enc, summed.unsqueeze(-1)).squeeze(-1)
        return grad_x, grad_b_dec, torch.bmm(centred.transpose(1, 2), grad), summed


def _save_threshold(ctx, pre: Tensor, log_threshold: Tensor, bandwidth: float) -> Tensor:
    """Keep what the straight-through backward needs; return θ = exp(log θ)."""
    threshold = log_threshold.exp()
    ctx.save_for_backward(pre, threshold)
    ctx.bandwidth = bandwidth
    return threshold


def _saved_kernel(ctx) -> tuple[Tensor, Tensor, Tensor]:
    """(pre, θ, rectangle kernel): the pseudo-derivative of a step at θ, of width ``bandwidth``."""
    pre, threshold = ctx.saved_tensors
    kernel = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype) / ctx.bandwidth
    return pre, threshold, kernel


class _JumpReLU(torch.autograd.Function):
    """``z * (z > θ)``; θ = exp(log θ) learns through the rectangle-kernel pseudo-derivative."""

    @staticmethod
    def forward(ctx, pre: Tensor, log_threshold: Tensor, bandwidth: float):
        return pre * (pre > _save_threshold(ctx, pre, log_threshold, bandwidth))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold, kernel = _saved_kernel(ctx)
        grad_log_threshold = -(threshold * threshold * kernel * grad_out).sum(dim=-2, keepdim=True)
        return grad_out * (pre > threshold), grad_log_threshold, None


class _StepL0(torch.autograd.Function):
    """``H(z - θ)`` (JumpReLU's L0 count), with the same pseudo-derivative towards log θ."""

    @staticmethod
    def forward(ctx, pre: Tensor, log_threshold: Tensor, bandwidth: float):
        return (pre > _save_threshold(ctx, pre, log_threshold, bandwidth)).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        _, threshold, kernel = _saved_kernel(ctx)
        return None, -(threshold * kernel * grad_out).sum(dim=-2, keepdim=True), None


def _at_norm(directions: Tensor, norm: float) -> Tensor:
    """``directions`` scaled to ``norm`` along the last axis."""
    return directions * (norm / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8))


@torch.no_grad()
def centre_pre_activations(b_enc: Tensor, input_mean: Float[Tensor, "component d_in"],
                           W_enc: Float[Tensor, "component d_in d_sae"]) -> None:
    """``b_enc`` at ``-input_mean @ W_enc``: each pre-activation 0 at the mean input, as subtracting
    the mean would make it (a transcoder's or a CLT's, which read the raw input; stored units, which
    ``weights()`` scales alike)."""
    b_enc.copy_(-torch.bmm(input_mean.unsqueeze(1), W_enc).squeeze(1))


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig, d_in: int, n_components: int | None = None,
                 geometric_median_dataset: Tensor | None = None, d_out: int | None = None):
        super().__init__()
        self.cfg, self.d_in, self.d_sae, self.n_components = cfg, d_in, cfg.width(d_in), n_components
        self.transcoder = cfg.target_hook is not None
        self.d_out = d_out or d_in
        c = n_components or 1
        self.W_enc = nn.Parameter(torch.empty(c, d_in, self.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(c, self.d_sae))
        self.W_dec = nn.Parameter(torch.empty(c, self.d_sae, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(c, self.d_out))  # the tied bias (a transcoder's: the target's)
        if self.transcoder:  # the input's mean: where new latents' directions point from (see the module)
            self.register_buffer("input_mean", torch.zeros(c, d_in))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(c, d_in, self.d_out))
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((c, self.d_sae), float(torch.tensor(cfg.jumprelu_threshold).log())))
        # BatchTopK's inference threshold: a running estimate, exported as a JumpReLU threshold.
        self.register_buffer("threshold", torch.zeros(c))
        # Each decoder row's norm as the SAE computes, 1 until the refit after training sets it
        # (trainer.training.refit; a loaded file's rows of any norm), so the encoder's ranking stays.
        self.register_buffer("decoder_gain", torch.ones(c, self.d_sae))
        self.reset_parameters()
        if geometric_median_dataset is not None:  # sparse_autoencoder's name: any centre of the data
            self.initialize_tied_parameters(geometric_median_dataset)

    # -- initialisation ------------------------------------------------------------------------
    @property
    def unit_rows(self) -> bool:
        """Whether the SAE computes with unit-norm decoder rows (see the module); with
        ``decoder_init = "zeros"`` its rows are free, as sparsify's transcoders' are."""
        return self.cfg.decoder_init != "zeros"

    def reset_parameters(self) -> None:
        generator = torch.Generator().manual_seed(self.cfg.seed)
        if not self.unit_rows:  # sparsify's: nn.Linear's encoder init, a decoder from zero
            bound = self.d_in ** -0.5
            with torch.no_grad():
                self.W_enc.copy_((torch.rand(self.W_enc.shape, generator=generator) * 2 - 1) * bound)
                self.W_dec.zero_()
                self.b_enc.zero_()
            return
        W_dec = torch.randn(self.W_dec.shape, generator=generator)
        with torch.no_grad():
            self.W_dec.copy_(W_dec * (self.cfg.row_norm() / W_dec.norm(dim=-1, keepdim=True)))
            if self.transcoder:  # other spaces: directions of their own, at the same norm
                W_enc = torch.randn(self.W_enc.transpose(1, 2).shape, generator=generator)
                self.W_enc.copy_((W_enc * (self.cfg.row_norm() / W_enc.norm(dim=-1, keepdim=True))).transpose(1, 2))
            else:
                self.W_enc.copy_(self.W_dec.transpose(1, 2))
            self.b_enc.zero_()

    @torch.no_grad()
    def initialize_from_data(self, rows: Float[Tensor, "n *component d_in"],
                             targets: Float[Tensor, "n *component d_out"] | None = None) -> None:
        """Decoder rows pointing from ``b_dec`` to distinct random ``rows`` (seeded by the config),
        at the initial norm; the encoder as their transpose. Latents beyond ``n`` keep their random
        directions. A transcoder's latent reads its input row (from ``input_mean``) and writes
        towards its row of ``targets``."""
        xc = self._components_first(rows).to(self.W_dec.device)
        n = min(xc.shape[1], self.d_sae)
        picks = torch.randperm(xc.shape[1], generator=torch.Generator().manual_seed(self.cfg.seed))[:n].to(xc.device)
        yc = self._components_first(targets).to(xc.device) if self.transcoder else xc
        self.W_dec[:, :n] = _at_norm(yc[:, picks] - self.b_dec.unsqueeze(1), self.cfg.row_norm())
        if self.transcoder:
            self.W_enc[:, :, :n] = _at_norm(xc[:, picks] - self.input_mean.unsqueeze(1), self.cfg.row_norm()).transpose(1, 2)
            self._centre_pre_activations()
        else:
            self.W_enc.copy_(self.W_dec.transpose(1, 2))

    def initialize_tied_parameters(self, centre: Float[Tensor, "*component d_in"],
                                   target_centre: Float[Tensor, "*component d_out"] | None = None) -> None:
        """The tied bias at a centre of the data (its mean or geometric median); a transcoder's
        ``input_mean`` at the input's (its pre-activations centred there), its ``b_dec`` at the
        target's."""
        with torch.no_grad():
            if self.transcoder:
                self.input_mean.copy_(centre.reshape(-1, self.d_in).expand_as(self.input_mean))
                self._centre_pre_activations()
                centre = target_centre
            self.b_dec.copy_(centre.reshape(-1, self.d_out).expand_as(self.b_dec))

    def _centre_pre_activations(self) -> None:
        centre_pre_activations(self.b_enc, self.input_mean, self.W_enc)

    @property
    def centre(self) -> Float[Tensor, "component d_in"]:
        """What the encoder subtracts from its input: the tied bias; nothing for a transcoder."""
        return torch.zeros_like(self.input_mean) if self.transcoder else self.b_dec

    @property
    def origin(self) -> Float[Tensor, "component d_in"]:
        """Where a latent's encoder direction points from (initialisation, resampling): the tied
        bias, or a transcoder's ``input_mean``."""
        return self.input_mean if self.transcoder else self.b_dec

    def target(self, xc: Float[Tensor, "component batch d_in"],
               yc: Float[Tensor, "component batch d_out"]) -> Float[Tensor, "component batch d_out"]:
        """What the dictionary must produce: ``yc`` less the skip path (differentiable in ``W_skip``)."""
        return yc - torch.bmm(xc, self.W_skip) if self.cfg.skip else yc

    # -- forward -------------------------------------------------------------------------------
    def _components_first(self, x: Tensor) -> Tensor:
        """[batch, d] or [batch, component, d] -> [component, batch, d]."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return x.transpose(0, 1)

    def _restore(self, y: Tensor) -> Tensor:
        y = y.transpose(0, 1)
        return y.squeeze(1) if self.n_components is None else y

    def row_scale(self) -> Float[Tensor, "component d_sae"]:
        """What ``weights()`` divides each stored decoder row by: its norm, or 1 for free rows."""
        if self.unit_rows:
            return self.W_dec.norm(dim=-1).clamp_min(1e-8)
        return torch.ones_like(self.decoder_gain)

    def weights(self) -> Weights:
        """Unit-norm decoder rows (times ``decoder_gain``, 1 while training), the stored rows' norms
        moved into the encoder (see the module); free rows as stored."""
        norm = self.row_scale()
        return Weights(self.W_enc * norm.unsqueeze(1), self.b_enc * norm,
                       self.W_dec * (self.decoder_gain / norm).unsqueeze(-1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before the refit have no gain: theirs is 1.
        state_dict.setdefault(prefix + "decoder_gain", torch.ones_like(self.decoder_gain))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def pre_activations(self, xc: Float[Tensor, "component batch d_in"], w: Weights) -> Tensor:
        return _Encode.apply(xc, self.centre, w.W_enc, w.b_enc)

    def activate(self, pre: Tensor, training: bool) -> Tensor:
        act = self.cfg.activation
        if act == "relu":  # in place: pre is ours and not needed again (a [batch, d_sae] array less)
            return pre.relu_()
        if act == "jumprelu":
            return _JumpReLU.apply(pre, self.log_threshold.unsqueeze(1), self.cfg.jumprelu_bandwidth)
        if act == "topk":
            values, indices = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        # batchtopk: the k * batch largest of the whole batch while training, a threshold after.
        if training:
            flat = pre.relu().flatten(1)
            values, indices = flat.topk(min(self.cfg.k * pre.shape[1], flat.shape[1]), dim=-1)
            acts = torch.zeros_like(flat).scatter(-1, indices, values).view_as(pre)
            with torch.no_grad():
                kept_min = torch.where(values > 0, values, torch.inf).amin(dim=-1)
                kept_min = torch.where(torch.isfinite(kept_min), kept_min, self.threshold)
                self.threshold.lerp_(kept_min, 0.01 if bool(self.threshold.any()) else 1.0)
            return acts
        return pre * (pre > self.threshold.view(-1, 1, 1))

    @torch.no_grad()
    def calibrate_threshold(self, x: Float[Tensor, "n *component d_in"], rows: int = 1024) -> Tensor:
        """BatchTopK's inference threshold, exact on ``x``: midway between its ``k * n``-th and next
        largest activations, so a JumpReLU there fires ``k`` latents a row on average on ``x``, as
        training did. (A running average of each batch's smallest kept value lags behind the
        growing pre-activations of a short run: exported L0 7.9 for k = 32, measured.)"""
        xc, w = self._components_first(x), self.weights()
        keep = self.cfg.k * xc.shape[1] + 1
        kept = xc.new_empty(xc.shape[0], 0)
        for lo in range(0, xc.shape[1], rows):
            acts = self.pre_activations(xc[:, lo : lo + rows], w).relu_().flatten(1)
            kept = torch.cat([kept, acts], dim=1).topk(min(keep, kept.shape[1] + acts.shape[1]), dim=1).values
        self.threshold.copy_(((kept[:, -1] + kept[:, -2]) / 2).clamp_min(torch.finfo(kept.dtype).tiny))
        return self.threshold

    def encode_sparse(self, xc: Float[Tensor, "component batch d_in"], w: Weights) -> SparseCode:
        """TopK latents with the sparse backward (training path)."""
        codes = [_TopKEncode.apply(xc[c], self.centre[c], w.W_enc[c], w.b_enc[c], self.cfg.k)
                 for c in range(xc.shape[0])]
        return SparseCode(torch.stack([v for v, _ in codes]), torch.stack([i for _, i in codes]))

    def decode_sparse(self, code: SparseCode, w: Weights,
                      limit: int | None = None) -> Float[Tensor, "component batch d_in"]:
        """Sum of the active decoder rows (``limit``: only latents below it, for Matryoshka)."""
        values = code.values if limit is None else code.values * (code.indices < limit)
        return torch.stack([_SparseDecode.apply(values[c], code.indices[c], w.W_dec[c], self.b_dec[c])
                            for c in range(code.values.shape[0])])

    def decode(self, acts: Float[Tensor, "component batch d_sae"], w: Weights) -> Float[Tensor, "component batch d_in"]:
        return torch.baddbmm(self.b_dec.unsqueeze(1), acts, w.W_dec)

    def forward(self, x: Float[Tensor, "batch *component d_in"]) -> ForwardPassResult:
        xc, w = self._components_first(x), self.weights()
        acts = self.activate(self.pre_activations(xc, w), training=self.training)
        out = self.decode(acts, w)
        if self.cfg.skip:
            out = out + torch.bmm(xc, self.W_skip)
        return ForwardPassResult(self._restore(acts), self._restore(out))

    # -- optimizer bookkeeping -------------------------------------------------------------------

    @property
    def reset_optimizer_parameter_details(self) -> list[ResetOptimizerParameterDetails]:
        details = [ResetOptimizerParameterDetails(self.W_enc, -1), ResetOptimizerParameterDetails(self.b_enc, -1),
                   ResetOptimizerParameterDetails(self.W_dec, -2)]
        if self.cfg.activation == "jumprelu":
            details.append(ResetOptimizerParameterDetails(self.log_threshold, -1))
        return details

    # -- state ---------------------------------------------------------------------------------
    @staticmethod
    def get_single_component_state_dict(state: dict[str, Tensor], component_idx: int) -> dict[str, Tensor]:
        """One component's parameters, with the component axis dropped."""
        if state["W_enc"].dim() != 3:
            raise ValueError("state dict has no component axis")
        return {name: value[component_idx] for name, value in state.items()}
