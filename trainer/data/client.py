"""``CacheClient``: the Python API of a cache server, used by the CLIs and by notebooks.

>>> client = CacheClient("http://127.0.0.1:8000", token=None)   # doctest: +SKIP
>>> job = client.harvest({"model": "all-MiniLM-L6-v2", "hooks": ["blocks.3.hook_resid_post"],
...                       "n_tokens": 100_000})                    # doctest: +SKIP
>>> manifest = client.wait(job.job_id)                            # doctest: +SKIP
>>> rows = client.chunk(manifest, "blocks.3.hook_resid_post", 0)  # [rows, d] numpy  # doctest: +SKIP
"""

import http.client
import itertools
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import urllib3
from tqdm.auto import tqdm

from shared.codec import decode_chunk
from shared.schemas import (
    ArrayInfo, CorpusInfo, DatasetManifest, DatasetSummary, EvaluationJob, EvaluationRequest, FeatureJob, HarvestAccepted,
    HarvestJob, HarvestRequest, SaeInfo,
)

RETRY_STATUSES = frozenset({500, 502, 503, 504})


class CacheError(Exception):
    """The server refused a request (4xx) or could not be reached; the message says why."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class CacheClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, retries: int = 4,
                 backoff: float = 0.5, outage_seconds: float = 300.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, limits=limits)
        # Chunk bytes take urllib3: per request it costs the client a third of httpx's CPU, which
        # is what bounds a loader on loopback or a fast network (measured in bench/train.py (e)).
        self.bulk = urllib3.PoolManager(maxsize=32, headers=headers, retries=False,
                                        timeout=urllib3.Timeout(connect=timeout, read=timeout))
        self._local, self._headers, self.timeout = threading.local(), headers, timeout
        self._base_path = urllib.parse.urlsplit(self.url).path
        # A server never reached fails fast (``retries`` tries: a wrong URL); one that answered
        # before and went away is retried for ``outage_seconds`` (a restart, a network blip).
        self.retries, self.backoff, self.outage_seconds = retries, backoff, outage_seconds
        self._reached = False

    def close(self) -> None:
        self.http.close()
        self.bulk.clear()

    def __enter__(self) -> "CacheClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried with exponential backoff on connection errors and 5xx."""
        response = self._retried(lambda: self.http.request(method, path, **kwargs), httpx.TransportError,
                                 lambda r: r.status_code)
        if response.status_code >= 400:
            raise _error(method, path, response.status_code, response.content)
        return response

    def _retried(self, send: Callable, transport_error: type[Exception] | tuple, status: Callable[[Any], int]):
        start = time.monotonic()
        for attempt in itertools.count():
            left = self.outage_seconds - (time.monotonic() - start)
            last = left <= 0 if self._reached else attempt >= self.retries
            try:
                response = send()
            except transport_error as exc:
                if last:
                    waited = f" (retried for {time.monotonic() - start:.0f}s)" if self._reached else ""
                    raise CacheError(f"cannot reach cache server at {self.url}{waited}: {exc}") from None
            else:
                self._reached = True
                if status(response) not in RETRY_STATUSES or last:
                    return response
            pause = min(self.backoff * 2**attempt, 5.0)
            time.sleep(max(0.0, min(pause, left)) if self._reached else pause)
        raise AssertionError("unreachable")

    # -- corpora -----------------------------------------------------------------------------
    def corpora(self) -> list[CorpusInfo]:
        return [CorpusInfo.model_validate(c) for c in self.request("GET", "/v1/corpora").json()]

    def upload_corpus(self, path: Path, name: str | None = None, format: str | None = None) -> CorpusInfo:
        fmt = format or ("jsonl" if path.suffix == ".jsonl" else "text")
        with path.open("rb") as f:
            response = self.request("POST", "/v1/corpora", params={"name": name or path.stem, "format": fmt}, content=f)
        return CorpusInfo.model_validate(response.json())

    # -- harvests ----------------------------------------------------------------------------
    def harvest(self, request: HarvestRequest | dict) -> HarvestAccepted:
        body = request.model_dump(mode="json") if isinstance(request, HarvestRequest) else request
        return HarvestAccepted.model_validate(self.request("POST", "/v1/harvests", json=body).json())

    def job(self, job_id: str) -> HarvestJob:
        return HarvestJob.model_validate(self.request("GET", f"/v1/harvests/{job_id}").json())

    def jobs(self) -> list[HarvestJob]:
        return [HarvestJob.model_validate(j) for j in self.request("GET", "/v1/harvests").json()]

    def cancel(self, job_id: str) -> HarvestJob:
        return HarvestJob.model_validate(self.request("DELETE", f"/v1/harvests/{job_id}").json())

    def wait(self, accepted: HarvestAccepted, progress: bool = True, poll: float = 0.5) -> DatasetManifest:
        """Follow a harvest to its end with a progress bar (server-reported tokens/s and ETA)."""
        if accepted.job_id is None or accepted.status == "completed":
            return self.manifest(accepted.dataset_id)
        bar = None
        while True:
            job = self.job(accepted.job_id)
            if progress and bar is None:
                bar = tqdm(total=job.tokens_total, unit="tok", unit_scale=True, desc=f"harvest {job.dataset_id[:8]}")
            if bar is not None:
                bar.update(job.tokens_done - bar.n)
                bar.set_postfix_str(harvest_postfix(job))
            if job.status in ("completed", "failed", "cancelled"):
                break
            time.sleep(poll)
        if bar is not None:
            bar.close()
        if job.status != "completed":
            raise CacheError(f"harvest {job.job_id} {job.status}" + (f": {job.error}" if job.error else ""))
        return self.manifest(job.dataset_id)

    # -- SAEs and their evaluation -----------------------------------------------------------
    def register_sae(self, folder: Path, dataset_id: str, hook: str) -> SaeInfo:
        """Send an exported SAE (``cfg.json`` + ``sae_weights.safetensors``) home to the server,
        bound to the dataset and hook it was trained on."""
        body = sae_upload_body(folder)
        response = self.request("POST", "/v1/saes", params={"dataset_id": dataset_id, "hook": hook, "name": folder.name},
                                content=body)
        return SaeInfo.model_validate(response.json())

    def evaluate(self, request: EvaluationRequest | dict) -> EvaluationJob:
        body = request.model_dump(mode="json") if isinstance(request, EvaluationRequest) else request
        return EvaluationJob.model_validate(self.request("POST", "/v1/evaluations", json=body).json())

    def evaluation(self, evaluation_id: str) -> EvaluationJob:
        return EvaluationJob.model_validate(self.request("GET", f"/v1/evaluations/{evaluation_id}").json())

    def wait_evaluation(self, job: EvaluationJob, poll: float = 0.25) -> EvaluationJob:
        """Follow an evaluation to its end; CacheError when it failed."""
        while job.status in ("queued", "running"):
            time.sleep(poll)
            job = self.evaluation(job.evaluation_id)
        if job.status != "completed":
            raise CacheError(f"evaluation {job.evaluation_id} {job.status}" + (f": {job.error}" if job.error else ""))
        return job

    def compute_features(self, sae_id: str, chunk_ids: list[int]) -> FeatureJob:
        """Ask for an SAE's feature statistics (the browser's data) over these chunks."""
        params = {"chunks": ",".join(map(str, chunk_ids))}
        return FeatureJob.model_validate(self.request("POST", f"/v1/saes/{sae_id}/features", params=params).json())

    def wait_features(self, job: FeatureJob, poll: float = 0.25) -> FeatureJob:
        """Follow a feature statistics job to its end; CacheError when it failed."""
        while job.status in ("queued", "running"):
            time.sleep(poll)
            job = FeatureJob.model_validate(self.request("GET", f"/v1/saes/{job.sae_id}/features").json())
        if job.status != "completed":
            raise CacheError(f"feature statistics of SAE {job.sae_id} {job.status}" + (f": {job.error}" if job.error else ""))
        return job

    # -- datasets ----------------------------------------------------------------------------
    def datasets(self) -> list[DatasetSummary]:
        return [DatasetSummary.model_validate(d) for d in self.request("GET", "/v1/datasets").json()]

    def manifest(self, dataset_id: str) -> DatasetManifest:
        return DatasetManifest.model_validate(self.request("GET", f"/v1/datasets/{dataset_id}").json())

    def delete_dataset(self, dataset_id: str) -> None:
        self.request("DELETE", f"/v1/datasets/{dataset_id}")

    def vocabulary(self, dataset_id: str) -> list[str]:
        """The source model's token strings by id."""
        return self.request("GET", f"/v1/datasets/{dataset_id}/vocabulary").json()

    @staticmethod
    def _chunk_path(dataset_id: str, array: str, index: int) -> str:
        route = "tokens" if array == "tokens" else f"hooks/{array}"
        return f"/v1/datasets/{dataset_id}/{route}/chunks/{index}"

    def chunk_bytes(self, dataset_id: str, array: str, index: int) -> bytes:
        """A chunk's stored (encoded) bytes; ``array`` is a hook name or ``tokens``."""
        path = self._chunk_path(dataset_id, array, index)
        response = self._retried(lambda: self.bulk.request("GET", self.url + path), urllib3.exceptions.HTTPError,
                                 lambda r: r.status)
        if response.status >= 400:
            raise _error("GET", path, response.status, response.data)
        return response.data

    def chunk_into(self, dataset_id: str, array: str, index: int, out: np.ndarray) -> int:
        """A raw (codec ``none``), full chunk read from the socket straight into ``out`` (a
        contiguous array of exactly the chunk's size): no intermediate copy, and the GIL released
        while the bytes arrive. Returns its size.

        The standard library's ``http.client`` does this (``readinto`` is ``recv_into``; urllib3's
        and httpx's read into bytes of their own first), on one kept-alive connection per thread."""
        path = self._chunk_path(dataset_id, array, index)
        view = memoryview(out).cast("B")

        def send() -> tuple[int, bytes]:
            connection = self._connection()
            try:
                connection.request("GET", self._base_path + path, headers=self._headers)
                response = connection.getresponse()
                if response.status != 200:
                    return response.status, response.read()
                size = int(response.getheader("content-length", -1))
                if size != len(view):
                    response.read()
                    raise CacheError(f"GET {path}: {size} bytes where a raw chunk holds {len(view)}")
                done = 0
                while done < size:
                    got = response.readinto(view[done:])
                    if not got:
                        raise http.client.IncompleteRead(bytes(), size - done)
                    done += got
                return 200, b""
            except (OSError, http.client.HTTPException):
                self._local.connection = None  # a fresh connection for the retry
                connection.close()
                raise

        status, body = self._retried(send, (OSError, http.client.HTTPException), lambda r: r[0])
        if status >= 400:
            raise _error("GET", path, status, body)
        return len(view)

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            url = urllib.parse.urlsplit(self.url)
            kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
            connection = self._local.connection = kind(url.hostname, url.port, timeout=self.timeout)
        return connection

    def chunk(self, manifest: DatasetManifest, array: str, index: int) -> np.ndarray:
        """A decoded chunk, ``[rows, d]`` in the storage dtype (see ``shared.codec.to_torch``)."""
        info: ArrayInfo | None = manifest.tokens if array == "tokens" else manifest.hook(array)
        if info is None:
            raise CacheError(f"dataset {manifest.dataset_id} has no hook '{array}'", 404)
        data = self.chunk_bytes(manifest.dataset_id, array, index)
        return decode_chunk(data, info, manifest.chunk_rows, manifest.rows_in_chunk(index))


