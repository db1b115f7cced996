"""What each feature of an SAE does, over a slice of its dataset: the statistics a feature browser
shows, computed chunk by chunk in memory bounded by a chunk and the kept examples, whatever the
number of rows.

Two passes over the rows: the first counts firings and sums activations, keeps each feature's
maximum and its ``top_k`` strongest rows; the second, with the maxima known, bins the non-zero
activations (``bins`` equal bins of [0, max]) and samples ``per_interval`` rows from each of
``intervals`` equal intervals of [0, max] (SAEDashboard's quantile panels). A sample is the rows
of lowest hash of their row id among those in the interval: uniform, the same whatever the chunk
order, and mergeable across chunks (a bottom-k sketch).
"""

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")  # CSR @ dense is all we use
_MIX = 0x2545F4914F6CDD1D  # xorshift*'s multiplier: row ids to well-spread priorities


@dataclass
class FeatureStats:
    n_rows: int
    fired: Tensor
    """[d_sae] int64: rows on which the feature fired."""
    sum_values: Tensor
    """[d_sae] float64: sum of its activations."""
    max_values: Tensor
    """[d_sae]: largest activation (0 for a dead feature)."""
    top_values: Tensor
    """[top_k, d_sae]: strongest activations, descending (0 where fewer rows fired)."""
    top_rows: Tensor
    """[top_k, d_sae] int64: their row ids (-1 where none)."""
    histogram: Tensor
    """[d_sae, bins] int64: non-zero activations in equal bins of [0, max]."""
    interval_rows: Tensor
    """[intervals, per_interval, d_sae] int64: sampled row ids of each interval of [0, max] (-1 where none)."""
    interval_values: Tensor
    """[intervals, per_interval, d_sae]: their activations."""

    @property
    def density(self) -> Tensor:
        return self.fired.double() / max(self.n_rows, 1)


def _priority(rows: Tensor) -> Tensor:
    """A fixed pseudo-random float in [0, 1) per row id (the bottom-k sketch's order), 32 bits."""
    x = (rows.to(torch.int64) * _MIX) & 0xFFFFFFFFFFFF
    x = (x ^ (x >> 17)) * 0x5DEECE66D & 0xFFFFFFFFFFFF
    return ((x ^ (x >> 23)) >> 16).double() / float(1 << 32)


class _Smallest:
    """Per group, the ``k`` entries of smallest key seen, with their row and value. Candidates are
    buffered and merged when many wait; between merges each group's k-th key (an upper bound once
    stale) turns most of them away, so the work is on the few that could be kept."""

    def __init__(self, groups: int, k: int, buffer: int = 1 << 20):
        self.groups, self.k, self.buffer = groups, k, buffer
        self.threshold = torch.full((groups,), torch.inf, dtype=torch.float64)
        self.parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self.waiting = 0

    def offer(self, group: Tensor, key: Tensor, row: Tensor, value: Tensor) -> None:
        keep = key < self.threshold[group]
        self.parts.append((group[keep], key[keep], row[keep], value[keep]))
        self.waiting += int(keep.sum())
        if self.waiting > self.buffer:
            self._merge()

    def _merge(self) -> None:
        group, key, row, value = (torch.cat(column) for column in zip(*self.parts)) if self.parts else (
            torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float64),
            torch.empty(0, dtype=torch.int64), torch.empty(0))
        order = key.argsort(stable=True)
        order = order[group[order].argsort(stable=True)]  # by group, then key
        group, key, row, value = group[order], key[order], row[order], value[order]
        position = torch.arange(len(group))
        starts = torch.ones(len(group), dtype=torch.bool)
        starts[1:] = group[1:] != group[:-1]
        rank = position - torch.cummax(torch.where(starts, position, 0), 0).values
        kept = rank < self.k
        group, key, row, value, rank = group[kept], key[kept], row[kept], value[kept], rank[kept]
        full = rank == self.k - 1
        self.threshold[group[full]] = key[full]
        self.parts, self.waiting = [(group, key, row, value)], 0
        self._rank = rank

    def result(self) -> tuple[Tensor, Tensor]:
        """(rows, values), each ``[k, groups]`` in key order; row -1 and value 0 where none."""
        self._merge()
        group, _, row, value = self.parts[0]
        rows = torch.full((self.k, self.groups), -1, dtype=torch.int64)
        values = torch.zeros(self.k, self.groups)
        rows[self._rank, group] = row
        values[self._rank, group] = value
        return rows, values


