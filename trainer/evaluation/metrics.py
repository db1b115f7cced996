"""Evaluation metrics (saev's ``EvalMetrics``), ``CapacityMetric`` (sparse_autoencoder), shuffle quality."""

import dataclasses
import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from shared.schemas import DENSE_DENSITY
from trainer.sae.autoencoder import SparseAutoencoder


@dataclass(frozen=True)
class EvalMetrics:
    l0: float
    """Mean number of active latents per row."""
    l1: float
    """Mean sum of latent activations per row."""
    mse: float
    """Mean squared error per element."""
    fvu: float
    """Fraction of variance unexplained: sum ||x - x̂||² / sum ||x - mean(x)||²."""
    explained_variance: float
    n_dead: int
    """Latents that never fired on the evaluation rows."""
    n_almost_dead: int
    """Latents that fired on fewer than ``almost_dead_threshold`` of rows."""
    n_dense: int
    """Latents that fired on more than ``dense_threshold`` of rows."""
    freqs: Float[Tensor, " d_sae"]
    """How often each latent fired."""
    mean_values: Float[Tensor, " d_sae"]
    """Mean value of each latent when it fired."""
    almost_dead_threshold: float = 1e-7
    dense_threshold: float = DENSE_DENSITY

    def summary(self) -> dict[str, float | int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if not isinstance(v, Tensor)}


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, rows: Float[Tensor, "n *component d_in"], batch_size: int = 4096,
             almost_dead_threshold: float = 1e-7, dense_threshold: float = DENSE_DENSITY,
             targets: Float[Tensor, "n *component d_out"] | None = None) -> EvalMetrics:
    """Metrics over ``rows`` (component axis flattened: a multi-component SAE is one dictionary per
    component). A transcoder's errors and FVU are against ``targets``, the rows of its target hook."""
    targets = rows if targets is None else targets
    sae.eval()
    fired = sum_values = None
    n = l0 = l1 = sq_err = 0.0
    for lo in range(0, rows.shape[0], batch_size):
        x = rows[lo : lo + batch_size]
        acts, recon = sae(x)
        active = acts > 0
        fired = active.sum(0) if fired is None else fired + active.sum(0)
        sum_values = acts.sum(0) if sum_values is None else sum_values + acts.sum(0)
        l0 += active.sum().item()
        l1 += acts.sum().item()
        sq_err += (recon - targets[lo : lo + batch_size]).pow(2).sum().item()
        n += x.shape[0]
    sae.train()
    per_component = rows.shape[1] if rows.dim() == 3 else 1
    total_var = (targets - targets.mean(0)).pow(2).sum().item()
    freqs = (fired / n).reshape(-1).float().cpu()
    mean_values = (sum_values / fired.clamp_min(1)).reshape(-1).float().cpu()
    fvu = sq_err / max(total_var, 1e-12)
    return EvalMetrics(
        l0=l0 / (n * per_component), l1=l1 / (n * per_component), mse=sq_err / targets.numel(), fvu=fvu,
        explained_variance=1 - fvu, n_dead=int((freqs == 0).sum()),
        n_almost_dead=int((freqs < almost_dead_threshold).sum()), n_dense=int((freqs > dense_threshold).sum()),
        freqs=freqs, mean_values=mean_values, almost_dead_threshold=almost_dead_threshold,
        dense_threshold=dense_threshold,
    )


class CapacityMetric:
    """Capacities of learned features (Scherlis et al., "Polysemanticity and Capacity").

    A feature's capacity is its squared dot product with itself over the sum of its squared dot
    products with every feature of the batch: 1 for orthogonal features, 1/n for n identical ones.

    >>> metric = CapacityMetric()
    >>> metric.forward(torch.tensor([[[1., 0., 1.]], [[0., 1., 0.]]]))
    tensor([[1., 1.]])
    >>> metric.forward(torch.tensor([[[1., 1., 1.]], [[1., 1., 1.]]]))
    tensor([[0.5000, 0.5000]])
    >>> CapacityMetric.capacities(torch.tensor([[[1., 0., 0.]], [[0., 1., 0.]], [[0., 0., 1.]]]))
    tensor([[1., 1., 1.]])
    """

    def __init__(self):
        self.activations: list[Tensor] = []

    @staticmethod
    def capacities(features: Float[Tensor, "batch *component learnt"]) -> Float[Tensor, "component batch"]:
        if features.dim() == 2:
            features = features.unsqueeze(1)
        f = features.transpose(0, 1).float()  # [component, batch, learnt]
        dots = torch.bmm(f, f.transpose(1, 2)).pow(2)  # [component, batch, batch]
        return torch.diagonal(dots, dim1=1, dim2=2) / dots.sum(-1).clamp_min(1e-12)

    def update(self, learned_activations: Tensor, **kwargs) -> None:
        self.activations.append(learned_activations.detach())

    def compute(self) -> Tensor:
        return self.capacities(torch.cat(self.activations))

    def forward(self, learned_activations: Tensor) -> Tensor:
        return self.capacities(learned_activations)


def distinct_sequences(sequences: Tensor) -> int:
    return int(torch.unique(sequences).numel())


def iid_distinct_sequences(batch_size: int, n_rows: int, rows_per_sequence: int) -> float:
    """Expected distinct sequences in a batch drawn uniformly (without replacement) from all rows.

    >>> round(iid_distinct_sequences(1, 1000, 10), 6)
    1.0
    """
    n_sequences = n_rows / rows_per_sequence
    p_missing = math.exp(sum(math.log1p(-rows_per_sequence / (n_rows - i)) for i in range(min(batch_size, n_rows - rows_per_sequence))))
    return n_sequences * (1 - p_missing)


@torch.no_grad()
def geometric_median(points: Float[Tensor, "n d"], iterations: int = 100, tol: float = 1e-6) -> Float[Tensor, " d"]:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances.

    >>> geometric_median(torch.tensor([[0., 0.], [1., 0.], [0., 1.], [100., 100.]])).round(decimals=2)
    tensor([0.5000, 0.5000])
    """
    points = points.double()
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < tol * max(1.0, median.norm().item()):
            median = new
            break
        median = new
    return median.float()
