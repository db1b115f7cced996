"""Downstream evaluation: an SAE spliced into its source model, on token windows it never saw.

The hook's output is replaced by the SAE's reconstruction through a TransformerLens forward hook
(reshaped to ``[batch, pos, d_in]`` and back, so ``hook_z`` SAEs splice across all heads), and the
next-token loss and distribution are compared with the clean run and with the hook zero- and
mean-ablated (the dataset's mean activation). Definitions follow SAELens' ``evals.py``
(``get_recons_loss``, ``_kl``); where this differs:

- positions holding BOS or the document separator are left alone (not spliced, not counted) in
  every variant, ablations included; SAELens leaves them alone in the SAE run only;
- mean ablation and its scores are added;
- the SAE's L0, explained variance and L2 ratio are measured on the same tokens, in float32.

A transcoder is spliced as a replacement of the computation between its hooks: the target hook's
output is replaced by the transcoder's prediction from the input hook's activations of the same
forward pass (the ablations act on the target hook); its explained variance and L2 ratio are
against the target's activations.

A CLT replaces every layer's output at once (the replacement model: a later layer's input is read
from the replaced residual stream), and each layer's alone (``Evaluation.layers``); its L0 is per
layer, its explained variance over the layers' outputs side by side.
"""

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cache_server.models import SourceModel
from cache_server.saes.registry import CltWeights, SaeWeights
from shared.schemas import DownstreamMetrics

MAX_LOGITS = 1 << 24
"""Logits of one forward pass (64 MB in float32); four tensors of that size live at once at most."""


def not_causal_reason(model: SourceModel) -> str | None:
    """Why next-token loss through this model would measure nothing, or None for a causal LM."""
    architecture = str(getattr(model.bridge.cfg, "architecture", "") or "")
    if architecture.endswith(("ForCausalLM", "LMHeadModel")) or model.info.name == "tiny-random-gpt":
        return None
    return (f"n/a: '{model.info.name}' is not a causal LM ({architecture or 'unknown architecture'}); "
            "its next-token loss measures nothing")


@dataclass
class _Sums:
    """Running float64 sums over the evaluated positions."""

    ce: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    kl: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    n_ce: int = 0
    n: int = 0
    l0: float = 0.0
    l2_ratio: float = 0.0
    squared_error: float = 0.0
    squared_norm: float = 0.0
    x_sum: torch.Tensor | None = None

    def add_sae(self, x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.l0 += float((acts > 0).sum())
        self.l2_ratio += float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum())
        self.squared_error += float(((x_hat - x) ** 2).sum())
        self.squared_norm += float((x**2).sum())
        self.x_sum = x.sum(0) if self.x_sum is None else self.x_sum + x.sum(0)

    def explained_variance(self) -> float | None:
        total = self.squared_norm - float((self.x_sum**2).sum()) / self.n
        return 1.0 - self.squared_error / total if total > 0 else None


@dataclass(frozen=True)
class Evaluation:
    n_tokens: int
    l0: float
    explained_variance: float | None
    l2_ratio: float
    downstream: DownstreamMetrics | None
    layers: list[DownstreamMetrics] | None = None


def evaluate(model: SourceModel, hooks: tuple[list[str], list[str]], sae: SaeWeights | CltWeights, windows: np.ndarray,
             mean: torch.Tensor, batch_size: int, causal: bool, progress: Callable[[int], None] = lambda n: None
             ) -> Evaluation:
    """Evaluate ``sae`` on ``windows [n, context]`` of token ids: it reads ``hooks[0]`` and replaces
    ``hooks[1]``, a hook per layer (the same hook for an SAE; ``mean [layer, d]``: the replaced hooks')."""
    sae = sae.to(model.device)
    mean = mean.to(model.device, torch.float32)
    special = [t for t in {model.bos_token_id, model.separator_token_id} if t is not None]
    sums = _Sums()
    step = windows_per_forward(batch_size, windows.shape[1], model.bridge.cfg.d_vocab)
    for start in range(0, len(windows), step):
        tokens = torch.from_numpy(windows[start : start + step]).long().to(model.device)
        keep = ~torch.isin(tokens, torch.tensor(special, device=model.device))
        _batch(model, hooks, sae, mean, tokens, keep, causal, sums)
        progress(min(start + step, len(windows)) * windows.shape[1])
    layers = len(hooks[1])
    downstream = _downstream(sums) if causal else None
    per_layer = [_downstream(sums, str(j)) for j in range(layers)] if causal and layers > 1 else None
    return Evaluation(n_tokens=sums.n, l0=sums.l0 / sums.n / layers, explained_variance=sums.explained_variance(),
                      l2_ratio=sums.l2_ratio / sums.n, downstream=downstream, layers=per_layer)


