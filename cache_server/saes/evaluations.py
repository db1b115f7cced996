"""Evaluation jobs: a registered SAE spliced into its dataset's model, run one at a time.

An evaluation's id is a hash of what determines its figures (the SAE, the text, the number of
tokens), so asking again is a cache hit. Jobs are JSON files under ``<root>/evaluations``,
replaced whole on every change; ones that were queued or running at a restart are queued again.

Held-out text: the harvest read the dataset's corpus token stream from its start, as far as its
windows reached (``stream_end``); evaluation windows are cut from the stream after that point
(back to back, whatever the harvest's packing), so the SAE is judged on text it never saw.
"""

import logging
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from cache_server.corpora.corpus_store import CorpusStore, check_vocabulary
from cache_server.saes.downstream import evaluate, not_causal_reason
from cache_server.errors import ServiceError
from cache_server.files import atomic_write
from cache_server.harvest.harvester import TokenWindows, token_windows
from cache_server.job_queue import JobQueue
from cache_server.quarantine import Quarantine
from cache_server.models import ModelRegistry, SourceModel
from cache_server.saes.registry import SaeStore
from cache_server.store.dataset_store import DatasetStore
from shared.ids import content_id, is_valid_id
from shared.schemas import ACTIVE_STATUSES, DatasetManifest, EvaluationJob, EvaluationRequest, EvaluationResult

log = logging.getLogger("cache_server.saes.evaluations")


class EvaluationError(ServiceError):
    """An evaluation request the service refuses."""


def _now() -> datetime:
    return datetime.now(timezone.utc)