def feature_statistics(encode: Callable[[Tensor], Tensor], chunks: Callable[[], Iterable[tuple[Tensor, Tensor]]],
                       d_sae: int, top_k: int = 20, intervals: int = 10, per_interval: int = 5,
                       bins: int = 50, block: int = 512, buffer: int = 1 << 20,
                       observe: Callable[[Tensor, Tensor], None] | None = None) -> FeatureStats:
    """``chunks()`` yields ``(rows [n, d_in], row_ids [n])`` afresh for each pass; ``encode`` maps
    rows to activations ``[n, d_sae]``; ``block`` rows are encoded at a time. Work past the
    encoding is on the non-zero activations only (memory: a block's, the kept examples and up to
    ``buffer`` candidates waiting to be merged into them). ``observe(rows, acts)`` sees each block
    of the first pass (e.g. to measure the reconstruction without encoding again)."""

    def entries(first: bool):
        """Each block's non-zero activations: (row ids, features, values), and the dense block."""
        for rows, ids in chunks():
            for lo in range(0, rows.shape[0], block):
                acts = encode(rows[lo : lo + block]).float()
                if first and observe is not None:
                    observe(rows[lo : lo + block], acts)
                r, f = acts.nonzero(as_tuple=True)
                yield ids[lo : lo + block].to(torch.int64)[r], f, acts[r, f], acts

    n_rows, fired = 0, torch.zeros(d_sae, dtype=torch.int64)
    sums, maxima = torch.zeros(d_sae, dtype=torch.float64), torch.zeros(d_sae)
    strongest = _Smallest(d_sae, top_k, buffer)
    for row, feature, value, acts in entries(first=True):
        n_rows += acts.shape[0]
        fired += torch.bincount(feature, minlength=d_sae)
        sums.index_add_(0, feature, value.double())
        maxima.scatter_reduce_(0, feature, value, reduce="amax")
        strongest.offer(feature, -value.double(), row, value)
    top_rows, top_values = strongest.result()

    histogram = torch.zeros(d_sae * bins, dtype=torch.int64)
    sampled = _Smallest(d_sae * intervals, per_interval, buffer)
    scale = torch.where(maxima > 0, maxima, 1.0)
    for row, feature, value, _ in entries(first=False):
        position = (value / scale[feature]).clamp(max=1.0)  # bin i holds (i/bins, (i+1)/bins] of max
        histogram += torch.bincount(feature * bins + (position * bins).ceil().long().clamp(1, bins) - 1,
                                    minlength=d_sae * bins)
        interval = (position * intervals).ceil().long().clamp(1, intervals) - 1
        sampled.offer(feature * intervals + interval, _priority(row), row, value)
    interval_rows, interval_values = sampled.result()
    return FeatureStats(n_rows=n_rows, fired=fired, sum_values=sums, max_values=maxima, top_values=top_values,
                        top_rows=top_rows, histogram=histogram.view(d_sae, bins),
                        interval_rows=interval_rows.view(per_interval, d_sae, intervals).permute(2, 0, 1),
                        interval_values=interval_values.view(per_interval, d_sae, intervals).permute(2, 0, 1))


class ReconstructionSums:
    """Running float64 sums for an SAE's FVU over rows seen a block at a time: ``observe`` fits
    ``feature_statistics``' hook, so the reconstruction costs a sparse decode, not a second encoding.
    A transcoder's rows are its input and its target side by side (``d_in`` columns, then the
    target's), and ``W_skip`` its skip path, if any."""

    def __init__(self, W_dec: Tensor, b_dec: Tensor, d_in: int | None = None, W_skip: Tensor | None = None):
        self.W_dec, self.b_dec, self.d_in, self.W_skip = W_dec, b_dec, d_in, W_skip
        self.n = 0
        self.sums = torch.zeros(3, W_dec.shape[1], dtype=torch.float64)  # squared error, sum x, sum x^2

    def observe(self, rows: Tensor, acts: Tensor) -> None:
        x, target = (rows, rows) if self.d_in is None else (rows[:, : self.d_in], rows[:, self.d_in :])
        recon = acts.to_sparse_csr() @ self.W_dec + self.b_dec  # acts are mostly zeros
        if self.W_skip is not None:
            recon += x @ self.W_skip.T
        self.n += rows.shape[0]
        self.sums[0] += (recon - target).double().pow(2).sum(0)
        self.sums[1] += target.double().sum(0)
        self.sums[2] += target.double().pow(2).sum(0)

    @property
    def squared_error(self) -> float:
        return float(self.sums[0].sum())

    @property
    def total_variance(self) -> float:
        """sum |x - mean x|^2."""
        return float((self.sums[2] - self.sums[1].pow(2) / max(self.n, 1)).sum())


def logit_lens(W_dec: Tensor, W_U: Tensor, k: int = 10, block: int = 1024) -> tuple[Tensor, Tensor]:
    """Each decoder direction ``W_dec [d_sae, d_model]`` through the unembedding ``W_U [d_model, vocab]``:
    ``(promoted, suppressed)``, each ``[2, k, d_sae]`` (token ids as floats, then logits), the ``k``
    tokens it raises and lowers most; a block of features at a time, so memory is a [block, vocab]
    product whatever d_sae."""
    k = min(k, W_U.shape[1])
    up, down = torch.zeros(2, k, W_dec.shape[0]), torch.zeros(2, k, W_dec.shape[0])
    for lo in range(0, W_dec.shape[0], block):
        logits = W_dec[lo : lo + block] @ W_U
        for table, best in ((up, logits.topk(k, dim=1)), (down, logits.topk(k, dim=1, largest=False))):
            table[0, :, lo : lo + block] = best.indices.T.float()
            table[1, :, lo : lo + block] = best.values.T
    return up, down