def windows_per_forward(batch_size: int, context: int, vocabulary: int) -> int:
    """``batch_size``, or fewer windows where their logits would pass ``MAX_LOGITS`` floats, so the
    peak memory is the same whatever batch size a request asks for."""
    return max(1, min(batch_size, MAX_LOGITS // (context * vocabulary)))


def _flat(activation: torch.Tensor) -> torch.Tensor:
    return activation.reshape(activation.shape[0], activation.shape[1], -1).float()


def _replace(keep: torch.Tensor, make: Callable[[torch.Tensor], torch.Tensor]):
    """A forward hook putting ``make(x)`` in place of the hook's output at the kept positions."""

    def hook_fn(activation: torch.Tensor, hook) -> torch.Tensor:
        x = _flat(activation)
        new = torch.where(keep[..., None], make(x), x)
        return new.reshape(activation.shape).to(activation.dtype)

    return hook_fn


class _Splice:
    """One forward pass's hooks putting ``sae``'s predictions in place of the outputs ``replace``
    (layer indices): each input hook's activation is kept as it fires, each replaced output is
    predicted from the kept inputs of its layer and the earlier ones (a CLT), and with ``sums``
    the replaced layers' targets, predictions and latents go to it side by side."""

    def __init__(self, sae, hooks: tuple[list[str], list[str]], keep: torch.Tensor, replace: list[int],
                 sums: "_Sums | None" = None):
        self.sae, (self.inputs, self.outputs), self.keep, self.replace, self.sums = sae, hooks, keep, replace, sums
        self.seen: dict[int, torch.Tensor] = {}
        self.acts: dict[int, torch.Tensor] = {}
        self.recorded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hooks(self) -> list:
        reads = [(hook, self._read(l)) for l, hook in enumerate(self.inputs) if hook not in self.outputs]
        return reads + [(self.outputs[j], _replace(self.keep, self._predict(j))) for j in self.replace]

    def _read(self, layer: int):
        def read(activation: torch.Tensor, hook) -> torch.Tensor:
            self.seen[layer] = _flat(activation)
            return activation
        return read

    def _predict(self, j: int):
        def make(y: torch.Tensor) -> torch.Tensor:
            x = self.seen.pop(j, y)  # an SAE reads the hook it replaces
            if isinstance(self.sae, CltWeights):
                self.acts[j] = self.sae.encode_layer(x, j)
                for l in range(j):  # layers not replaced in this pass: their latents on their kept inputs
                    if l not in self.acts:
                        self.acts[l] = self.sae.encode_layer(self.seen.pop(l), l)
                y_hat, acts = self.sae.predict_layer([self.acts[l] for l in range(j + 1)], j), self.acts[j]
            else:
                y_hat, acts = self.sae.reconstruct(x)
            if self.sums is not None:
                self.recorded.append((y[self.keep], y_hat[self.keep], acts[self.keep]))
                if j == self.replace[-1]:
                    self.sums.add_sae(*(torch.cat(parts, -1) for parts in zip(*self.recorded)))
            return y_hat
        return make


@torch.inference_mode()
def _batch(model: SourceModel, hooks: tuple[list[str], list[str]], sae, mean: torch.Tensor, tokens: torch.Tensor,
           keep: torch.Tensor, causal: bool, sums: _Sums) -> None:
    layers = list(range(len(hooks[1])))

    def spliced(replace: list[int], record: bool = False) -> list:
        return _Splice(sae, hooks, keep, replace, sums if record else None).hooks()

    def ablated(replace: list[int], make: Callable[[int], Callable]) -> list:
        return [(hooks[1][j], _replace(keep, make(j))) for j in replace]

    zero = lambda j: torch.zeros_like  # noqa: E731
    average = lambda j: lambda x: mean[j].expand_as(x)  # noqa: E731
    with model.lock:
        if not causal:
            model.bridge.run_with_hooks(tokens, fwd_hooks=spliced(layers, record=True))
            return
        variants = {"sae": spliced(layers, record=True), "zero": ablated(layers, zero), "mean": ablated(layers, average)}
        if len(layers) > 1:  # a CLT: each layer alone too
            for j in layers:
                variants |= {f"sae{j}": spliced([j]), f"zero{j}": ablated([j], zero), f"mean{j}": ablated([j], average)}
        # One variant's logits at a time beside the clean run's: the peak is four logit tensors.
        clean = F.log_softmax(model.bridge(tokens).float(), dim=-1)
        p_clean = clean.exp()
        targets, predicted = tokens[:, 1:, None], keep[:, :-1]
        sums.n_ce += int(predicted.sum())
        for name, fwd_hooks in {"clean": None, **variants}.items():
            lp = clean if fwd_hooks is None else F.log_softmax(
                model.bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks).float(), dim=-1)
            sums.ce[name] += float(-lp[:, :-1].gather(-1, targets).squeeze(-1)[predicted].sum())
            if fwd_hooks is not None:
                sums.kl[name] += float((p_clean * (clean - lp)).sum(-1)[keep].sum())
            del lp


def _downstream(sums: _Sums, layer: str = "") -> DownstreamMetrics:
    """The figures of the variants replacing every layer (``layer`` ""), or that layer alone."""
    ce = {name: sums.ce[name + layer] / max(sums.n_ce, 1) for name in ("sae", "zero", "mean")}
    kl = {name: sums.kl[name + layer] / max(sums.n, 1) for name in ("sae", "zero", "mean")}
    ce["clean"] = sums.ce["clean"] / max(sums.n_ce, 1)

    def score(ablated: float, spliced: float, clean: float) -> float | None:
        return (ablated - spliced) / (ablated - clean) if ablated != clean else None

    return DownstreamMetrics(
        ce_loss_without_sae=ce["clean"], ce_loss_with_sae=ce["sae"], ce_loss_with_ablation=ce["zero"],
        ce_loss_with_mean_ablation=ce["mean"], ce_loss_score=score(ce["zero"], ce["sae"], ce["clean"]),
        ce_loss_score_mean_ablation=score(ce["mean"], ce["sae"], ce["clean"]),
        kl_div_with_sae=kl["sae"], kl_div_with_ablation=kl["zero"], kl_div_with_mean_ablation=kl["mean"],
        kl_div_score=score(kl["zero"], kl["sae"], 0.0),
    )
