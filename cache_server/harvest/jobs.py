"""Harvest jobs: validated, deduplicated by dataset id, persisted, run one at a time, resumable.

Each job is a JSON file under ``<store>/jobs`` replaced whole on every change. On start-up, jobs
that were queued or running when the server stopped (or was killed) are queued again; they resume
from the dataset's last committed chunk.
"""

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from cache_server.corpora.corpus_store import CorpusStore, check_vocabulary
from cache_server.errors import ServiceError
from cache_server.files import atomic_write, disk_full_message, free_bytes, is_disk_full
from cache_server.harvest.harvester import (CorpusExhausted, Harvester, HarvestCancelled, choose_chunk_rows, empty_state,
                                   token_windows)
from cache_server.metrics import ServerMetrics
from cache_server.quarantine import Quarantine
from cache_server.models import ModelRegistry, SourceModel
from cache_server.store.dataset_store import TOKENS_ARRAY, DatasetStore
from shared.codec import STORAGE_DTYPES
from shared.ids import content_id, is_valid_id
from shared.schemas import (
    ACTIVE_STATUSES, ArrayInfo, CodecInfo, CorpusInfo, DatasetManifest, HarvestAccepted, HarvestJob, HarvestRequest, HookInfo,
)

if TYPE_CHECKING:
    from cache_server.harvest.ray_harvest import RayHarvests

log = logging.getLogger("cache_server.harvest.jobs")


class JobError(ServiceError):
    """A harvest request the service refuses."""


_TOKEN_ROW_BYTES = 12  # (token, sequence, position) as int32


def _stored_bytes(manifest: DatasetManifest) -> int:
    itemsize = 4 if manifest.dtype == "float32" else 2
    return manifest.n_items_total * (itemsize * sum(h.d for h in manifest.hooks) + _TOKEN_ROW_BYTES)


def _too_short(corpus: str, rows: int, context_size: int, packing: str, n_tokens: int) -> str:
    return (f"corpus '{corpus}' fills at most {rows:,} rows for this model at context_size={context_size} "
            f"(packing '{packing}'); asked for n_tokens={n_tokens:,}: ask for at most {rows:,} (sae-train "
            "--harvest-tokens, sae-pipeline --tokens), fewer to leave the corpus' end as held-out text for "
            "the downstream evaluation, or name a larger corpus")


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class _Plan:
    dataset_id: str
    model: SourceModel
    widths: dict[str, int]
    corpus: CorpusInfo