def harvest_postfix(job: HarvestJob) -> str:
    """What the harvest bar says beside its count: the server's rate and ETA once it has measured
    them (a job just queued or resumed has none yet: it says so, not "-"), and the job's status."""
    if job.tokens_per_second and job.eta_seconds is not None:
        return f"server {job.tokens_per_second:,.0f} tok/s, ETA {job.eta_seconds:.0f}s, {job.status}"
    return job.status if job.status != "running" else "running, measuring its rate"


def sae_upload_body(folder: Path) -> bytes:
    """An exported SAE as one safetensors body: its tensors (a CLT's: every layer's file's), and
    cfg.json's text as metadata."""
    from safetensors.numpy import load_file, save

    folder = Path(folder)
    files = [folder / "sae_weights.safetensors"]
    if not files[0].exists() and json.loads((folder / "cfg.json").read_text()).get("architecture") == "clt":
        files = sorted(folder.glob("W_*_*.safetensors"))
    tensors = {name: t for path in files for name, t in load_file(str(path)).items()}
    return save(tensors, metadata={"cfg": (folder / "cfg.json").read_text()})


def _error(method: str, path: str, status: int, body: bytes) -> CacheError:
    """The server's own reason (FastAPI's ``detail``) when it gave one."""
    try:
        detail = json.loads(body).get("detail", body.decode(errors="replace"))
    except (ValueError, AttributeError):
        detail = body.decode(errors="replace")
    return CacheError(f"{method} {path}: {status} {detail}", status)


