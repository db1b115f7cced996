"""The service layer an app holds: store, corpora, models, harvest jobs, SAEs and their
evaluations, built from settings."""

from dataclasses import dataclass

from cache_server.errors import ServiceError
from cache_server.saes.evaluations import EvaluationManager
from cache_server.saes.features import FeatureJobs
from cache_server.harvest.jobs import JobManager
from cache_server.metrics import ServerMetrics
from cache_server.corpora.corpus_store import CorpusStore
from cache_server.parts import open_parts
from cache_server.quarantine import Quarantine
from cache_server.saes.registry import SaeStore
from cache_server.settings import Settings
from cache_server.store.dataset_store import DatasetStore, DatasetUnreadable
from cache_server.saes.text_probe import TextProbes
from shared.schemas import ACTIVE_STATUSES, SaeSummary


@dataclass
class Services:
    settings: Settings
    store: DatasetStore
    corpora: CorpusStore
    jobs: JobManager
    saes: SaeStore
    evaluations: EvaluationManager
    features: FeatureJobs
    probes: TextProbes
    metrics: ServerMetrics
    quarantine: Quarantine

    def start(self) -> None:
        """Check what is stored (what cannot be read is set aside and listed), then start the workers."""
        self.saes.check()
        self.store.list()
        self.jobs.start()
        self.evaluations.start()
        self.features.start()

    def stop(self) -> None:
        self.features.stop()
        self.evaluations.stop()
        self.jobs.stop()

    def delete_dataset(self, dataset_id: str) -> None:
        try:
            if self.store.manifest(dataset_id) is None:
                raise ServiceError(f"unknown dataset '{dataset_id}'", 404)
        except DatasetUnreadable:
            pass  # it can still be deleted
        if self.jobs.dataset_busy(dataset_id):
            raise ServiceError(f"dataset '{dataset_id}' is being harvested; cancel its job first", 409)
        dependents = [s.sae_id for s in self.saes.list() if s.dataset_id == dataset_id]
        if dependents:
            raise ServiceError(f"dataset '{dataset_id}' has {len(dependents)} registered SAE(s) whose statistics, "
                               f"pages and evaluations read its rows: DELETE /v1/saes/<id> for each of "
                               f"{', '.join(dependents[:20])}{' ...' if len(dependents) > 20 else ''} first", 409)
        self.store.delete(dataset_id)

    def delete_sae(self, sae_id: str) -> None:
        self.saes.info(sae_id)
        statistics = self.features.job(sae_id)
        busy = [what for what, running in (
            ("its feature statistics job", statistics is not None and statistics.status in ACTIVE_STATUSES),
            ("an evaluation", any(e.request.sae_id == sae_id and e.status in ACTIVE_STATUSES
                                  for e in self.evaluations.list()))) if running]
        if busy:
            raise ServiceError(f"SAE '{sae_id}' is in use by {' and '.join(busy)}; wait for it to end", 409)
        self.features.forget(sae_id)
        self.saes.delete(sae_id)

    def sae_summary(self, sae_id: str) -> SaeSummary:
        """The feature statistics' summary with the SAE's latest completed evaluation."""
        summary = self.features.summary(sae_id)
        done = [e for e in self.evaluations.list() if e.request.sae_id == sae_id and e.result is not None]
        latest = max(done, key=lambda e: e.updated_at, default=None)
        return summary.model_copy(update={"evaluation": latest.result if latest else None})


def ray_harvests(settings: Settings):
    """Ray's side of harvests when the settings name a cluster (ray is imported only then)."""
    if settings.ray_address is None:
        return None
    from cache_server.harvest.ray_harvest import RayHarvests

    return RayHarvests(settings)


def build_services(settings: Settings) -> Services:
    root = settings.local_root
    parts = open_parts(settings)
    metrics, quarantine, store, corpus_store, models = (ServerMetrics(), parts.quarantine, parts.store, parts.corpora,
                                                        parts.models)
    jobs = JobManager(root / "jobs", store, corpus_store, models, metrics, quarantine, settings.max_tokens,
                      settings.chunk_bytes, min_free_bytes=settings.min_free_bytes, corpus_check_bytes=settings.corpus_check_bytes,
                      ray=ray_harvests(settings))
    saes = SaeStore(root / "saes", settings.max_sae_bytes, quarantine)
    evaluations = EvaluationManager(root / "evaluations", saes, store, corpus_store, models, quarantine)
    features = FeatureJobs(root / "features", saes, store, models, quarantine)
    probes = TextProbes(saes, store, models, features)
    return Services(settings=settings, store=store, corpora=corpus_store, jobs=jobs, saes=saes,
                    evaluations=evaluations, features=features, probes=probes, metrics=metrics, quarantine=quarantine)
