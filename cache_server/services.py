"""The service layer an app holds: store, corpora, models, harvest jobs, SAEs and their
evaluations, built from settings."""

from dataclasses import dataclass

from cache_server.corpora import CorpusStore
from cache_server.evaluations import EvaluationManager
from cache_server.features import FeatureJobs
from cache_server.jobs import JobManager
from cache_server.metrics import ServerMetrics
from cache_server.models import ModelRegistry, pick_device
from cache_server.saes import SaeStore
from cache_server.settings import Settings
from cache_server.store import DatasetStore
from shared.schemas import SaeSummary


@dataclass
class Services:
    settings: Settings
    store: DatasetStore
    corpora: CorpusStore
    jobs: JobManager
    saes: SaeStore
    evaluations: EvaluationManager
    features: FeatureJobs
    metrics: ServerMetrics

    def sae_summary(self, sae_id: str) -> SaeSummary:
        """The feature statistics' summary with the SAE's latest completed evaluation."""
        summary = self.features.summary(sae_id)
        done = [e for e in self.evaluations.list() if e.request.sae_id == sae_id and e.result is not None]
        latest = max(done, key=lambda e: e.updated_at, default=None)
        return summary.model_copy(update={"evaluation": latest.result if latest else None})


def build_services(settings: Settings) -> Services:
    root = settings.local_root
    root.mkdir(parents=True, exist_ok=True)
    metrics = ServerMetrics()
    store = DatasetStore(settings.store if settings.store_is_bucket else root / "datasets",
                         shared=settings.replica is not None)
    corpus_store = CorpusStore(root / "corpora", settings.max_corpus_bytes, settings.corpora_dir, settings.allow_hub)
    models = ModelRegistry(settings.models_dir, pick_device(settings.device), settings.allow_hub)
    # Replicas sharing a store folder keep their own job files (a job is one server's part).
    jobs_folder = root / "jobs" / settings.replica if settings.replica else root / "jobs"
    jobs = JobManager(jobs_folder, store, corpus_store, models, metrics, settings.max_tokens, settings.chunk_bytes,
                      replica=settings.replica, lease_seconds=settings.lease_seconds,
                      min_free_bytes=settings.min_free_bytes, corpus_check_bytes=settings.corpus_check_bytes)
    saes = SaeStore(root / "saes", settings.max_sae_bytes)
    evaluations = EvaluationManager(root / "evaluations", saes, store, corpus_store, models)
    features = FeatureJobs(root / "features", saes, store, models)
    return Services(settings=settings, store=store, corpora=corpus_store, jobs=jobs, saes=saes,
                    evaluations=evaluations, features=features, metrics=metrics)