class StoreReader:
    """Chunk bytes straight from where the dataset is stored, without the server in the path: its
    S3 bucket (``manifest.store_url``, with read credentials in the ``AWS_*`` environment
    variables) or the dataset's folder in a store on this machine. The same bytes the server would
    send; a drop-in for ``CacheClient.chunk_bytes`` in ``ChunkStream``."""

    def __init__(self, location: str | Path):
        from obstore.store import LocalStore, S3Store

        self.url = str(location)
        if self.url.startswith("s3://"):
            self.store = S3Store.from_url(self.url, client_options={"allow_http": True})
        else:
            self.store = LocalStore(Path(location))

    @classmethod
    def for_manifest(cls, manifest: DatasetManifest) -> "StoreReader":
        if not manifest.store_url:
            raise CacheError(f"dataset {manifest.dataset_id} is not in a bucket; read it through the server")
        return cls(manifest.store_url)

    def chunk_bytes(self, dataset_id: str, array: str, index: int) -> memoryview:
        import obstore

        try:
            return memoryview(obstore.get(self.store, f"{array}/c/{index}/0").bytes())
        except Exception as exc:  # obstore's own (Rust-side) errors, after its retries
            raise CacheError(f"cannot read chunk {index} of '{array}' from {self.url}: "
                             f"{str(exc).splitlines()[0]}") from None

    def chunk_into(self, dataset_id: str, array: str, index: int, out: np.ndarray) -> int:
        data = self.chunk_bytes(dataset_id, array, index)
        view = memoryview(out).cast("B")
        if len(data) != len(view):
            raise CacheError(f"chunk {index} of '{array}' in {self.url} holds {len(data)} bytes, not {len(view)}")
        view[:] = data
        return len(view)
