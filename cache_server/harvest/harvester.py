"""The harvest loop: token windows -> one forward pass for all hooks -> rows -> Zarr chunks.

Chunks hold whole sequences (except the last), and forward batches never straddle a chunk, so the
rows of a chunk are the same whether a harvest ran straight through or resumed after a crash.
A writer thread encodes and stores chunk ``c`` while the model computes chunk ``c + 1``.
"""

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cache_server.corpora.tokens import CorpusTokens, PretokenizedTokens
from cache_server.models import SourceModel
from cache_server.store.dataset_store import TOKENS_ARRAY, DatasetStore
from shared.codec import to_storage, to_torch
from shared.reshape import reshape_hook
from shared.schemas import DatasetManifest, HookSpec, HookStats


# Publishing progress rewrites the group metadata (JSON with the statistics): at most about once
# a second, so it costs the forward pass nothing measurable; chunks written since are redone
# after a crash.
COMMIT_SECONDS = 1.0


class HarvestCancelled(Exception):
    pass


@dataclass(frozen=True)
class Layout:
    """How rows, sequences and chunks line up."""

    context_size: int
    n_items: int
    chunk_rows: int

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_items / self.chunk_rows)


def choose_chunk_rows(context_size: int, widest_row_bytes: int, target_bytes: int) -> int:
    """Rows per chunk: whole sequences, about ``target_bytes`` for the widest hook."""
    seqs = max(1, target_bytes // (widest_row_bytes * context_size))
    return seqs * context_size


class CorpusExhausted(Exception):
    """The corpus ran out of tokens before the windows a harvest or an evaluation asked for."""

    def __init__(self, have: int, needed: int):
        super().__init__(f"the corpus fills {have:,} rows (tokens in windows) for this model, and {needed:,} "
                         "were needed")
        self.have, self.needed = have, needed


class TokenWindows:
    """``[n_sequences, context_size]`` windows of a corpus' token stream, each led by BOS if given;
    the stream is tokenised only as far as the windows read so far (see ``corpus_tokens``).
    Documents are packed back to back (the stream's separator between them): every window is full."""

    def __init__(self, stream: CorpusTokens | PretokenizedTokens | np.ndarray, context_size: int, bos: int | None):
        self.stream, self.bos, self.context_size = stream, bos, context_size
        self.body = context_size - (bos is not None)
        self._tokens = stream if isinstance(stream, np.ndarray) else stream.array(0)

    def __getitem__(self, rows: slice) -> np.ndarray:
        lo, hi = rows.start or 0, rows.stop
        needed = hi * self.body
        if len(self._tokens) < needed and not isinstance(self.stream, np.ndarray):
            have, _ = self.stream.ensure(needed)  # a block past ``needed``: few calls reach the disk
            self._tokens = self.stream.array(have)
        if len(self._tokens) < needed:
            raise CorpusExhausted(len(self._tokens) // self.body * self.context_size, hi * self.context_size)
        windows = np.asarray(self._tokens[lo * self.body : needed], dtype=np.int32).reshape(hi - lo, self.body)
        if self.bos is not None:
            windows = np.concatenate([np.full((hi - lo, 1), self.bos, dtype=np.int32), windows], axis=1)
        return windows

    def span(self, first_row: int, n_rows: int) -> "Span":
        """The windows that hold rows ``[first_row, first_row + n_rows)``."""
        first, stop = first_row // self.context_size, -(-(first_row + n_rows) // self.context_size)
        return Span(self[first:stop], np.full(stop - first, self.context_size), np.arange(first, stop),
                    first_row - first * self.context_size)

    def check(self, n_rows: int, max_bytes: int) -> tuple[int, bool]:
        """(rows the windows hold after reading at most ``max_bytes`` more of the corpus, whether
        that is all of it): a cheap look at whether a corpus can fill ``n_rows``."""
        have, complete = self.stream.ensure(-(-n_rows // self.context_size) * self.body, max_bytes)
        return have // self.body * self.context_size, complete

    def stream_end(self, n_rows: int) -> int:
        """Tokens of the stream the first ``n_rows`` rows hold (BOS tokens are not the stream's)."""
        return -(-n_rows // self.context_size) * self.body


class DocumentWindows:
    """One document per window: a window holds tokens of one document only, led by BOS if given;
    a document longer than a window goes on in the next ones, and a window's padding is no row.
    Rows are the windows' tokens back to back, so a chunk may start or end inside a window."""

    def __init__(self, stream: CorpusTokens | PretokenizedTokens, context_size: int, bos: int | None):
        self.stream, self.bos, self.context_size = stream, bos, context_size
        self.body = context_size - (bos is not None)
        self.starts = self.lengths = self.row_ends = np.zeros(0, dtype=np.int64)
        self._complete = False

    def _windows(self) -> None:
        """The window table from the documents on disk (an open document: its full windows only)."""
        docs, open_start = self.stream.documents()
        have, self._complete = self.stream.ensure(0)
        if open_start is not None:
            full = (have - open_start) // self.body * self.body
            docs = np.concatenate([docs, [[open_start, open_start + full]]])
        counts = -(-(docs[:, 1] - docs[:, 0]) // self.body)
        window_doc = np.repeat(np.arange(len(docs)), counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        self.starts = docs[window_doc, 0] + within * self.body
        self.lengths = np.minimum(docs[window_doc, 1] - self.starts, self.body) + (self.bos is not None)
        self.row_ends = np.cumsum(self.lengths)

    def _rows(self) -> int:
        return int(self.row_ends[-1]) if len(self.row_ends) else 0

    def _grow(self, n_rows: int, max_bytes: int | None = None) -> int:
        """Read the corpus until the windows hold ``n_rows`` rows or it ends (or, given
        ``max_bytes``, until that much more was read); returns the rows they hold."""
        if self._rows() < n_rows:
            self._windows()
        while self._rows() < n_rows and not self._complete:
            have, _ = self.stream.ensure(0)
            self.stream.ensure(have + n_rows - self._rows(), max_bytes)  # a row needs a token at least
            self._windows()
            if max_bytes is not None:
                break
        return self._rows()

    def span(self, first_row: int, n_rows: int) -> "Span":
        stop_row = first_row + n_rows
        if (rows := self._grow(stop_row)) < stop_row:
            raise CorpusExhausted(rows, stop_row)
        first = int(np.searchsorted(self.row_ends, first_row, side="right"))
        stop = int(np.searchsorted(self.row_ends, stop_row, side="left")) + 1
        tokens = self.stream.array(int(self.starts[stop - 1] + self.lengths[stop - 1]))
        windows = np.zeros((stop - first, self.context_size), dtype=np.int32)
        for i, (start, length) in enumerate(zip(self.starts[first:stop], self.lengths[first:stop])):
            body = tokens[start : start + length - (self.bos is not None)]
            if self.bos is not None:
                windows[i, 0] = self.bos
            windows[i, self.bos is not None : length] = body
        row_start = int(self.row_ends[first] - self.lengths[first])
        return Span(windows, self.lengths[first:stop].copy(), np.arange(first, stop), first_row - row_start)

    def check(self, n_rows: int, max_bytes: int) -> tuple[int, bool]:
        return self._grow(n_rows, max_bytes), self._complete

    def stream_end(self, n_rows: int) -> int:
        self._grow(n_rows)
        last = int(np.searchsorted(self.row_ends, n_rows, side="left"))
        return int(self.starts[last] + self.lengths[last] - (self.bos is not None))


@dataclass
class Span:
    """Windows that hold a run of rows: ``tokens [w, context]`` (padding after each window's
    ``lengths``), each window's index, and how many of the first window's rows come before the run."""

    tokens: np.ndarray
    lengths: np.ndarray
    window_ids: np.ndarray
    skip: int


def token_windows(packing: str, stream, context_size: int, bos: int | None) -> TokenWindows | DocumentWindows:
    """The windows a harvest cuts from a corpus' token stream, as its packing says."""
    return (DocumentWindows if packing == "document" else TokenWindows)(stream, context_size, bos)


def empty_state(hooks: list[HookSpec], widths: dict[str, int]) -> dict:
    return {h.name: {"sum": [0.0] * widths[h.name], "norm_sum": 0.0, "sq_norm_sum": 0.0, "count": 0} for h in hooks}


def add_stats(state: dict, chunk_stats: dict) -> dict:
    """Running sums in float64, added chunk by chunk in order: resume gives identical numbers."""
    out = {}
    for name, s in state.items():
        c = chunk_stats[name]
        out[name] = {
            "sum": (np.asarray(s["sum"], dtype=np.float64) + c["sum"]).tolist(),
            "norm_sum": s["norm_sum"] + c["norm_sum"],
            "sq_norm_sum": s["sq_norm_sum"] + c["sq_norm_sum"],
            "count": s["count"] + c["count"],
        }
    return out


def stats_view(s: dict) -> HookStats:
    n = max(s["count"], 1)
    return HookStats(count=s["count"], mean_norm=s["norm_sum"] / n, mean_squared_norm=s["sq_norm_sum"] / n)


def _row_stats(rows: torch.Tensor) -> dict:
    x = rows.double()
    norms = x.norm(dim=1)
    return {"sum": x.sum(0).cpu().numpy(), "norm_sum": float(norms.sum()),
            "sq_norm_sum": float((norms**2).sum()), "count": rows.shape[0]}


@dataclass
class _Chunk:
    index: int
    start: int
    arrays: dict[str, np.ndarray]
    stats: dict


class Harvester:
    """Runs one harvest from the dataset's committed chunk to the end."""

    def __init__(self, model: SourceModel, store: DatasetStore, manifest: DatasetManifest,
                 corpus: CorpusTokens | PretokenizedTokens,
                 on_commit: Callable[[DatasetManifest], None], cancel: threading.Event):
        self.model = model
        self.store = store
        self.manifest = manifest
        self.hooks = [HookSpec(name=h.name, concat_dims=h.concat_dims) for h in manifest.hooks]
        self.layout = Layout(manifest.context_size, manifest.n_items_total, manifest.chunk_rows)
        bos = model.bos_token_id if manifest.prepend_bos else None
        self.windows = token_windows(manifest.packing, corpus, manifest.context_size, bos)
        self.on_commit = on_commit
        self.cancel = cancel

    def run(self) -> DatasetManifest:
        """Harvest from the committed chunk to the end, committing a prefix as it goes."""
        self.pipeline(range(self.manifest.n_chunks, self.layout.n_chunks), self._write_loop)
        return self.manifest

    def repair(self, missing: list[str]) -> None:
        """Re-harvest the chunks whose files are in ``missing`` (keys under the dataset), arrays
        whose metadata is lost recreated first: a chunk is computed as the harvest computed it, so
        the dataset, statistics included, is again the one harvested."""
        lost = {key.split("/")[0] for key in missing if key.endswith("/zarr.json")}
        if lost:
            self.store.restore_arrays(self.manifest, lost)
        indices = set(range(self.manifest.n_chunks)) if lost else {int(key.split("/")[-2]) for key in missing}
        writer = self.store.writer(self.manifest.dataset_id)

        def write_loop(chunks: "queue.Queue[_Chunk | None]", errors: list[BaseException]) -> None:
            try:
                while (chunk := chunks.get()) is not None:
                    writer.write_rows(chunk.start, chunk.arrays)
            except BaseException as exc:
                errors.append(exc)

        self.pipeline(sorted(indices), write_loop)

    def pipeline(self, indices, write_loop: Callable) -> None:
        """Compute these chunks in order while ``write_loop(chunks, errors)`` stores them in a thread
        of its own (a queue of ``_Chunk``, then None)."""
        chunks: queue.Queue[_Chunk | None] = queue.Queue(maxsize=2)
        errors: list[BaseException] = []
        writer = threading.Thread(target=write_loop, args=(chunks, errors), name="harvest-writer", daemon=True)
        writer.start()
        try:
            for index in indices:
                if self.cancel.is_set():
                    raise HarvestCancelled()
                chunk = self._compute_chunk(index)
                while writer.is_alive():
                    try:
                        chunks.put(chunk, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if errors:
                    break
        finally:
            while writer.is_alive():
                try:
                    chunks.put(None, timeout=0.2)
                    break
                except queue.Full:
                    continue
            writer.join()
        if errors:
            raise errors[0]

    def _compute_chunk(self, index: int) -> _Chunk:
        start = index * self.layout.chunk_rows
        n_rows = min(self.layout.chunk_rows, self.layout.n_items - start)
        span = self.windows.span(start, n_rows)
        ctx = self.layout.context_size
        real = np.arange(ctx) < span.lengths[:, None]  # padding: run (masked), never stored
        dtype = getattr(torch, self.manifest.dtype)
        parts: dict[str, list[torch.Tensor]] = {h.name: [] for h in self.hooks}
        batch = self.manifest.batch_size
        for lo in range(0, len(span.tokens), batch):
            tokens = torch.from_numpy(span.tokens[lo : lo + batch]).long().to(self.model.device)
            mask = torch.from_numpy(real[lo : lo + batch])
            cache = self.model.run(tokens, self.hooks, None if mask.all() else mask.long().to(self.model.device))
            for hook in self.hooks:
                rows = reshape_hook(cache[hook.name], hook.concat_dims)
                parts[hook.name].append((rows if mask.all() else rows[mask.reshape(-1).to(rows.device)]).to(dtype))
        keep = slice(span.skip, span.skip + n_rows)
        arrays, stats = {}, {}
        for hook in self.hooks:
            rows = torch.cat(parts[hook.name])[keep]
            stats[hook.name] = _row_stats(rows)
            arrays[hook.name] = to_storage(rows, self.manifest.dtype)
        positions = np.broadcast_to(np.arange(ctx, dtype=np.int32), real.shape)
        arrays[TOKENS_ARRAY] = np.stack([
            span.tokens[real], np.repeat(span.window_ids.astype(np.int32), span.lengths), positions[real],
        ], axis=1)[keep]
        return _Chunk(index=index, start=start, arrays=arrays, stats=stats)

    def _write_loop(self, chunks: "queue.Queue[_Chunk | None]", errors: list[BaseException]) -> None:
        try:
            commits = Commits(self)
            while (chunk := chunks.get()) is not None:
                commits.writer.write_rows(chunk.start, chunk.arrays)
                commits.add(chunk.index, chunk.stats)
        except BaseException as exc:  # surfaced by run() as the job's failure reason
            errors.append(exc)


class Commits:
    """The committed prefix of a harvest: chunks, whose rows are stored, are added in order; their
    statistics are summed in that order (float64) and the manifest is published at most every
    ``COMMIT_SECONDS`` and at the end. Whoever computed the chunks, the sums are the same bits."""

    def __init__(self, harvester: Harvester):
        self.harvester = harvester
        self.writer = harvester.store.writer(harvester.manifest.dataset_id)
        self.state = self.writer.harvest_state()
        if {s["count"] for s in self.state.values()} != {harvester.manifest.n_items}:
            self.state = self._recount_state()
        self.expected, self.last_commit = harvester.manifest.n_chunks, time.monotonic()

    def add(self, index: int, chunk_stats: dict) -> None:
        h = self.harvester
        if index != self.expected:
            raise RuntimeError(f"chunk {index} out of order: expected chunk {self.expected}")
        self.expected += 1
        self.state = add_stats(self.state, chunk_stats)
        n_chunks = index + 1
        if n_chunks < h.layout.n_chunks and time.monotonic() - self.last_commit < COMMIT_SECONDS:
            return  # written, committed with a later chunk (a crash redoes it identically)
        self.last_commit = time.monotonic()
        manifest = h.manifest.model_copy(update={
            "n_chunks": n_chunks,
            "n_items": min(n_chunks * h.layout.chunk_rows, h.layout.n_items),
            "complete": n_chunks == h.layout.n_chunks,
            "hooks": [k.model_copy(update={"stats": stats_view(self.state[k.name])}) for k in h.manifest.hooks],
        })
        self.writer.commit(manifest, self.state)
        h.manifest = manifest
        h.on_commit(manifest)

    def _recount_state(self) -> dict:
        """The running sums rebuilt from the committed chunks, chunk by chunk in order, from the
        stored values: bit-identical to the sums a straight run accumulates. Used when the stored
        sums disagree with the committed row count."""
        h = self.harvester
        state = empty_state(h.hooks, {k.name: k.d for k in h.manifest.hooks})
        for index in range(h.manifest.n_chunks):
            start = index * h.layout.chunk_rows
            stop = start + h.manifest.rows_in_chunk(index)
            stats = {k.name: _row_stats(to_torch(self.writer.arrays[k.name][start:stop], h.manifest.dtype))
                     for k in h.hooks}
            state = add_stats(state, stats)
        return state