def _non_finite(figures: dict, prefix: str = "") -> list[str]:
    """Names of the NaN or infinite numbers in a nested dict."""
    bad = []
    for name, value in figures.items():
        if isinstance(value, dict):
            bad += _non_finite(value, f"{prefix}{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            bad.append(prefix + name)
    return bad


class EvaluationManager(JobQueue):
    job_model, id_field, worker_name, kind = EvaluationJob, "evaluation_id", "evaluation-worker", "evaluation"

    def __init__(self, folder: Path, saes: SaeStore, store: DatasetStore, corpora: CorpusStore,
                 models: ModelRegistry, quarantine: Quarantine):
        super().__init__(folder, quarantine)
        self.saes, self.store, self.corpora, self.models = saes, store, corpora, models

    # -- requests ----------------------------------------------------------------------------
    def submit(self, request: EvaluationRequest) -> EvaluationJob:
        sae = self.saes.info(request.sae_id)
        manifest = self.store.manifest(sae.dataset_id)
        if manifest is None or not manifest.complete:
            raise EvaluationError(f"the SAE's dataset {sae.dataset_id} is not a complete dataset here", 409)
        model = self._model(manifest)
        corpus_id, first, windows = self._windows(request, manifest, model)
        evaluation_id = content_id({"sae_id": sae.sae_id, "corpus_id": corpus_id, "first_token": first,
                                    "n_windows": windows})
        with self._lock:
            job = self._jobs.get(evaluation_id)
            if job is not None and (job.status in ACTIVE_STATUSES or job.status == "completed"):
                return job
            now = _now()
            job = EvaluationJob(evaluation_id=evaluation_id, status="queued", request=request,
                                dataset_id=manifest.dataset_id, tokens_total=windows * manifest.context_size,
                                created_at=now, updated_at=now)
            self._set(job)
        self._queue.put(evaluation_id)
        return job

    def get(self, evaluation_id: str) -> EvaluationJob:
        job = self._jobs.get(evaluation_id) if is_valid_id(evaluation_id) else None
        if job is None:
            raise EvaluationError(f"unknown evaluation '{evaluation_id}'", 404)
        return job

    def list(self) -> list[EvaluationJob]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at)

    def _model(self, manifest: DatasetManifest) -> SourceModel:
        model = self.models.get(manifest.model.name)
        if model.info.fingerprint != manifest.model.fingerprint:
            raise EvaluationError(f"model '{manifest.model.name}' now has other weights than when dataset "
                                  f"{manifest.dataset_id} was harvested; its SAEs cannot be evaluated on it", 409)
        return model

    def _windows(self, request: EvaluationRequest, manifest: DatasetManifest,
                 model: SourceModel) -> tuple[str, int, int]:
        """(corpus id, first token, number of windows) of the text to evaluate on."""
        corpus = self.corpora.resolve(request.corpus or manifest.corpus_id)
        check_vocabulary(corpus, request.corpus or corpus.corpus_id, manifest.model.name, model.bridge.cfg.d_vocab)
        first = self._harvested_tokens(manifest, model) if request.corpus is None else 0
        body = manifest.context_size - manifest.prepend_bos
        wanted = -(-request.n_tokens // manifest.context_size)
        stream = self._stream(corpus, model, first + wanted * body)
        available = max(0, len(stream) - first) // body
        if wanted > available:
            text = (f"the dataset's corpus {corpus.corpus_id} has {available * manifest.context_size:,} tokens "
                    f"left after the {first:,} the harvest read" if request.corpus is None else
                    f"corpus {corpus.corpus_id} has {available * manifest.context_size:,} tokens")
            raise EvaluationError(f"{text} (whole {manifest.context_size}-token windows); asked for "
                                  f"n_tokens={request.n_tokens:,}: ask for fewer, or name another corpus")
        return corpus.corpus_id, first, wanted

    def _harvested_tokens(self, manifest: DatasetManifest, model: SourceModel) -> int:
        """How far into its corpus' token stream the dataset's harvest read."""
        stream = self.corpora.stream(self.corpora.resolve(manifest.corpus_id), model.tokenizer, model.info.fingerprint,
                                     model.separator_token_id, model.bridge.cfg.d_vocab)
        bos = model.bos_token_id if manifest.prepend_bos else None
        return token_windows(manifest.packing, stream, manifest.context_size, bos).stream_end(manifest.n_items_total)

    def _stream(self, corpus, model: SourceModel, n: int) -> np.ndarray:
        """The corpus' first ``n`` tokens (fewer when it has fewer), tokenised only that far."""
        return self.corpora.tokens(corpus, model.tokenizer, model.info.fingerprint, model.separator_token_id, n,
                                   model.bridge.cfg.d_vocab)

    # -- the worker --------------------------------------------------------------------------
    def _work(self) -> None:
        while (evaluation_id := self._queue.get()) is not None:
            job = self._jobs[evaluation_id]
            if job.status != "queued":
                continue
            try:
                result = self._run(self._set(job, status="running", error=None))
                self._set(self._jobs[evaluation_id], status="completed", result=result,
                          tokens_done=self._jobs[evaluation_id].tokens_total)
            except Exception as exc:  # the job fails with its reason; the worker goes on
                log.exception("evaluation %s failed", evaluation_id)
                changes = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                try:
                    self._set(self._jobs[evaluation_id], **changes)
                except OSError:  # a full disk: the job still ends failed, in memory
                    log.exception("could not save the failure of evaluation %s", evaluation_id)
                    self._jobs[evaluation_id] = self._jobs[evaluation_id].model_copy(update=changes)

    def _run(self, job: EvaluationJob) -> EvaluationResult:
        sae_info = self.saes.info(job.request.sae_id)
        manifest = self.store.manifest(job.dataset_id)
        if manifest is None:
            raise RuntimeError(f"dataset {job.dataset_id} was deleted")
        model = self._model(manifest)
        corpus_id, first, n_windows = self._windows(job.request, manifest, model)
        body = manifest.context_size - manifest.prepend_bos
        stream = self._stream(self.corpora.resolve(corpus_id), model, first + n_windows * body)
        bos = model.bos_token_id if manifest.prepend_bos else None
        windows = TokenWindows(np.asarray(stream[first:]), manifest.context_size, bos)[0:n_windows]
        replaced = sae_info.output_hooks() or [sae_info.hook]  # a transcoder replaces its target(s)
        mean = torch.tensor([self.store.hook_mean(manifest.dataset_id, hook) for hook in replaced], dtype=torch.float32)
        reason = not_causal_reason(model)
        done = evaluate(model, (sae_info.input_hooks(), replaced), self.saes.weights(sae_info.sae_id), windows, mean,
                        job.request.batch_size, causal=reason is None,
                        progress=lambda n: self._set(self._jobs[job.evaluation_id], tokens_done=n))
        result = EvaluationResult(n_tokens=done.n_tokens, corpus_id=corpus_id, first_token=first, l0=done.l0,
                                  explained_variance=done.explained_variance, l2_ratio=done.l2_ratio,
                                  downstream=done.downstream, downstream_unavailable=reason, layers=done.layers)
        bad = _non_finite(result.model_dump())
        if bad:  # JSON has no NaN: stored, it would read back as null where a number must be
            raise ValueError(f"the figures {', '.join(bad)} are not finite (the SAE's reconstruction overflows "
                             "or is NaN on this text)")
        return result

    def _set(self, job: EvaluationJob, **changes) -> EvaluationJob:
        with_time = job.model_copy(update={**changes, "updated_at": _now()})
        # Saved first: a job that could not be saved (a full disk) is not kept, nor reported, as queued.
        atomic_write(self.folder / f"{job.evaluation_id}.json", with_time.model_dump_json(indent=1).encode())
        self._jobs[job.evaluation_id] = with_time
        return with_time
