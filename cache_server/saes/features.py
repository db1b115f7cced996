"""Feature statistics of registered SAEs, as jobs run one at a time (the browser's data).

A job reads the SAE's dataset rows (the first ``max_rows``) chunk by chunk, twice, through
``feature_statistics``, and stores the result beside the SAE (``<sae_id>.features.safetensors``);
a feature's page is then answered from it, plus a few rows of tokens read for its examples.
"""

import hashlib
import json
import logging
import math
import os
import random
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
import zarr
from safetensors import safe_open
from safetensors.torch import save_file

from cache_server.saes.downstream import not_causal_reason
from cache_server.errors import ServiceError
from cache_server.saes.feature_stats import FeatureStats, ReconstructionSums, feature_statistics, logit_lens
from cache_server.files import atomic_write
from cache_server.job_queue import JobQueue
from cache_server.quarantine import Quarantine, reason_of
from cache_server.models import ModelRegistry
from cache_server.saes.registry import SaeStore
from cache_server.store.dataset_store import TOKENS_ARRAY, DatasetStore
from shared.codec import to_torch
from shared.ids import is_valid_id
from shared.schemas import ACTIVE_STATUSES, DENSE_DENSITY, DatasetManifest, FeatureDetail, FeatureExample, FeatureJob, FeatureList, \
    FeatureRow, SaeSummary

log = logging.getLogger("cache_server.saes.features")
BEFORE, AFTER = 8, 4  # tokens of context shown around an example
WORD_SLACK = 6
"""Tokens read beyond that context on each side, so a word cut by its edge is shown whole."""
_FIELDS = ("fired", "sum_values", "max_values", "top_values", "top_rows", "histogram", "interval_rows", "interval_values")
LENS = 10  # tokens shown each way by the logit lens


class ModelFacts(NamedTuple):
    """What the pages need of a dataset's model, stored beside the feature jobs (``model_facts``)."""

    vocabulary: list[str]
    causal: bool


class FeatureError(ServiceError):
    pass


@dataclass
class BrowserData:
    """What a job stores for an SAE: the statistics plus what the summary, the search and the
    logit lens read."""

    stats: FeatureStats
    top_tokens: torch.Tensor
    """[top_k, d_sae] int64: the activating token id of each top example (-1 where none)."""
    squared_error: float
    total_variance: float
    promoted: torch.Tensor | None
    """[2, LENS, d_sae]: token ids and logits its decoder direction raises most (None: no lens)."""
    suppressed: torch.Tensor | None
    logit_lens_note: str | None


def _now() -> datetime:
    return datetime.now(timezone.utc)


