"""One worker thread over a queue of persisted jobs: the lifecycle the evaluation and feature
managers share (harvests have their own, with cancellation and Ray)."""

import logging
import queue
import threading
from pathlib import Path

from pydantic import BaseModel

from cache_server.quarantine import Quarantine
from shared.schemas import ACTIVE_STATUSES

log = logging.getLogger("cache_server.harvest.jobs")


class JobQueue:
    """Subclasses name the job model, its id field and the files' pattern, and give ``_work``
    (take ids from ``_queue`` until None) and ``_set`` (change a job and save it)."""

    job_model: type[BaseModel]
    id_field: str
    pattern = "*.json"
    worker_name = "worker"
    kind = "job"
    """What a file holds, as quarantine and /health name it."""

    def __init__(self, folder: Path, quarantine: Quarantine):
        self.folder, self.quarantine = folder, quarantine
        folder.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, BaseModel] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def start(self) -> None:
        """Load the saved jobs (a file that cannot be read is quarantined); ones queued or running
        when the server stopped are queued again."""
        for path in sorted(self.folder.glob(self.pattern)):
            job = self.quarantine.load(path, self.kind, self.job_model.model_validate_json)
            if job is None:
                continue
            job_id = getattr(job, self.id_field)
            self._jobs[job_id] = job
            if job.status in ACTIVE_STATUSES:
                try:
                    self._set(job, status="queued")
                except OSError:  # a full disk must not stop the start: the job is queued in memory
                    log.exception("could not save %s %s as queued", self.kind, job_id)
                    self._jobs[job_id] = job.model_copy(update={"status": "queued"})
                self._queue.put(job_id)
        self._worker = threading.Thread(target=self._work, name=self.worker_name, daemon=True)
        self._worker.start()

    def worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def stop(self) -> None:
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout=60)

    def _work(self) -> None:
        raise NotImplementedError

    def _set(self, job, **changes):
        raise NotImplementedError
