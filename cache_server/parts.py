"""The stored parts opened from settings: by the server, and by each Ray harvest worker (on any
node), so that both read the same store, corpora and models."""

from dataclasses import dataclass

from cache_server.corpora.corpus_store import CorpusStore
from cache_server.models import ModelRegistry, pick_device
from cache_server.quarantine import Quarantine
from cache_server.settings import Settings
from cache_server.store.dataset_store import DatasetStore


@dataclass
class Parts:
    quarantine: Quarantine
    store: DatasetStore
    corpora: CorpusStore
    models: ModelRegistry


def open_parts(settings: Settings) -> Parts:
    root = settings.local_root
    root.mkdir(parents=True, exist_ok=True)
    quarantine = Quarantine(root)
    store = DatasetStore(settings.store if settings.store_is_bucket else root / "datasets", quarantine=quarantine)
    corpora = CorpusStore(root / "corpora", settings.max_corpus_bytes, settings.corpora_dir, settings.allow_hub,
                          quarantine)
    models = ModelRegistry(settings.models_dir, pick_device(settings.device), settings.allow_hub)
    return Parts(quarantine, store, corpora, models)