class FeatureJobs(JobQueue):
    job_model, id_field, pattern, worker_name, kind = FeatureJob, "sae_id", "*.job.json", "feature-worker", "feature-job"

    def __init__(self, folder: Path, saes: SaeStore, store: DatasetStore, models: ModelRegistry, quarantine: Quarantine):
        super().__init__(folder, quarantine)
        self.saes, self.store, self.models = saes, store, models
        self._stats: dict[str, FeatureStats] = {}
        self._model_facts: dict[str, ModelFacts] = {}
        self._model_facts_lock = threading.Lock()

    def submit(self, sae_id: str, max_rows: int, chunk_ids: list[int] | None = None) -> FeatureJob:
        """The statistics over ``chunk_ids`` (e.g. a trainer's held-out chunks) or else the dataset's
        first ``max_rows`` rows. Once computed they are a cache hit, whatever rows are asked."""
        sae = self.saes.info(sae_id)
        manifest = self.store.manifest(sae.dataset_id)
        if manifest is None or not manifest.complete:
            raise FeatureError(f"the SAE's dataset {sae.dataset_id} is not a complete dataset here", 409)
        if chunk_ids is not None:
            bad = [i for i in chunk_ids if not 0 <= i < manifest.n_chunks_total]
            if bad or not chunk_ids:
                raise FeatureError(f"chunk ids {bad or '(none)'} are not chunks of dataset {sae.dataset_id} "
                                   f"(0..{manifest.n_chunks_total - 1})", 422)
            chunk_ids = sorted(set(chunk_ids))
        with self._lock:
            job = self._jobs.get(sae_id)
            if job is not None and (job.status in ACTIVE_STATUSES or (job.status == "completed" and self._current(sae_id))):
                return job
            now = _now()
            n_rows = (sum(manifest.rows_in_chunk(i) for i in chunk_ids) if chunk_ids is not None
                      else min(max_rows, manifest.n_items))
            job = self._set(FeatureJob(sae_id=sae_id, status="queued", n_rows=n_rows, chunk_ids=chunk_ids,
                                       created_at=now, updated_at=now))
        self._queue.put(sae_id)
        return job

    def job(self, sae_id: str) -> FeatureJob | None:
        return self._jobs.get(sae_id)

    def forget(self, sae_id: str) -> None:
        """Drop an SAE's statistics and their job (the SAE is being deleted)."""
        with self._lock:
            self._jobs.pop(sae_id, None)
            self._stats.pop(sae_id, None)
            for path in (self.folder / f"{sae_id}.job.json", self._stats_path(sae_id)):
                path.unlink(missing_ok=True)

    def get(self, sae_id: str) -> FeatureJob:
        job = self._jobs.get(sae_id) if is_valid_id(sae_id) else None
        if job is None:
            self.saes.info(sae_id)  # 404 for an unknown SAE, before "not computed"
            raise FeatureError(f"SAE '{sae_id}' has no feature statistics yet: POST /v1/saes/{sae_id}/features", 404)
        return job

    # -- reading ------------------------------------------------------------------------------
    def _completed(self, sae_id: str) -> BrowserData:
        job = self.get(sae_id)
        if job.status != "completed":
            raise FeatureError(f"the feature statistics of SAE '{sae_id}' are {job.status}"
                               + (f": {job.error}" if job.error else ""), 409)
        return self._load(sae_id)

    def model_facts(self, dataset_id: str) -> ModelFacts:
        """What pages need of the dataset's model (its token strings, whether it is a causal LM),
        kept on disk by its fingerprint the first time the model gives them: pages over finished
        statistics (``sae-browse`` of a run) then never load the model. A file that does not read
        back as those facts is rebuilt."""
        model = self._manifest(dataset_id).model
        path = self.folder / "models" / f"{hashlib.sha256(model.fingerprint.encode()).hexdigest()[:32]}.json"
        with self._model_facts_lock:  # one writer of the file: no reader sees half of it
            return self._model_facts.get(path.name) or self._read_or_build(path, model.name)

    def vocabulary(self, dataset_id: str) -> list[str]:
        return self.model_facts(dataset_id).vocabulary

    def causal(self, dataset_id: str) -> bool:
        """Whether the dataset's model is a causal LM (steering and attribution apply)."""
        return self.model_facts(dataset_id).causal

    def _read_or_build(self, path: Path, model_name: str) -> ModelFacts:
        try:
            stored = json.loads(path.read_bytes())
            facts = ModelFacts(stored["vocabulary"], stored["causal"])
            if not (isinstance(facts.vocabulary, list) and all(isinstance(t, str) for t in facts.vocabulary)
                    and isinstance(facts.causal, bool)):
                raise ValueError("not a vocabulary and a causal flag")
        except (OSError, ValueError, TypeError, KeyError):
            model = self.models.get(model_name, ask_hub=False)
            facts = ModelFacts(model.vocabulary(), not_causal_reason(model) is None)
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, json.dumps(facts._asdict()).encode())
        self._model_facts[path.name] = facts
        return facts

    def _manifest(self, dataset_id: str) -> DatasetManifest:
        """The SAE's dataset; 409 when it is gone from the store (removed by hand, not through the API)."""
        manifest = self.store.manifest(dataset_id)
        if manifest is None:
            raise FeatureError(f"the SAE's dataset {dataset_id} is no longer in the store", 409)
        return manifest

    def byte_level(self, dataset_id: str) -> bool:
        """Whether the dataset's vocabulary is byte-level BPE (GPT-2's Ġ space marks)."""
        return any(t.startswith("Ġ") for t in self.vocabulary(dataset_id))

    def summary(self, sae_id: str) -> SaeSummary:
        data, sae, job = self._completed(sae_id), self.saes.info(sae_id), self.get(sae_id)
        stats = data.stats
        density = stats.density
        live = density[density > 0].log10()
        edges = torch.linspace(math.log10(1 / max(stats.n_rows, 1)), 0, 31, dtype=torch.float64)
        counts = torch.histogram(live, bins=edges).hist if live.numel() else torch.zeros(30)
        return SaeSummary(sae=sae, n_rows=stats.n_rows, chunk_ids=job.chunk_ids,
                          l0=float(stats.fired.sum()) / max(stats.n_rows, 1),
                          fvu=data.squared_error / max(data.total_variance, 1e-30),
                          dead=int((stats.fired == 0).sum()), dense=int((density > DENSE_DENSITY).sum()),
                          density_edges=[round(float(e), 6) for e in edges], density_counts=[int(c) for c in counts])

    def feature_list(self, sae_id: str, sort: str, descending: bool, query: str, offset: int, limit: int) -> FeatureList:
        """Features sorted by ``sort`` (index, density, max); with a ``query``, only those whose top
        examples' activating tokens contain it (case-insensitive), the most matches first."""
        data, sae = self._completed(sae_id), self.saes.info(sae_id)
        stats, vocabulary = data.stats, self.vocabulary(sae.dataset_id)
        key = {"index": torch.arange(sae.d_sae, dtype=torch.float64), "density": stats.density,
               "max": stats.max_values.double()}[sort]
        order = key.argsort(descending=descending, stable=True)
        if query:
            needle = query.casefold()
            matching = torch.tensor([needle in token_text(t).casefold() for t in vocabulary] + [False])
            hits = matching[data.top_tokens].sum(0)  # -1 (no example) indexes the trailing False
            order = order[hits[order].argsort(descending=True, stable=True)]
            order = order[hits[order] > 0]
        rows = [self._row(data, vocabulary, int(i)) for i in order[offset : offset + limit]]
        return FeatureList(sae_id=sae_id, total=len(order), offset=offset, features=rows)

    def max_value(self, sae_id: str, index: int) -> float | None:
        """The feature's maximum over the statistics' rows; None while they are not computed."""
        job = self._jobs.get(sae_id)
        if job is None or job.status != "completed":
            return None
        return float(self._load(sae_id).stats.max_values[index])

    def random_feature(self, sae_id: str) -> int:
        """A feature picked at random among those that fire (any, if none does)."""
        fired = self._completed(sae_id).stats.fired
        alive = (fired > 0).nonzero().squeeze(1).tolist() or list(range(len(fired)))
        return random.choice(alive)

    @staticmethod
    def _row(data: BrowserData, vocabulary: list[str], index: int) -> FeatureRow:
        stats = data.stats
        ids, counts = data.top_tokens[:, index][data.top_tokens[:, index] >= 0].unique(return_counts=True)
        common = ids[counts.argsort(descending=True, stable=True)][:5]
        fired = int(stats.fired[index])
        return FeatureRow(index=index, density=float(stats.density[index]), max_value=float(stats.max_values[index]),
                          mean_value=float(stats.sum_values[index]) / max(fired, 1),
                          top_tokens=[_spell(vocabulary, int(t)) for t in common])

    def detail(self, sae_id: str, index: int) -> FeatureDetail:
        data, sae = self._completed(sae_id), self.saes.info(sae_id)
        stats = data.stats
        if not 0 <= index < sae.d_sae:
            raise FeatureError(f"feature {index} is out of range: SAE '{sae_id}' has {sae.d_sae} (0..{sae.d_sae - 1})", 404)
        weights = self.saes.weights(sae_id)
        manifest = self._manifest(sae.dataset_id)
        group = zarr.open_group(store=self.store.zarr_store, path=sae.dataset_id, mode="r")
        vocabulary = self.vocabulary(sae.dataset_id)

        byte_level = self.byte_level(sae.dataset_id)

        def example(row: int, value: float) -> FeatureExample:
            token, window, position = (int(v) for v in group[TOKENS_ARRAY][row])
            first = row - position  # the window's first row: context never crosses into another window
            lo, hi = max(first, row - BEFORE - WORD_SLACK), min(row + AFTER + 1 + WORD_SLACK, first + manifest.context_size,
                                                                manifest.n_items)
            around = group[TOKENS_ARRAY][lo:hi]
            same = torch.from_numpy(around[:, 1] == window)  # a window may be shorter (one document each)
            offset, count = int(same.int().argmax()), int(same.sum())
            spelled = [_spell(vocabulary, int(t)) for t in around[offset:offset + count, 0]]
            lo += offset
            start, end = whole_words(spelled, max(row - BEFORE, lo) - lo, min(row + AFTER + 1, lo + len(spelled)) - lo,
                                     byte_level)
            rows = _side_by_side(group, sae.input_hooks(), lo + start, lo + end, manifest.dtype)
            acts = weights.encode(rows)[:, index]
            return FeatureExample(row=row, value=value, tokens=spelled[start:end],
                                  values=[round(float(a), 6) for a in acts], position=row - lo - start)

        def lens(table: torch.Tensor | None) -> list[tuple[str, float]]:
            if table is None:
                return []
            return [(_spell(vocabulary, int(t)), round(float(v), 4)) for t, v in zip(table[0, :, index], table[1, :, index])]

        top = [example(int(r), float(v)) for r, v in zip(stats.top_rows[:, index], stats.top_values[:, index]) if r >= 0]
        intervals = [[example(int(r), float(v)) for r, v in zip(stats.interval_rows[q, :, index],
                                                                stats.interval_values[q, :, index]) if r >= 0]
                     for q in range(stats.interval_rows.shape[0])]
        cosine = weights.directions @ weights.directions[index]
        cosine[index] = -math.inf
        best = cosine.topk(min(10, sae.d_sae - 1))
        fired, peak = int(stats.fired[index]), float(stats.max_values[index])
        bins = stats.histogram.shape[1]
        return FeatureDetail(
            sae_id=sae_id, index=index, n_rows=stats.n_rows, density=fired / max(stats.n_rows, 1), max_value=peak,
            mean_value=float(stats.sum_values[index]) / max(fired, 1),
            histogram_edges=[peak * i / bins for i in range(bins + 1)],
            histogram_counts=[int(c) for c in stats.histogram[index]], top=top, intervals=intervals,
            neighbours=[(int(i), round(float(c), 6)) for i, c in zip(best.indices, best.values)],
            dead_neighbours=[int(i) for i in best.indices if stats.fired[i] == 0],
            promoted=lens(data.promoted), suppressed=lens(data.suppressed), logit_lens_note=data.logit_lens_note)

    def start(self) -> None:
        """Load the jobs; a completed one whose statistics file cannot be read fails (the file quarantined)."""
        super().start()
        for sae_id, job in list(self._jobs.items()):
            if job.status == "completed":
                self._current(sae_id)

    def _current(self, sae_id: str) -> bool:
        """Whether the stored statistics hold what this version reads (older ones lack the search's
        top tokens, the FVU sums and the logit lens; asking again recomputes them)."""
        try:
            with safe_open(self._stats_path(sae_id), "pt") as f:
                return "top_tokens" in f.keys()
        except Exception as exc:  # truncated, garbled or gone: not current, and the job says why
            self._unreadable(sae_id, exc)
            return False

    def _stats_path(self, sae_id: str) -> Path:
        return self.folder / f"{sae_id}.features.safetensors"

    def _unreadable(self, sae_id: str, exc: Exception) -> None:
        reason = reason_of(exc)
        self.quarantine.put(self._stats_path(sae_id), "feature-stats", reason)
        self._stats.pop(sae_id, None)
        changes = {"status": "failed", "error": f"its stored statistics could not be read ({reason}); "
                   f"POST /v1/saes/{sae_id}/features to compute them again"}
        try:
            self._set(self._jobs[sae_id], **changes)
        except OSError:  # a full disk: failed in memory (a start must not stop on it)
            self._jobs[sae_id] = self._jobs[sae_id].model_copy(update=changes)

    def _load(self, sae_id: str) -> BrowserData:
        if sae_id not in self._stats:
            try:
                self._stats[sae_id] = self._read(sae_id)
            except FeatureError:
                raise
            except Exception as exc:
                self._unreadable(sae_id, exc)
                raise FeatureError(f"the feature statistics of SAE '{sae_id}' could not be read ({reason_of(exc)}): "
                                   f"POST /v1/saes/{sae_id}/features to compute them again", 409) from None
        return self._stats[sae_id]

    def _read(self, sae_id: str) -> BrowserData:
        with safe_open(self._stats_path(sae_id), "pt") as f:
            if "top_tokens" not in f.keys():  # what _current checks, on the file already open
                raise FeatureError(f"the feature statistics of SAE '{sae_id}' predate this server's browser: "
                                   f"POST /v1/saes/{sae_id}/features to compute them again", 409)
            t, note = {k: f.get_tensor(k) for k in f.keys()}, f.metadata().get("logit_lens_note") or None
        stats = FeatureStats(n_rows=int(t["n_rows"]), **{k: t[k] for k in _FIELDS})
        d_sae = self.saes.info(sae_id).d_sae
        if t["fired"].shape != (d_sae,) or t["histogram"].shape[0] != d_sae or t["top_rows"].shape[-1] != d_sae:
            raise ValueError(f"it holds {t['fired'].shape[-1]} features' statistics; the SAE has {d_sae}")
        return BrowserData(stats, t["top_tokens"], float(t["squared_error"]), float(t["total_variance"]),
                           t.get("promoted"), t.get("suppressed"), note)

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
        group = zarr.open_group(store=self.store.zarr_store, path=sae.dataset_id, mode="r")
        spans = _spans(job, manifest)
        done, passes = [0], [0]
        covered, tokens = [], []
        inputs, outputs = sae.input_hooks(), sae.output_hooks()  # a transcoder's rows: inputs, then targets
        d_in = sae.d_in * len(inputs)
        sums = ReconstructionSums(weights.decoder, weights.b_dec.reshape(-1), d_in if outputs else None, weights.W_skip)

        def chunks():
            passes[0] += 1
            for lo, hi in spans:
                if passes[0] == 1:
                    covered.append(torch.arange(lo, hi))
                    tokens.append(torch.from_numpy(group[TOKENS_ARRAY][lo:hi, 0].astype("int64")))
                yield _side_by_side(group, inputs + outputs, lo, hi, manifest.dtype), torch.arange(lo, hi)
                done[0] += hi - lo
                self._set(self._jobs[job.sae_id], rows_done=done[0])

        with torch.inference_mode():
            stats = feature_statistics(lambda rows: weights.encode(rows[:, :d_in]), chunks, sae.d_sae, observe=sums.observe)
            rows, ids = torch.cat(covered), torch.cat(tokens)
            top = stats.top_rows
            place = torch.searchsorted(rows, top.clamp_min(0)).clamp(max=len(rows) - 1)
            top_tokens = torch.where(top >= 0, ids[place], -1)
            lens, note = self._logit_lens(weights, manifest)
        tensors = {k: getattr(stats, k).contiguous() for k in _FIELDS}
        tensors |= {"n_rows": torch.tensor(stats.n_rows), "top_tokens": top_tokens.contiguous(),
                    "squared_error": torch.tensor(sums.squared_error, dtype=torch.float64),
                    "total_variance": torch.tensor(sums.total_variance, dtype=torch.float64)}
        if lens is not None:
            tensors |= {"promoted": lens[0].contiguous(), "suppressed": lens[1].contiguous()}
        partial = self._stats_path(job.sae_id).with_suffix(".partial")  # replaced whole: a kill leaves no half file
        save_file(tensors, partial, metadata={"logit_lens_note": note or ""})
        os.replace(partial, self._stats_path(job.sae_id))
        self._stats.pop(job.sae_id, None)
        self.model_facts(manifest.dataset_id)  # the model is loaded now: its pages will not need it again

    def _logit_lens(self, weights, manifest: DatasetManifest):
        """The logit lens tables, or None and why there are none."""
        model = self.models.get(manifest.model.name)
        if not_causal_reason(model) is not None:
            return None, (f"none: '{manifest.model.name}' is not a causal LM; its unembedding (an untrained "
                          "head, if any) says nothing of a direction")
        W_U = model.bridge.W_U.detach().float().cpu()
        if W_U.shape[0] != weights.summed.shape[1]:
            return None, f"none: the hook's width {weights.summed.shape[1]} is not the residual stream's {W_U.shape[0]}"
        return logit_lens(weights.summed, W_U, LENS), None

    def _set(self, job: FeatureJob, **changes) -> FeatureJob:
        job = job.model_copy(update={**changes, "updated_at": _now()})
        # Saved first: a job that could not be saved (a full disk) is not kept, nor reported, as queued.
        atomic_write(self.folder / f"{job.sae_id}.job.json", job.model_dump_json(indent=1).encode())
        self._jobs[job.sae_id] = job
        return job


