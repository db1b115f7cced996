"""Stream a dataset's chunks in shuffled order into batches on the training device.

Each epoch, the training chunks (every chunk but the held-out evaluation ones) are put in a
seeded random order and read in windows of several chunks. A window's rows are concatenated and
moved to the training device (through pinned memory on CUDA) in their storage dtype; batches are
consecutive slices of the stream of windows, each window read in its own seeded permutation, and
are gathered, widened to float32 and scaled one batch at a time (``trainer.gather``). So a batch
mixes rows of many chunks (and sequences), and the loader's position is just
``(epoch, rows emitted in the epoch)``: a resumed run rebuilds the same window and skips what was
emitted, and sees neither repeated nor skipped rows.

Background threads fetch chunks (several connections; a raw chunk is read from the socket straight
into its slice of the window) and build the next windows while the current one is trained on. A
window's host buffer is reused for a later window once its last batch is out.
"""

import collections
import contextlib
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from shared.codec import decode_chunk, to_torch
from shared.schemas import DatasetManifest
from trainer.client import CacheClient, CacheError
from trainer.gather import gather_scaled


@dataclass(frozen=True)
class StreamPosition:
    epoch: int = 0
    rows: int = 0
    """Rows of this epoch already emitted in batches."""


@dataclass
class Batch:
    activations: Float[Tensor, "batch *component d"]
    row_ids: Int[Tensor, " batch"]
    """Dataset row of each activation, which is also sequence * context_size + position: which
    token it came from (the stored tokens array has its id), for shuffle-quality figures and
    exactly-once checks."""
    position: StreamPosition
    """The stream position after this batch: what a checkpoint saves."""


@dataclass
class _Window:
    index: int
    start_row: int
    activations: Float[Tensor, "component rows d"]
    """The window's rows in fetch order, in the storage dtype, on the training device."""
    order: Int[Tensor, " rows"]
    """The seeded shuffle: the window's i-th emitted row is ``activations[:, order[i]]``."""
    row_ids: Int[Tensor, " rows"]
    """Dataset row ids in emitted (shuffled) order."""
    host: np.ndarray | None
    """The host buffer ``activations`` is a view of (on CPU), for the next window once this one is done."""


class _HostBuffers:
    """Window buffers handed back and reused. A fresh array per window (25 MB in bench/train.py)
    costs the kernel a page fault and a zero-fill per page: a third of the loader's CPU time when
    measured there (sys 350 of ~1000 ns a row)."""

    def __init__(self):
        self._free: dict[tuple, list[np.ndarray]] = collections.defaultdict(list)
        self._lock, self.allocated = threading.Lock(), 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        with self._lock:
            free = self._free[(shape, dtype.str)]
            if free:
                return free.pop()
            self.allocated += 1
        return np.empty(shape, dtype)

    def give(self, buffer: np.ndarray | None) -> None:
        if buffer is not None:
            with self._lock:
                self._free[(buffer.shape, buffer.dtype.str)].append(buffer)


