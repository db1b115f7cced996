"""Stream a dataset's chunks in shuffled order into batches on the training device.

Each epoch, the training chunks (every chunk but the held-out evaluation ones) are put in a
seeded random order and read in windows of several chunks. Each window's rows are put in their own
seeded permutation (``trainer.data.permutation``) and batches are consecutive slices of the stream of
permuted windows. So a batch mixes rows of many chunks (and sequences), and the loader's position
is just ``(epoch, rows emitted in the epoch)``: a resumed run rebuilds the same window and skips
what was emitted, and sees neither repeated nor skipped rows.

Background threads fetch chunks (several connections) and build the next windows while the current
one is trained on. On the CPU, a chunk is read from the socket into a per-thread buffer and its
rows are widened to float32, scaled and written straight to their shuffled places in the window
(``trainer.data.scatter``), while they are still in cache: a batch is then a slice of the window, with no
work left per batch. A window keeps a batch of free rows before and after its own, where the batch
made of two windows' rows is joined (copying the carry or the rest, whichever is fewer rows). A
window takes ``(rows + 2 * batch) * components * d * 4`` bytes of host memory, and the pool keeps
up to ``2 * prefetch_windows + 4`` of them. On a GPU, the window goes there in its storage dtype
(half the bytes to copy) and is shuffled and widened there. Leaving the loop drops the windows
built ahead; their chunks not being fetched yet are not fetched.
"""

import collections
import queue
import sys
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
from trainer.data.client import CacheClient, CacheError
from trainer.data.permutation import permutation, places_of, seed_of
from trainer.data.scatter import scatter_scaled


@dataclass(frozen=True)
class StreamPosition:
    epoch: int = 0
    rows: int = 0
    """Rows of this epoch already emitted in batches."""


@dataclass
class Batch:
    activations: Float[Tensor, "batch *component d"]
    row_ids: Int[Tensor, " batch"]
    """Dataset row of each activation: which token it came from (the stored tokens array has its
    id, window and position; with concatenated packing the row is also window * context_size +
    position), for shuffle-quality figures and exactly-once checks."""
    position: StreamPosition
    """The stream position after this batch: what a checkpoint saves."""


@dataclass
class _Window:
    index: int
    start_row: int
    padded: Float[Tensor, "room_rows_room *component d"]
    """The window's rows in emitted (shuffled) order, float32 and scaled, on the training device
    (``[rows, d]`` for one hook and ``[rows, component, d]`` for several), with ``room`` free rows
    (a batch) before and after them: the batch made of two windows' rows is joined in one of these."""
    room: int
    row_ids: Int[Tensor, " rows"]
    """Dataset row ids in emitted order."""


@dataclass
class _Carry:
    """Rows ``buffer[start:end]`` of a window's padded buffer, fewer than a batch, waiting for the
    next window's; the buffer's rows from ``end`` to ``start + batch`` are free."""
    buffer: Tensor
    start: int
    end: int
    row_ids: Tensor


class _HostBuffers:
    """Host buffers for windows, reused once nothing refers to them any more (batches are views of
    their window, and a view keeps the memory it views alive). A fresh array per window costs the
    kernel a page fault and a zero-fill per page: a third of the loader's CPU time when measured
    (sys 350 of ~1000 ns a row)."""

    def __init__(self, keep: int):
        self._blocks: list[np.ndarray] = []
        """Byte arrays owning the memory; every view of one refers to it (numpy views refer to
        the array owning their memory, never to an intermediate view)."""
        self._lock, self.keep, self.allocated = threading.Lock(), keep, 0

    def _idle(self, i: int) -> bool:
        return sys.getrefcount(self._blocks[i]) == 2  # the list's reference and getrefcount's argument

    def take(self, shape: tuple[int, ...], dtype: np.dtype, capacity: int = 0) -> np.ndarray:
        """An array of ``shape`` that nothing else refers to, starting on a cache line (the scatter
        writes whole lines): the front of a pooled block at least as large, or of a new one of
        ``capacity`` elements (windows differ in size by a chunk and fit each other's), pooled in
        place of an idle one when the pool is full."""
        size = int(np.prod(shape)) * dtype.itemsize
        with self._lock:
            for i in range(len(self._blocks)):
                if len(self._blocks[i]) >= size + 64 and self._idle(i):
                    return _aligned(self._blocks[i], size, dtype, shape)
            block = np.empty(max(size, capacity * dtype.itemsize) + 64, np.uint8)
            self.allocated += 1
            if len(self._blocks) < self.keep:
                self._blocks.append(block)
            else:
                idle = [i for i in range(len(self._blocks)) if self._idle(i)]
                if idle:
                    self._blocks[idle[0]] = block
            return _aligned(block, size, dtype, shape)

    def idle(self) -> bool:
        """Whether no buffer of the pool is in use."""
        with self._lock:
            return all(self._idle(i) for i in range(len(self._blocks)))


