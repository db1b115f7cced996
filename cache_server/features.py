"""Feature statistics of registered SAEs, as jobs run one at a time (the browser's data).

A job reads the SAE's dataset rows (the first ``max_rows``) chunk by chunk, twice, through
``feature_statistics``, and stores the result beside the SAE (``<sae_id>.features.safetensors``);
a feature's page is then answered from it, plus a few rows of tokens read for its examples.
"""

import logging
import math
from datetime import datetime, timezone
from pathlib import Path

import torch
import zarr
from safetensors.torch import load_file, save_file

from cache_server.errors import ServiceError
from cache_server.feature_stats import FeatureStats, feature_statistics
from cache_server.files import atomic_write
from cache_server.job_queue import JobQueue
from cache_server.models import ModelRegistry
from cache_server.saes import SaeStore
from cache_server.store import TOKENS_ARRAY, DatasetStore
from shared.codec import to_torch
from shared.ids import is_valid_id
from shared.schemas import ACTIVE_STATUSES, FeatureDetail, FeatureExample, FeatureJob

log = logging.getLogger("cache_server.features")
BEFORE, AFTER = 8, 4  # tokens of context shown around an example
_FIELDS = ("fired", "sum_values", "max_values", "top_values", "top_rows", "histogram", "interval_rows", "interval_values")


class FeatureError(ServiceError):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc)