class ChunkStream:
    def __init__(self, client: CacheClient, manifest: DatasetManifest, hooks: list[str], batch_size: int,
                 window_rows: int, seed: int = 0, device: torch.device = torch.device("cpu"),
                 eval_chunks: int = 0, prefetch_windows: int = 2, fetch_threads: int = 4,
                 scales: list[float] | None = None, lane: int = 0, lanes: int = 1):
        for hook in hooks:
            if manifest.hook(hook) is None:
                raise CacheError(f"dataset {manifest.dataset_id} has no hook '{hook}'; it holds "
                                 f"{[h.name for h in manifest.hooks]}", 404)
        widths = {manifest.hook(h).d for h in hooks}
        if len(widths) != 1:
            raise CacheError(f"hooks streamed together must have one width; got {sorted(widths)}")
        self.client, self.manifest, self.hooks = client, manifest, hooks
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.lane, self.lanes = lane, lanes
        # A window holds at least one batch, so a batch spans at most two windows.
        self.chunks_per_window = max(1, -(-max(window_rows, batch_size) // manifest.chunk_rows))
        self.prefetch_windows, self.fetch_threads = prefetch_windows, fetch_threads
        self.scales = torch.tensor(scales or [1.0] * len(hooks), dtype=torch.float32, device=device)
        held_out = np.random.default_rng([seed, 2**31]).permutation(manifest.n_chunks_total)
        if eval_chunks >= manifest.n_chunks_total:
            raise CacheError(f"eval_chunks={eval_chunks} leaves no training chunk of {manifest.n_chunks_total}")
        self.eval_chunk_ids = sorted(int(i) for i in held_out[:eval_chunks])
        self.train_chunk_ids = sorted(int(i) for i in held_out[eval_chunks:])
        self.bytes_fetched = 0
        self._lock, self._buffers = threading.Lock(), _HostBuffers()

    # -- layout of an epoch ----------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[int]:
        """This lane's share of the epoch's seeded chunk order: every ``lanes``-th chunk from
        ``lane``. Lanes split an epoch between data-parallel ranks; their union is the epoch."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train_chunk_ids))
        return [self.train_chunk_ids[i] for i in order[self.lane :: self.lanes]]

    def windows(self, epoch: int) -> list[list[int]]:
        order, size = self.epoch_order(epoch), self.chunks_per_window
        return [order[i : i + size] for i in range(0, len(order), size)]

    @property
    def rows_per_epoch(self) -> int:
        """Training rows of an epoch, all lanes together."""
        return sum(self.manifest.rows_in_chunk(i) for i in self.train_chunk_ids)

    # -- fetching --------------------------------------------------------------------------------
    def _decode(self, data: bytes, array: str, index: int, out: np.ndarray | None = None) -> np.ndarray:
        info = self.manifest.tokens if array == "tokens" else self.manifest.hook(array)
        return decode_chunk(data, info, self.manifest.chunk_rows, self.manifest.rows_in_chunk(index), out=out)

    def _fetch_into(self, index: int, rows: np.ndarray) -> None:
        """Fetch one chunk of every streamed hook and decode it into its slice of the window."""
        n_bytes, full = 0, self.manifest.rows_in_chunk(index) == self.manifest.chunk_rows
        for c, hook in enumerate(self.hooks):
            if full and self.manifest.hook(hook).codec.name == "none":  # socket -> window, no copy
                n_bytes += self.client.chunk_into(self.manifest.dataset_id, hook, index, rows[c])
                continue
            data = self.client.chunk_bytes(self.manifest.dataset_id, hook, index)
            self._decode(data, hook, index, out=rows[c])
            n_bytes += len(data)
        with self._lock:
            self.bytes_fetched += n_bytes

    def _fetch_window(self, chunk_ids: list[int], pool: ThreadPoolExecutor,
                      reuse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``[component, rows, d]`` in the storage dtype, and row ids: chunks decode in place."""
        sizes = [self.manifest.rows_in_chunk(i) for i in chunk_ids]
        offsets = np.cumsum([0, *sizes])
        d = self.manifest.hook(self.hooks[0]).d
        storage = np.dtype(self.manifest.hook(self.hooks[0]).storage_dtype)
        shape = (len(self.hooks), int(offsets[-1]), d)
        rows = self._buffers.take(shape, storage) if reuse else np.empty(shape, storage)
        # A dataset row's index is also sequence * context_size + position (chunks hold whole
        # sequences, in order): no need to fetch the tokens array to know where a row came from.
        row_ids = np.concatenate([np.arange(i * self.manifest.chunk_rows, i * self.manifest.chunk_rows + n)
                                  for i, n in zip(chunk_ids, sizes)])
        jobs = [pool.submit(self._fetch_into, i, rows[:, lo:hi]) for i, lo, hi in zip(chunk_ids, offsets[:-1], offsets[1:])]
        for job in jobs:
            job.result()
        return rows, row_ids

    def _to_device(self, rows: np.ndarray) -> Float[Tensor, "component rows d"]:
        """``[component, rows, d]`` on the host -> the same rows on the device, still in the storage
        dtype (half the bytes to copy and to hold). On CUDA through pinned memory, non_blocking."""
        acts = to_torch(rows, self.manifest.dtype)
        if self.device.type == "cuda":
            acts = acts.pin_memory().to(self.device, non_blocking=True)
        return acts

    def load_rows(self, chunk_ids: list[int], pool: ThreadPoolExecutor) -> tuple[Tensor, Tensor]:
        """Rows of these chunks on the training device, in float32, scaled; and their row ids."""
        rows, row_ids = self._fetch_window(chunk_ids, pool)
        acts = self._to_device(rows)
        out = gather_scaled(acts, torch.arange(acts.shape[1], device=self.device), self.scales)
        return self._as_taken(out), torch.from_numpy(row_ids)

    def _as_taken(self, rows: Float[Tensor, "rows component d"]) -> Float[Tensor, "rows *component d"]:
        """``[rows, d]`` for one hook, ``[rows, component, d]`` for several (a view)."""
        return rows[:, 0] if len(self.hooks) == 1 else rows

    def _build_window(self, epoch: int, index: int, chunk_ids: list[int], start_row: int,
                      pool: ThreadPoolExecutor) -> _Window:
        rows, row_ids = self._fetch_window(chunk_ids, pool, reuse=True)
        perm = np.random.default_rng([self.seed, epoch, index]).permutation(len(row_ids))
        acts = self._to_device(rows)
        if self.device.type == "cuda":  # the rows were copied to pinned memory: the buffer is free
            self._buffers.give(rows)
            rows = None
        return _Window(index, start_row, acts, torch.from_numpy(perm).to(self.device),
                       torch.from_numpy(row_ids[perm]), rows)

    # -- batches ---------------------------------------------------------------------------------
    def batches(self, start: StreamPosition = StreamPosition()) -> Iterator[Batch]:
        """Batches forever (epoch after epoch), from ``start``; stop by leaving the loop."""
        windows: queue.Queue = queue.Queue(maxsize=self.prefetch_windows)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(start, windows, stop), daemon=True,
                                    name="chunk-stream")
        producer.start()
        try:
            yield from self._consume(start, windows)
        finally:
            stop.set()
            while producer.is_alive() or not windows.empty():
                try:
                    self._recycle(windows.get(timeout=0.1))
                except queue.Empty:
                    pass

    def _plan(self, start: StreamPosition) -> Iterator[tuple[int, int, list[int], int] | tuple[int, None]]:
        """(epoch, window index, chunk ids, first row) for every window still to emit, with an
        (epoch, None) marker at each epoch's end; forever."""
        epoch = start.epoch
        while True:
            row = 0
            for index, chunk_ids in enumerate(self.windows(epoch)):
                rows = sum(self.manifest.rows_in_chunk(i) for i in chunk_ids)
                if epoch > start.epoch or row + rows > start.rows:
                    yield epoch, index, chunk_ids, row
                row += rows
            yield epoch, None
            epoch += 1

    def _produce(self, start: StreamPosition, out: queue.Queue, stop: threading.Event) -> None:
        """Build windows ahead, several at once (fetching the next while shuffling this one), in order."""
        ahead: collections.deque = collections.deque()
        try:
            with ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="fetch") as pool, \
                    ThreadPoolExecutor(self.prefetch_windows, thread_name_prefix="window") as builders:
                for item in self._plan(start):
                    if stop.is_set():
                        return
                    if item[1] is None:
                        ahead.append(item)
                    else:
                        epoch, index, chunk_ids, row = item
                        ahead.append((epoch, builders.submit(self._build_window, epoch, index, chunk_ids, row, pool)))
                    while len(ahead) > self.prefetch_windows or (ahead and ahead[0][1] is None):
                        epoch, built = ahead.popleft()
                        self._put(out, (epoch, built if built is None else built.result()), stop)
                        if stop.is_set():
                            return
        except BaseException as exc:  # handed to the consumer, raised in the training loop
            self._put(out, exc, stop)
        finally:  # stopped early: the windows built ahead give their buffers back (the builders are done)
            for _, built in ahead:
                if built is not None and built.exception() is None:
                    self._recycle(built.result())

    def _put(self, out: queue.Queue, item, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        self._recycle(item)

    def _recycle(self, item) -> None:
        """A window done with (or that will not be emitted), alone or as a queue item: its host
        buffer goes back to the pool."""
        window = item[1] if isinstance(item, tuple) else item
        if isinstance(window, _Window):
            self._buffers.give(window.host)

    def _arrivals(self, windows: queue.Queue) -> Iterator[tuple[int, _Window | None]]:
        """The producer's items in order. A window's buffer goes back to the pool when the next
        item arrives (batches are copies of its rows) or when the stream is left."""
        window: _Window | None = None
        try:
            while True:
                item = windows.get()
                self._recycle(window)
                window = None
                if isinstance(item, BaseException):
                    raise item
                window = item[1]
                yield item
        finally:
            self._recycle(window)

    def _consume(self, start: StreamPosition, windows: queue.Queue) -> Iterator[Batch]:
        size = self.batch_size
        acts = ids = None  # the batch being filled: from one window, or the end of one and the start of the next
        filled = 0
        with contextlib.closing(self._arrivals(windows)) as arrivals:
            for epoch, window in arrivals:
                if window is None:  # end of an epoch: its last partial batch continues into the next
                    continue
                offset = max(0, start.rows - window.start_row) if epoch == start.epoch else 0  # resumed: skip
                n = window.row_ids.shape[0]
                while offset < n:
                    if acts is None:  # filled in place: no concatenation, no torch op that wakes its thread pool
                        acts = torch.empty(size, len(self.hooks), window.activations.shape[2], dtype=torch.float32,
                                           device=self.device)
                        ids = torch.empty(size, dtype=torch.long)
                    take = min(size - filled, n - offset)
                    # Gathered, widened and scaled a batch at a time (the batch is in cache) and without
                    # the GIL: a window-wide permuted copy cost the loader a fifth of its throughput.
                    gather_scaled(window.activations, window.order[offset : offset + take], self.scales,
                                  out=acts[filled : filled + take])
                    ids[filled : filled + take] = window.row_ids[offset : offset + take]
                    offset, filled = offset + take, filled + take
                    if filled == size:
                        yield Batch(self._as_taken(acts), ids, StreamPosition(epoch, window.start_row + offset))
                        acts, filled = None, 0

    def evaluation_rows(self, max_rows: int | None = None) -> tuple[Tensor, Tensor]:
        """The held-out chunks' rows (never trained on), for evaluation."""
        if not self.eval_chunk_ids:
            raise CacheError("no held-out chunks: set eval_chunks >= 1")
        with ThreadPoolExecutor(self.fetch_threads) as pool:
            acts, seqs = self.load_rows(self.eval_chunk_ids, pool)
        return (acts[:max_rows], seqs[:max_rows]) if max_rows else (acts, seqs)
