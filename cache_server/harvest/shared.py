"""One harvest split across several server replicas that share a store (``--replica NAME``).

The dataset's chunks are cut into contiguous ranges. A ledger object beside the dataset,
``_harvest/<dataset_id>/ledger.json``, says who owns each range and how many of its chunks are
done; every change to it is a compare-and-swap (S3 conditional writes, a lock file on disk), so
two replicas never both claim a range and exactly one of them marks the last range done.

A replica claims, in order: a range it owned before a restart (it resumes after the last chunk it
marked done), an unclaimed range, or a range whose owner has not written for ``lease`` seconds
(a replica that died). It writes each chunk's rows, then the chunk's statistics
(``_harvest/<id>/stats/<chunk>.json``), then advances the ledger. Chunks are computed exactly as a
single harvester computes them, so whoever computes a chunk writes the same bytes. When every
range is done, the statistics are summed chunk by chunk in order, as a single harvester sums
them, and the manifest is published complete: identical, row for row and bit for bit, to a
single-harvester run. Until then the manifest shows no committed rows; a replica's job reports
the progress of all of them.
"""

import json
import queue
import time
from dataclasses import dataclass

import numpy as np

from cache_server.harvest.harvester import (
    COMMIT_SECONDS, Harvester, HarvestCancelled, _Chunk, add_stats, empty_state, stats_view,
)
from cache_server.store.dataset_store import COORDINATION, DatasetStore
from shared.schemas import DatasetManifest

MAX_RANGES = 16


class LostRange(Exception):
    """Another replica took this range over (our lease ran out)."""


def ledger_key(dataset_id: str) -> str:
    return f"{COORDINATION}/{dataset_id}/ledger.json"


def stats_key(dataset_id: str, index: int) -> str:
    return f"{COORDINATION}/{dataset_id}/stats/{index}.json"


def new_ledger(n_chunks: int) -> dict:
    size = -(-n_chunks // min(MAX_RANGES, n_chunks))
    return {"ranges": [{"first": lo, "stop": min(lo + size, n_chunks), "owner": None, "done": 0, "beat": 0.0}
                       for lo in range(0, n_chunks, size)]}


@dataclass
class Ledger:
    store: DatasetStore
    dataset_id: str
    replica: str
    lease: float

    def _update(self, change):
        """Apply ``change(ledger) -> result`` by compare-and-swap until it lands (no write when it
        changed nothing); returns the result."""
        key = ledger_key(self.dataset_id)
        while True:
            data, version = self.store.conditional.read(key)
            ledger = json.loads(data)
            before = json.dumps(ledger)
            result = change(ledger)
            updated = json.dumps(ledger)
            if updated == before or self.store.conditional.write(key, updated.encode(), version):
                return result

    def read(self) -> dict:
        return json.loads(self.store.conditional.read(ledger_key(self.dataset_id))[0])

    def claim(self) -> tuple[int, dict] | None:
        """A range to work on, as (index, range), in the order of the module's docstring; or None for now."""
        def take(ledger: dict) -> tuple[int, dict] | None:
            now = time.time()
            open_ranges = [(i, r) for i, r in enumerate(ledger["ranges"]) if r["first"] + r["done"] < r["stop"]]
            mine = [i for i, r in open_ranges if r["owner"] == self.replica]
            free = [i for i, r in open_ranges if r["owner"] is None]
            stale = [i for i, r in open_ranges if now - r["beat"] > self.lease]
            for i in (mine + free + stale)[:1]:
                ledger["ranges"][i].update(owner=self.replica, beat=now)
                return i, dict(ledger["ranges"][i])
            return None

        return self._update(take)

    def advance(self, index: int, done: int) -> dict:
        """Mark ``done`` chunks of range ``index`` finished (and renew the lease); the ledger after.
        Raises LostRange if another replica owns the range now."""
        def mark(ledger: dict) -> dict:
            r = ledger["ranges"][index]
            if r["owner"] != self.replica:
                raise LostRange(f"range {index} is now owned by {r['owner']}")
            r.update(done=max(r["done"], done), beat=time.time())
            return ledger

        return self._update(mark)


def done_rows(ledger: dict, manifest: DatasetManifest) -> int:
    return sum(manifest.rows_in_chunk(c) for r in ledger["ranges"] for c in range(r["first"], r["first"] + r["done"]))


def all_done(ledger: dict) -> bool:
    return all(r["first"] + r["done"] >= r["stop"] for r in ledger["ranges"])


class SharedHarvest:
    """This replica's part of a shared harvest: claim ranges until every range is done."""

    def __init__(self, harvester: Harvester, replica: str, lease: float, on_progress, poll: float = 1.0):
        self.harvester, self.store, self.manifest = harvester, harvester.store, harvester.manifest
        self.ledger = Ledger(self.store, self.manifest.dataset_id, replica, lease)
        self.on_progress, self.poll = on_progress, poll

    def run(self) -> DatasetManifest:
        while True:
            ledger = self.ledger.read()
            if all_done(ledger):
                return self.finalize()
            claimed = self.ledger.claim()
            if claimed is None:  # the rest is claimed by live replicas: wait for them (or their leases)
                self.on_progress(done_rows(ledger, self.manifest))
                if self.harvester.cancel.wait(self.poll):
                    raise HarvestCancelled()
                continue
            index, r = claimed
            try:
                self.harvester.pipeline(range(r["first"] + r["done"], r["stop"]),
                                        lambda chunks, errors: self._write_loop(index, r, chunks, errors))
            except LostRange:
                continue

    def _write_loop(self, index: int, r: dict, chunks: "queue.Queue[_Chunk | None]", errors: list) -> None:
        try:
            writer = self.store.writer(self.manifest.dataset_id)
            done, last = r["done"], time.monotonic()
            while (chunk := chunks.get()) is not None:
                writer.write_rows(chunk.start, chunk.arrays)
                stats = {name: {**s, "sum": np.asarray(s["sum"]).tolist()} for name, s in chunk.stats.items()}
                self.store.put_bytes(stats_key(self.manifest.dataset_id, chunk.index), json.dumps(stats).encode())
                done = chunk.index + 1 - r["first"]
                if chunk.index + 1 < r["stop"] and time.monotonic() - last < COMMIT_SECONDS:
                    continue
                last = time.monotonic()
                self.on_progress(done_rows(self.ledger.advance(index, done), self.manifest))
        except BaseException as exc:
            errors.append(exc)

    def finalize(self) -> DatasetManifest:
        """Statistics summed chunk by chunk in order, and the manifest published complete
        (idempotent: any replica may do it, and all would write the same)."""
        current = self.store.manifest(self.manifest.dataset_id, fresh=True)
        if current.complete:
            return current
        state = empty_state(self.harvester.hooks, {h.name: h.d for h in self.manifest.hooks})
        for index in range(self.manifest.n_chunks_total):
            chunk_stats = json.loads(self.store.get_bytes(stats_key(self.manifest.dataset_id, index)))
            state = add_stats(state, chunk_stats)
        manifest = self.manifest.model_copy(update={
            "n_chunks": self.manifest.n_chunks_total, "n_items": self.manifest.n_items_total, "complete": True,
            "hooks": [h.model_copy(update={"stats": stats_view(state[h.name])}) for h in self.manifest.hooks],
        })
        self.store.writer(self.manifest.dataset_id).commit(manifest, state)
        self.on_progress(manifest.n_items)
        return manifest