class JobManager:
    def __init__(self, folder: Path, store: DatasetStore, corpora: CorpusStore, models: ModelRegistry,
                 metrics: ServerMetrics, quarantine: Quarantine, max_tokens: int, chunk_bytes: int,
                 min_free_bytes: int = 0,
                 corpus_check_bytes: int = 8 << 20, ray: "RayHarvests | None" = None):
        self.folder, self.quarantine = folder, quarantine
        folder.mkdir(parents=True, exist_ok=True)
        self.store, self.corpora, self.models, self.metrics = store, corpora, models, metrics
        self.max_tokens, self.chunk_bytes, self.min_free_bytes = max_tokens, chunk_bytes, min_free_bytes
        self.corpus_check_bytes = corpus_check_bytes
        self.ray = ray
        self._jobs: dict[str, HarvestJob] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        for path in sorted(self.folder.glob("*.json")):
            job = self.quarantine.load(path, "harvest-job", HarvestJob.model_validate_json)
            if job is not None:
                self._jobs[job.job_id] = job
        for job in sorted(self._jobs.values(), key=lambda j: j.created_at):
            if job.status in ACTIVE_STATUSES:
                try:
                    self._set(job, status="queued")
                except OSError:  # a full disk must not stop the start: the job is queued in memory
                    log.exception("could not save harvest job %s as queued", job.job_id)
                    self._jobs[job.job_id] = job.model_copy(update={"status": "queued"})
                self._enqueue(job)
        self._worker = threading.Thread(target=self._work, name="harvest-worker", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Stop after the current chunk; an unfinished job stays queued and resumes next start."""
        self._stopping.set()
        for event in self._cancel.values():
            event.set()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout=60)
        if self.ray is not None:
            self.ray.stop()

    # -- requests ----------------------------------------------------------------------------
    def submit(self, request: HarvestRequest) -> tuple[HarvestAccepted, bool]:
        """Returns (answer, created): a complete dataset is a cache hit and starts no job."""
        corpus = self.corpora.resolve(request.corpus)
        if request.prepend_bos is None:  # text gets a BOS, pre-tokenized ids are used as they are
            request = request.model_copy(update={"prepend_bos": not corpus.pretokenized})
        plan = self._plan(request, corpus)
        known = self.store.manifest(plan.dataset_id)
        if known is None:
            self._check_corpus(request, plan)  # outside the lock: reading a corpus may take a while
        with self._lock:
            manifest = self.store.manifest(plan.dataset_id)
            if manifest is not None and manifest.complete and not self.store.missing(manifest):
                done = [j for j in self._jobs.values() if j.dataset_id == plan.dataset_id and j.status == "completed"]
                job_id = done[-1].job_id if done else None
                return HarvestAccepted(job_id=job_id, dataset_id=plan.dataset_id, status="completed"), False
            active = [j for j in self._jobs.values() if j.dataset_id == plan.dataset_id and j.status in ACTIVE_STATUSES]
            if active:
                return HarvestAccepted(job_id=active[0].job_id, dataset_id=plan.dataset_id, status=active[0].status), False
            if manifest is None:
                self._check_room(request, plan)
                manifest = self._create_dataset(request, plan)
            now = _now()
            job = HarvestJob(job_id=secrets.token_hex(12), dataset_id=plan.dataset_id, status="queued",
                             request=request, tokens_done=manifest.n_items, tokens_total=manifest.n_items_total,
                             created_at=now, updated_at=now)
            self._persist(job)  # first: a job that could not be saved is not reported, nor kept, as queued
            self._jobs[job.job_id] = job
            self._enqueue(job)
            return HarvestAccepted(job_id=job.job_id, dataset_id=job.dataset_id, status="queued"), True

    def get(self, job_id: str) -> HarvestJob | None:
        return self._jobs.get(job_id) if is_valid_id(job_id) else None

    def list(self) -> list[HarvestJob]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at)

    def cancel(self, job_id: str) -> HarvestJob:
        with self._lock:
            job = self.get(job_id)
            if job is None:
                raise JobError(f"unknown job '{job_id}'", 404)
            if job.status not in ACTIVE_STATUSES:
                raise JobError(f"job '{job_id}' is already {job.status}", 409)
            self._cancel[job_id].set()
            if job.status == "queued":
                job = self._set(job, status="cancelled")
            return job

    def dataset_busy(self, dataset_id: str) -> bool:
        return any(j.dataset_id == dataset_id and j.status in ACTIVE_STATUSES for j in self._jobs.values())

    # -- planning ----------------------------------------------------------------------------
    def _plan(self, request: HarvestRequest, corpus: CorpusInfo) -> _Plan:
        if request.n_tokens > self.max_tokens:
            raise JobError(f"n_tokens={request.n_tokens} is over this server's limit of {self.max_tokens}")
        model = self.models.get(request.model)
        if request.context_size > model.info.n_ctx:
            raise JobError(f"context_size={request.context_size} is larger than model '{request.model}' "
                           f"supports (n_ctx={model.info.n_ctx})")
        if request.prepend_bos and model.bos_token_id is None:
            raise JobError(f"model '{request.model}' has no BOS token; set prepend_bos to false")
        hooks = request.hook_specs()
        widths = model.check_hooks(hooks)
        identity = {
            "model": model.info.name, "fingerprint": model.info.fingerprint,
            "hooks": [h.model_dump() for h in hooks], "corpus": corpus.corpus_id,
            "context_size": request.context_size, "prepend_bos": request.prepend_bos,
            "dtype": request.dtype, "n_tokens": request.n_tokens,
        }
        if request.packing != "concatenate":  # named only when not the default: older ids stay as they were
            identity["packing"] = request.packing
        return _Plan(dataset_id=content_id(identity), model=model, widths=widths, corpus=corpus)

    def _check_corpus(self, request: HarvestRequest, plan: _Plan) -> None:
        """Refuse a harvest the corpus cannot fill, when that is known after reading at most
        ``corpus_check_bytes`` more of it (the job reads the rest)."""
        corpus, vocabulary = plan.corpus, plan.model.bridge.cfg.d_vocab
        label = request.corpus if isinstance(request.corpus, str) else corpus.corpus_id
        check_vocabulary(corpus, label, request.model, vocabulary)
        bos = plan.model.bos_token_id if request.prepend_bos else None
        windows = token_windows(request.packing, self.corpora.stream_for(plan.corpus, plan.model), request.context_size, bos)
        rows, complete = windows.check(request.n_tokens, self.corpus_check_bytes)
        if rows < request.n_tokens and complete:
            raise JobError(_too_short(label, rows, request.context_size, request.packing, request.n_tokens))

    def _check_room(self, request: HarvestRequest, plan: _Plan) -> None:
        """A harvest that would not fit on the store's disk (leaving ``min_free_bytes``) is refused."""
        if self.store.root is None:
            return  # a bucket: no free-space figure to compare with
        itemsize = 4 if request.dtype == "float32" else 2
        needed = request.n_tokens * (itemsize * sum(plan.widths.values()) + _TOKEN_ROW_BYTES)
        free = free_bytes(self.store.root) - self.min_free_bytes
        if needed > free:
            raise JobError(f"the harvest needs about {needed:,} bytes and the store's disk has {max(free, 0):,} "
                           f"free (keeping {self.min_free_bytes:,} in reserve): free some space or ask for "
                           "fewer tokens, hooks or a smaller dtype", 507)

    def _create_dataset(self, request: HarvestRequest, plan: _Plan) -> DatasetManifest:
        hooks = request.hook_specs()
        storage = STORAGE_DTYPES[request.dtype]
        itemsize = 4 if request.dtype == "float32" else 2
        chunk_rows = choose_chunk_rows(request.context_size, itemsize * max(plan.widths.values()), self.chunk_bytes)
        # No chunk longer than the dataset: raw chunks are stored at full size, padding included.
        chunk_rows = min(chunk_rows, -(-request.n_tokens // request.context_size) * request.context_size)
        n_chunks = -(-request.n_tokens // chunk_rows)
        manifest = DatasetManifest(
            dataset_id=plan.dataset_id, model=plan.model.info, corpus_id=plan.corpus.corpus_id,
            context_size=request.context_size, prepend_bos=request.prepend_bos, packing=request.packing,
            dtype=request.dtype,
            hooks=[HookInfo(name=h.name, concat_dims=h.concat_dims, d=plan.widths[h.name], storage_dtype=storage,
                            logical_dtype=request.dtype, codec=CodecInfo(name="none", level=0)) for h in hooks],
            tokens=ArrayInfo(name=TOKENS_ARRAY, d=3, storage_dtype="int32", logical_dtype="int32"),
            chunk_rows=chunk_rows, n_items_total=request.n_tokens, n_items=0, n_chunks_total=n_chunks,
            n_chunks=0, complete=False, batch_size=request.batch_size, created_at=_now(),
            store_url=self.store.bucket_url(plan.dataset_id),
        )
        self.store.create(manifest, empty_state(hooks, plan.widths))
        return manifest

    # -- the worker --------------------------------------------------------------------------
    def _enqueue(self, job: HarvestJob) -> None:
        self._cancel[job.job_id] = threading.Event()
        self._queue.put(job.job_id)

    def _work(self) -> None:
        while (job_id := self._queue.get()) is not None:
            job = self._jobs[job_id]
            if job.status != "queued" or self._stopping.is_set():
                continue
            try:
                self._run(job)
            except Exception as exc:  # the job fails with its reason; the worker goes on
                log.exception("harvest %s failed", job_id)
                self._fail(job_id, exc)

    def _fail(self, job_id: str, exc: Exception) -> None:
        """Record a failure; when the disk is full even that may not reach the disk, and the job
        still ends failed (in memory) so the worker moves on to the next one."""
        job = self._jobs[job_id]
        if is_disk_full(exc):
            self.store.remove_partial_writes(job.dataset_id)
            error = disk_full_message(exc, self.folder)
            if (manifest := self.store.manifest(job.dataset_id)) is not None:
                error += f"; this harvest needs about {_stored_bytes(manifest):,} bytes in all"
        elif isinstance(exc, CorpusExhausted) and (manifest := self.store.manifest(job.dataset_id)) is not None:
            error = (_too_short(manifest.corpus_id, exc.have, manifest.context_size, manifest.packing,
                                manifest.n_items_total)
                     + f"; DELETE /v1/datasets/{job.dataset_id} and ask for fewer")
        else:
            error = f"{type(exc).__name__}: {exc}"
        changes = {"status": "failed", "error": error, "tokens_per_second": None, "eta_seconds": None}
        try:
            self._set(job, **changes)
        except OSError:
            log.exception("could not save the failure of harvest %s", job_id)
            with self._lock:
                self._jobs[job_id] = job.model_copy(update={**changes, "updated_at": _now()})

    def worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _run(self, job: HarvestJob) -> None:
        cancel = self._cancel[job.job_id]
        job = self._set(job, status="running", error=None)
        manifest = self.store.manifest(job.dataset_id)
        if manifest is None:
            raise RuntimeError(f"dataset {job.dataset_id} was deleted")
        self.store.remove_partial_writes(job.dataset_id)
        model = self.models.get(manifest.model.name)
        corpus = self.corpora.stream_for(self.corpora.resolve(manifest.corpus_id), model)
        t0, rows0 = time.perf_counter(), manifest.n_items

        def progress(rows: int) -> None:
            rate = (rows - rows0) / max(time.perf_counter() - t0, 1e-9)
            self.metrics.harvest_tokens.inc(max(0, rows - self._jobs[job.job_id].tokens_done))
            self._set(self._jobs[job.job_id], tokens_done=rows, tokens_per_second=rate,
                      eta_seconds=(manifest.n_items_total - rows) / rate if rate > 0 else None)

        try:
            harvester = Harvester(model, self.store, manifest, corpus, lambda m: progress(m.n_items), cancel)
            if manifest.complete and (missing := self.store.missing(manifest)):  # a damaged dataset
                log.warning("dataset %s: %d files missing; re-harvesting them", manifest.dataset_id, len(missing))
                harvester.repair(missing)
            elif self.ray is not None:
                self.ray.run(harvester)
            else:
                harvester.run()
        except HarvestCancelled:
            status = "queued" if self._stopping.is_set() else "cancelled"
            self._set(self._jobs[job.job_id], status=status, tokens_per_second=None, eta_seconds=None)
            return
        self._set(self._jobs[job.job_id], status="completed", eta_seconds=0.0)

    def _set(self, job: HarvestJob, **changes) -> HarvestJob:
        with self._lock:
            job = job.model_copy(update={**changes, "updated_at": _now()})
            self._persist(job)  # first: what memory says is what a restart will read
            self._jobs[job.job_id] = job
            self.metrics.set_job_counts(self._jobs.values())
            return job

    def _persist(self, job: HarvestJob) -> None:
        atomic_write(self.folder / f"{job.job_id}.json", job.model_dump_json(indent=1).encode())