def _aligned(block: np.ndarray, size: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    start = -block.ctypes.data % 64
    return block[start : start + size].view(dtype).reshape(shape)


def _unless(stop: threading.Event | None, fetch):
    """``fetch``, skipped once ``stop`` is set: the loop was left and the windows built ahead are
    dropped, so their chunks are not fetched (hundreds of megabytes with the default window)."""
    return fetch if stop is None else lambda *args: None if stop.is_set() else fetch(*args)


def _joined(carry: _Carry, window: _Window, offset: int, take: int) -> _Carry:
    """``carry`` followed by the window's rows ``offset : offset + take``, made contiguous by copying
    the fewer rows: the carry into the free rows before those in the window's buffer, or those into
    the free rows after the carry in its buffer. No batch handed out views either."""
    row_ids = torch.cat([carry.row_ids, window.row_ids[offset : offset + take]])
    n, at = carry.end - carry.start, window.room + offset
    if n <= take:
        _copy(window.padded[at - n : at], carry.buffer[carry.start : carry.end])
        return _Carry(window.padded, at - n, at + take, row_ids)
    _copy(carry.buffer[carry.end : carry.end + take], window.padded[at : at + take])
    return _Carry(carry.buffer, carry.start, carry.end + take, row_ids)


def _copy(to: Tensor, rows: Tensor) -> None:
    """``to[:] = rows``; on the CPU with numpy (torch would wake its thread pool, whose threads then
    spin while the loader's threads fetch: ~200 ns a row of CPU, measured)."""
    if to.device.type == "cpu":
        to.numpy()[:] = rows.numpy()
    else:
        to.copy_(rows)


def shuffled_on_device(stored: Float[Tensor, "component rows d"], order: Int[Tensor, " rows"],
                       scales: Float[Tensor, " component"],
                       out: Float[Tensor, "rows component d"] | None = None) -> Float[Tensor, "rows component d"]:
    """A window on a GPU, in its storage dtype: its rows in ``order``, float32, scaled, written to
    ``out`` when given (a padded window's rows). What the CPU's scatter computes, with torch ops
    (a GPU has the bandwidth for three passes)."""
    picked = stored.transpose(0, 1).index_select(0, order)
    return (picked.float() if out is None else out.copy_(picked)).mul_(scales.view(-1, 1))


def chunk_split(n_chunks: int, seed: int, eval_chunks: int) -> tuple[list[int], list[int]]:
    """The run's held-out chunk ids (``eval_chunks`` of them, seeded) and its training chunk ids:
    what a run folder's seed and ``eval_chunks`` name again later (the feature browser's rows)."""
    order = permutation(n_chunks, seed_of(seed, 2**31))
    return sorted(int(i) for i in order[:eval_chunks]), sorted(int(i) for i in order[eval_chunks:])


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
        self._scale_values = [np.float32(s) for s in self.scales.tolist()]
        if eval_chunks >= manifest.n_chunks_total:
            n, rows = manifest.n_chunks_total, manifest.chunk_rows
            fewer = f", or set eval_chunks = {n - 1} in the sweep's [run]" if n > 1 else ""
            raise CacheError(f"the dataset has {n} chunk{'s' if n > 1 else ''} of {rows:,} rows and eval_chunks="
                             f"{eval_chunks} holds {eval_chunks} out, leaving none to train on: harvest at least "
                             f"{(eval_chunks + 1) * rows:,} tokens ({eval_chunks + 1} chunks){fewer}")
        self.eval_chunk_ids, self.train_chunk_ids = chunk_split(manifest.n_chunks_total, seed, eval_chunks)
        self.bytes_fetched = 0
        # Windows alive at once: queued, being built or handed over, the current one, and the last
        # one's carry and batch.
        self._buffers = _HostBuffers(keep=2 * prefetch_windows + 4)
        self._lock, self._staging = threading.Lock(), threading.local()

    # -- layout of an epoch ----------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[int]:
        """This lane's share of the epoch's seeded chunk order: every ``lanes``-th chunk from
        ``lane``. Lanes split an epoch between data-parallel ranks; their union is the epoch."""
        order = permutation(len(self.train_chunk_ids), seed_of(self.seed, epoch))
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

    def _receive(self, index: int, hook: str, out: np.ndarray) -> int:
        """One chunk of ``hook`` decoded into ``out`` (``[rows in the chunk, d]``); its size in bytes."""
        if self.manifest.rows_in_chunk(index) == self.manifest.chunk_rows and self.manifest.hook(hook).codec.name == "none":
            return self.client.chunk_into(self.manifest.dataset_id, hook, index, out)  # socket -> out, no copy
        data = self.client.chunk_bytes(self.manifest.dataset_id, hook, index)
        self._decode(data, hook, index, out=out)
        return len(data)

    def _count(self, n_bytes: int) -> None:
        with self._lock:
            self.bytes_fetched += n_bytes

    def _fetch_into(self, index: int, rows: np.ndarray) -> None:
        """Fetch one chunk of every streamed hook into its slice of a ``[component, rows, d]`` window."""
        self._count(sum(self._receive(index, hook, rows[c]) for c, hook in enumerate(self.hooks)))

    def _fetch_scattered(self, index: int, places: np.ndarray, out: np.ndarray) -> None:
        """Fetch one chunk of every streamed hook and write its rows, widened and scaled, to
        ``out[places, component]``, from a per-thread buffer the size of a chunk (still in cache)."""
        d = self.manifest.hook(self.hooks[0]).d
        storage = np.dtype(self.manifest.hook(self.hooks[0]).storage_dtype)
        staging = getattr(self._staging, "rows", None)
        if staging is None or staging.shape != (self.manifest.chunk_rows, d) or staging.dtype != storage:
            staging = self._staging.rows = np.empty((self.manifest.chunk_rows, d), storage)
        rows, n_bytes = staging[: len(places)], 0
        for c, hook in enumerate(self.hooks):
            n_bytes += self._receive(index, hook, rows)
            scatter_scaled(rows, places, self._scale_values[c], out, c, self.manifest.dtype)
        self._count(n_bytes)

    def _layout(self, chunk_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Where each chunk starts in the window, and the window's dataset row ids (fetch order)."""
        sizes = np.array([self.manifest.rows_in_chunk(i) for i in chunk_ids])
        offsets = np.cumsum([0, *sizes])
        # Rows are numbered in dataset order, chunk after chunk: no need to fetch the tokens
        # array to know which row a value is.
        firsts = np.array(chunk_ids) * self.manifest.chunk_rows
        return offsets, np.repeat(firsts - offsets[:-1], sizes) + np.arange(offsets[-1])

    def _load(self, chunk_ids: list[int], offsets: np.ndarray, order: np.ndarray, pool: ThreadPoolExecutor,
              stop: threading.Event | None = None, room: int = 0) -> Float[Tensor, "room_rows_room *component d"]:
        """These chunks' rows (starting at ``offsets``, from ``_layout``) in ``order`` (the i-th is
        their row ``order[i]``) on the training device, float32 and scaled, with ``room`` rows
        (uninitialised) before and after them. Once ``stop`` is set, the window is being dropped:
        its chunks not fetched yet are left out."""
        d, n = self.manifest.hook(self.hooks[0]).d, int(offsets[-1])
        spans = list(zip(chunk_ids, offsets[:-1], offsets[1:]))
        if self.device.type == "cpu":
            capacity = (self.chunks_per_window * self.manifest.chunk_rows + 2 * room) * len(self.hooks) * d
            out = self._buffers.take((room + n + room, len(self.hooks), d), np.dtype(np.float32), capacity)
            places, fetch = places_of(order, room), _unless(stop, self._fetch_scattered)
            jobs = [pool.submit(fetch, i, places[lo:hi], out) for i, lo, hi in spans]
            rows = torch.from_numpy(out)
        else:  # the rows in their storage dtype to the GPU, through pinned memory; shuffled and widened there
            storage = np.dtype(self.manifest.hook(self.hooks[0]).storage_dtype)
            capacity = self.chunks_per_window * self.manifest.chunk_rows * len(self.hooks) * d
            stored = self._buffers.take((len(self.hooks), n, d), storage, capacity)
            fetch = _unless(stop, self._fetch_into)
            jobs = [pool.submit(fetch, i, stored[:, lo:hi]) for i, lo, hi in spans]
        for job in jobs:
            job.result()
        if self.device.type != "cpu":
            on_device = to_torch(stored, self.manifest.dtype).pin_memory().to(self.device, non_blocking=True)
            rows = torch.empty((room + n + room, len(self.hooks), d), device=self.device)
            shuffled_on_device(on_device, torch.from_numpy(order).to(self.device), self.scales, out=rows[room : room + n])
        return rows[:, 0] if len(self.hooks) == 1 else rows

    def load_rows(self, chunk_ids: list[int], pool: ThreadPoolExecutor) -> tuple[Tensor, Tensor]:
        """Rows of these chunks on the training device, in float32, scaled; and their row ids."""
        offsets, row_ids = self._layout(chunk_ids)
        return self._load(chunk_ids, offsets, np.arange(len(row_ids)), pool), torch.from_numpy(row_ids)

    def _build_window(self, epoch: int, index: int, chunk_ids: list[int], start_row: int,
                      pool: ThreadPoolExecutor, stop: threading.Event) -> _Window:
        offsets, row_ids = self._layout(chunk_ids)
        order = permutation(len(row_ids), seed_of(self.seed, epoch, index))
        padded = self._load(chunk_ids, offsets, order, pool, stop, room=self.batch_size)
        return _Window(index, start_row, padded, self.batch_size, torch.from_numpy(row_ids[order]))

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
            producer.join()

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
                        ahead.append((epoch, builders.submit(self._build_window, epoch, index, chunk_ids, row, pool, stop)))
                    while len(ahead) > self.prefetch_windows or (ahead and ahead[0][1] is None):
                        epoch, built = ahead.popleft()
                        self._put(out, (epoch, built if built is None else built.result()), stop)
                        if stop.is_set():
                            return
        except BaseException as exc:  # handed to the consumer, raised in the training loop
            self._put(out, exc, stop)

    def _put(self, out: queue.Queue, item, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _consume(self, start: StreamPosition, windows: queue.Queue) -> Iterator[Batch]:
        size = self.batch_size
        carry: _Carry | None = None
        while True:
            item = windows.get()
            if isinstance(item, BaseException):
                raise item
            epoch, window = item
            if window is None:  # end of an epoch: its last partial batch continues into the next
                continue
            offset = max(0, start.rows - window.start_row) if epoch == start.epoch else 0  # resumed: skip
            n, room = window.row_ids.shape[0], window.room
            if carry is not None:
                take = min(size - (carry.end - carry.start), n - offset)
                carry = _joined(carry, window, offset, take)
                offset += take
                if carry.end - carry.start < size:  # a window smaller than the batch's rest
                    continue
                yield Batch(carry.buffer[carry.start : carry.end], carry.row_ids,
                            StreamPosition(epoch, window.start_row + offset))
                carry = None
            while offset + size <= n:
                offset += size
                yield Batch(window.padded[room + offset - size : room + offset], window.row_ids[offset - size : offset],
                            StreamPosition(epoch, window.start_row + offset))
            if offset < n:
                carry = _Carry(window.padded, room + offset, room + n, window.row_ids[offset:])

    def evaluation_rows(self, max_rows: int | None = None) -> tuple[Tensor, Tensor]:
        """The held-out chunks' rows (never trained on), for evaluation."""
        if not self.eval_chunk_ids:
            raise CacheError("no held-out chunks: set eval_chunks >= 1")
        with ThreadPoolExecutor(self.fetch_threads) as pool:
            acts, seqs = self.load_rows(self.eval_chunk_ids, pool)
        return (acts[:max_rows], seqs[:max_rows]) if max_rows else (acts, seqs)
