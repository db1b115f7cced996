"""One worker thread over a queue of persisted jobs: the lifecycle the evaluation and feature
managers share (harvests have their own, with cancellation and replicas)."""

import queue
import threading
from pathlib import Path

from pydantic import BaseModel

from shared.schemas import ACTIVE_STATUSES


class JobQueue:
    """Subclasses name the job model, its id field and the files' pattern, and give ``_work``
    (take ids from ``_queue`` until None) and ``_set`` (change a job and save it)."""

    job_model: type[BaseModel]
    id_field: str
    pattern = "*.json"
    worker_name = "worker"

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, BaseModel] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def start(self) -> None:
        """Load the saved jobs; ones queued or running when the server stopped are queued again."""
        for path in sorted(self.folder.glob(self.pattern)):
            job = self.job_model.model_validate_json(path.read_bytes())
            job_id = getattr(job, self.id_field)
            self._jobs[job_id] = job
            if job.status in ACTIVE_STATUSES:
                self._set(job, status="queued")
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
