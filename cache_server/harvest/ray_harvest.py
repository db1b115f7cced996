"""Harvests executed on a Ray cluster (``cache-server --ray-address``): the server stays the
control plane (REST API, manifest, progress, cancel, statistics), Ray runs the model.

The chunks still to harvest are cut into ranges in order; each range is a task on a pool of
``ray_workers`` actors that each hold the model once (a GPU each when the cluster has GPUs,
``ray_worker_cpus`` CPUs otherwise) and write their chunks' rows straight into the dataset's store
(the bucket, or a folder every node sees). A task returns its chunks' statistics; the server adds
them to the committed prefix in chunk order (``harvester.Commits``, as the in-process harvest
does), so the dataset, statistics and manifest included, is the in-process harvest's bit for bit,
and a server restarted mid-harvest resumes from its committed prefix as before.

A worker process that dies is restarted by Ray and its task retried: a chunk is computed the same
whoever computes it, so rewriting one is harmless. An error raised by the harvest itself (a corpus
that runs out, a full disk) is not retried: the job fails with it. Cancel kills the pool (Ray
cannot interrupt a running actor task); the next harvest starts a new one.

Ray is imported by this module only, and this module only when a server has ``--ray-address``.
"""

import logging
import math
import threading
from pathlib import Path

import ray
from ray.util import ActorPool

from cache_server.harvest.harvester import Commits, Harvester, HarvestCancelled
from cache_server.settings import Settings

log = logging.getLogger("cache_server.harvest.ray_harvest")

RANGES_PER_WORKER = 4  # enough ranges for a worker that restarts not to hold the others up


class HarvestWorker:
    """One Ray actor: the server's parts opened from its settings, the models kept loaded."""

    def __init__(self, settings: Settings):
        from cache_server.parts import open_parts

        self.parts = open_parts(settings)
        self._harvesters: dict[str, Harvester] = {}

    def _harvester(self, dataset_id: str) -> Harvester:
        if dataset_id not in self._harvesters:
            store, corpora = self.parts.store, self.parts.corpora
            manifest = store.manifest(dataset_id, fresh=True)
            if manifest is None:
                raise RuntimeError(f"dataset {dataset_id} is not in the store this worker sees")
            model = self.parts.models.get(manifest.model.name)
            corpus = corpora.stream_for(corpora.resolve(manifest.corpus_id), model)
            self._harvesters = {dataset_id: Harvester(model, store, manifest, corpus, lambda m: None, threading.Event())}
        return self._harvesters[dataset_id]

    def harvest(self, dataset_id: str, first: int, stop: int) -> dict[int, dict]:
        """Compute and store chunks ``[first, stop)``; their statistics by chunk index."""
        harvester, stats = self._harvester(dataset_id), {}

        def write_loop(chunks, errors) -> None:
            try:
                writer = harvester.store.writer(dataset_id)
                while (chunk := chunks.get()) is not None:
                    writer.write_rows(chunk.start, chunk.arrays)
                    stats[chunk.index] = chunk.stats
            except BaseException as exc:
                errors.append(exc)

        harvester.pipeline(range(first, stop), write_loop)
        return stats

    def ready(self) -> bool:
        return True


def chunk_ranges(first: int, stop: int, workers: int) -> list[tuple[int, int]]:
    """``[first, stop)`` in contiguous ranges, about ``RANGES_PER_WORKER`` per worker."""
    size = max(1, math.ceil((stop - first) / (workers * RANGES_PER_WORKER)))
    return [(lo, min(lo + size, stop)) for lo in range(first, stop, size)]


def absolute(settings: Settings) -> Settings:
    """The settings with their folders absolute: a worker's working directory is not the server's."""
    folders = {name: getattr(settings, name).resolve() for name in ("state_dir", "models_dir", "corpora_dir")
               if getattr(settings, name) is not None}
    store = settings.store if settings.store_is_bucket else str(Path(settings.store).resolve())
    return settings.model_copy(update={**folders, "store": store})


class RayHarvests:
    """The server's side: one connection to the cluster and a pool of workers, started by the first
    harvest and killed ``ray_idle_seconds`` after the last one (or on cancel, or at stop)."""

    def __init__(self, settings: Settings):
        self.settings = absolute(settings)
        self._pool: list | None = None
        self._lock = threading.Lock()
        self._idle: threading.Timer | None = None
        self._busy = False

    def connect(self) -> None:
        if not ray.is_initialized():
            address = self.settings.ray_address
            options = {"include_dashboard": False} if address == "local" else {}
            ray.init(address=None if address == "local" else address, log_to_driver=False, **options)
            log.info("connected to Ray: %s", ray.cluster_resources())

    def _workers(self) -> list:
        with self._lock:
            if self._idle is not None:
                self._idle.cancel()
            self._busy = True
            if self._pool is None:
                self.connect()
                gpus = ray.cluster_resources().get("GPU", 0) > 0
                resources = {"num_gpus": 1} if gpus else {"num_cpus": self.settings.ray_worker_cpus}
                actor = ray.remote(max_restarts=-1, max_task_retries=-1, **resources)(HarvestWorker)
                self._pool = [actor.remote(self.settings) for _ in range(self.settings.ray_workers)]
            return self._pool

    def stop(self, if_idle: bool = False) -> None:
        """Kill the pool (its actors hold models and the cluster's resources); ``if_idle``: unless a
        harvest took it up again meanwhile."""
        with self._lock:
            if if_idle and self._busy:
                return
            pool, self._pool = self._pool, None
        for actor in pool or []:
            ray.kill(actor, no_restart=True)

    def _release_later(self) -> None:
        with self._lock:
            self._busy = False
            self._idle = threading.Timer(self.settings.ray_idle_seconds, self.stop, kwargs={"if_idle": True})
            self._idle.daemon = True
            self._idle.start()

    def run(self, harvester: Harvester) -> None:
        """Harvest from the committed chunk to the end on the pool, committing as chunks finish in order."""
        manifest = harvester.manifest
        commits, finished = Commits(harvester), {}
        workers = self._workers()
        pool = ActorPool(workers)
        for lo, hi in chunk_ranges(manifest.n_chunks, harvester.layout.n_chunks, len(workers)):
            pool.submit(lambda actor, r: actor.harvest.remote(manifest.dataset_id, *r), (lo, hi))
        try:
            while pool.has_next():
                if harvester.cancel.is_set():
                    self.stop()
                    raise HarvestCancelled()
                try:
                    finished.update(pool.get_next_unordered(timeout=0.2))
                except TimeoutError:
                    continue
                while commits.expected in finished:
                    commits.add(commits.expected, finished.pop(commits.expected))
        except ray.exceptions.RayTaskError as exc:  # the harvest's own error, raised in a worker
            self.stop()
            raise exc.cause from None
        except ray.exceptions.RayError as exc:  # a worker that cannot start (e.g. cannot see the store)
            self.stop()
            raise RuntimeError(f"Ray: {str(exc).strip().splitlines()[0][:500]}") from None
        except BaseException:
            self.stop()
            raise
        self._release_later()