def _side_by_side(group, hooks: list[str], lo: int, hi: int, dtype: str) -> torch.Tensor:
    """Rows ``lo:hi`` of these hooks' arrays, side by side ``[n, sum of widths]``."""
    parts = [to_torch(group[hook][lo:hi], dtype).float() for hook in hooks]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _spans(job: FeatureJob, manifest: DatasetManifest) -> list[tuple[int, int]]:
    """The [lo, hi) row ranges the job covers, a chunk at a time, in row order."""
    if job.chunk_ids is not None:
        return [(i * manifest.chunk_rows, i * manifest.chunk_rows + manifest.rows_in_chunk(i)) for i in job.chunk_ids]
    return [(lo, min(lo + manifest.chunk_rows, job.n_rows)) for lo in range(0, job.n_rows, manifest.chunk_rows)]


def _spell(vocabulary: list[str], token: int) -> str:
    return vocabulary[token] if 0 <= token < len(vocabulary) else f"<{token}>"


def continues_word(previous: str, token: str, byte_level: bool) -> bool:
    """Whether ``token`` goes on the word ``previous`` ends. WordPiece marks it (``##``); byte-level
    BPE marks a space (Ġ) or newline (Ċ) instead, so there a token goes on a word when it starts with
    a letter or digit right after one."""
    if not byte_level:
        return token.startswith("##")
    return token_text(token)[:1].isalnum() and token_text(previous)[-1:].isalnum()


def whole_words(tokens: list[str], start: int, end: int, byte_level: bool) -> tuple[int, int]:
    """``[start, end)`` of ``tokens`` widened so that no word is cut at either edge (as far as
    ``tokens`` reaches: a caller reads ``WORD_SLACK`` more on each side)."""
    while start > 0 and continues_word(tokens[start - 1], tokens[start], byte_level):
        start -= 1
    while end < len(tokens) and continues_word(tokens[end - 1], tokens[end], byte_level):
        end += 1
    return start, end


def token_text(token: str) -> str:
    """A vocabulary string as the pages show it (``browser.layout.shown`` builds on it): GPT-2's
    space mark and WordPiece's ## undone, a newline as ⏎, so a search finds what a person reads."""
    return token.replace("Ġ", " ").replace("Ċ", "⏎").removeprefix("##")
