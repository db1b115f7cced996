"""Prometheus counters, in a registry per app (no global state)."""

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from shared.schemas import HarvestJob

STATUSES = ("queued", "running", "completed", "failed", "cancelled")


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.harvest_tokens = Counter("harvest_tokens", "Rows harvested and committed", registry=self.registry)
        self.chunks_served = Counter("chunks_served", "Chunks served", ["api"], registry=self.registry)
        self.bytes_served = Counter("chunk_bytes_served", "Chunk bytes served", ["api"], registry=self.registry)
        self.jobs = Gauge("harvest_jobs", "Harvest jobs by status", ["status"], registry=self.registry)

    def served(self, api: str, n_bytes: int) -> None:
        self.chunks_served.labels(api).inc()
        self.bytes_served.labels(api).inc(n_bytes)

    def set_job_counts(self, jobs: Iterable[HarvestJob]) -> None:
        counts = Tally(j.status for j in jobs)
        for status in STATUSES:
            self.jobs.labels(status).set(counts[status])

    def render(self) -> bytes:
        return generate_latest(self.registry)