class FeatureJobs(JobQueue):
    job_model, id_field, pattern, worker_name = FeatureJob, "sae_id", "*.job.json", "feature-worker"

    def __init__(self, folder: Path, saes: SaeStore, store: DatasetStore, models: ModelRegistry):
        super().__init__(folder)
        self.saes, self.store, self.models = saes, store, models
        self._stats: dict[str, FeatureStats] = {}

    def submit(self, sae_id: str, max_rows: int) -> FeatureJob:
        sae = self.saes.info(sae_id)
        manifest = self.store.manifest(sae.dataset_id)
        if manifest is None or not manifest.complete:
            raise FeatureError(f"the SAE's dataset {sae.dataset_id} is not a complete dataset here", 409)
        with self._lock:
            job = self._jobs.get(sae_id)
            if job is not None and (job.status in ACTIVE_STATUSES or job.status == "completed"):
                return job
            now = _now()
            job = self._set(FeatureJob(sae_id=sae_id, status="queued", n_rows=min(max_rows, manifest.n_items),
                                       created_at=now, updated_at=now))
        self._queue.put(sae_id)
        return job

    def get(self, sae_id: str) -> FeatureJob:
        job = self._jobs.get(sae_id) if is_valid_id(sae_id) else None
        if job is None:
            self.saes.info(sae_id)  # 404 for an unknown SAE, before "not computed"
            raise FeatureError(f"SAE '{sae_id}' has no feature statistics yet: POST /v1/saes/{sae_id}/features", 404)
        return job

    # -- a feature ---------------------------------------------------------------------------
    def detail(self, sae_id: str, index: int) -> FeatureDetail:
        job = self.get(sae_id)
        if job.status != "completed":
            raise FeatureError(f"the feature statistics of SAE '{sae_id}' are {job.status}", 409)
        stats, sae = self._load(sae_id), self.saes.info(sae_id)
        if not 0 <= index < sae.d_sae:
            raise FeatureError(f"feature {index} is out of range: SAE '{sae_id}' has {sae.d_sae} (0..{sae.d_sae - 1})", 404)
        weights = self.saes.weights(sae_id)
        manifest = self.store.manifest(sae.dataset_id)
        group = zarr.open_group(store=self.store.zarr_store, path=sae.dataset_id, mode="r")
        vocabulary = self.models.get(manifest.model.name).vocabulary()

        def example(row: int, value: float) -> FeatureExample:
            token, window, position = (int(v) for v in group[TOKENS_ARRAY][row])
            lo = row - min(position, BEFORE)
            hi = min(row + min(AFTER, manifest.context_size - 1 - position) + 1, manifest.n_items)
            around = group[TOKENS_ARRAY][lo:hi]
            hi = lo + int((around[:, 1] == window).sum())  # a window may be shorter (one document each)
            ids = [int(t) for t in around[: hi - lo, 0]]
            rows = to_torch(group[sae.hook][lo:hi], manifest.dtype).float()
            acts = weights.encode(rows)[:, index]
            return FeatureExample(row=row, value=value, tokens=[vocabulary[t] if 0 <= t < len(vocabulary) else f"<{t}>"
                                                                for t in ids],
                                  values=[round(float(a), 6) for a in acts], position=row - lo)

        top = [example(int(r), float(v)) for r, v in zip(stats.top_rows[:, index], stats.top_values[:, index]) if r >= 0]
        intervals = [[example(int(r), float(v)) for r, v in zip(stats.interval_rows[q, :, index],
                                                                stats.interval_values[q, :, index]) if r >= 0]
                     for q in range(stats.interval_rows.shape[0])]
        directions = torch.nn.functional.normalize(weights.W_dec, dim=1)
        cosine = directions @ directions[index]
        cosine[index] = -math.inf
        best = cosine.topk(min(10, sae.d_sae - 1))
        fired, peak = int(stats.fired[index]), float(stats.max_values[index])
        bins = stats.histogram.shape[1]
        return FeatureDetail(
            sae_id=sae_id, index=index, n_rows=stats.n_rows, density=fired / max(stats.n_rows, 1), max_value=peak,
            mean_value=float(stats.sum_values[index]) / max(fired, 1),
            histogram_edges=[peak * i / bins for i in range(bins + 1)],
            histogram_counts=[int(c) for c in stats.histogram[index]], top=top, intervals=intervals,
            neighbours=[(int(i), round(float(c), 6)) for i, c in zip(best.indices, best.values)])

    def _load(self, sae_id: str) -> FeatureStats:
        if sae_id not in self._stats:
            t = load_file(self.folder / f"{sae_id}.features.safetensors")
            self._stats[sae_id] = FeatureStats(n_rows=int(t.pop("n_rows")), **{k: t[k] for k in _FIELDS})
        return self._stats[sae_id]

    # -- the worker --------------------------------------------------------------------------
    def _work(self) -> None:
        while (sae_id := self._queue.get()) is not None:
            job = self._jobs[sae_id]
            if job.status != "queued":
                continue
            try:
                self._run(self._set(job, status="running", error=None, rows_done=0))
                self._set(self._jobs[sae_id], status="completed")
            except Exception as exc:  # the job fails with its reason; the worker goes on
                log.exception("feature statistics of %s failed", sae_id)
                self._jobs[sae_id] = self._jobs[sae_id].model_copy(update={"status": "failed",
                                                                          "error": f"{type(exc).__name__}: {exc}"})

    def _run(self, job: FeatureJob) -> None:
        sae = self.saes.info(job.sae_id)
        weights, manifest = self.saes.weights(job.sae_id), self.store.manifest(sae.dataset_id)
        array = zarr.open_group(store=self.store.zarr_store, path=sae.dataset_id, mode="r")[sae.hook]
        done = [0]

        def chunks():
            for lo in range(0, job.n_rows, manifest.chunk_rows):
                hi = min(lo + manifest.chunk_rows, job.n_rows)
                yield to_torch(array[lo:hi], manifest.dtype).float(), torch.arange(lo, hi)
                done[0] += hi - lo
                self._set(self._jobs[job.sae_id], rows_done=done[0])

        with torch.inference_mode():
            stats = feature_statistics(weights.encode, chunks, sae.d_sae)
        tensors = {k: getattr(stats, k).contiguous() for k in _FIELDS}
        save_file({**tensors, "n_rows": torch.tensor(stats.n_rows)}, self.folder / f"{job.sae_id}.features.safetensors")
        self._stats.pop(job.sae_id, None)

    def _set(self, job: FeatureJob, **changes) -> FeatureJob:
        job = job.model_copy(update={**changes, "updated_at": _now()})
        self._jobs[job.sae_id] = job
        atomic_write(self.folder / f"{job.sae_id}.job.json", job.model_dump_json(indent=1).encode())
        return job
