"""The dataset store: one Zarr v3 group per dataset, rows aligned across arrays.

Layout of group ``<dataset_id>``:
- one array per hook, ``[n_items, d]`` (bfloat16 kept as uint16 bits), chunked along rows only;
- ``tokens``, int32 ``[n_items, 3]``: token id, sequence index, position;
- attributes ``manifest`` (a :class:`DatasetManifest`) and ``harvest_state`` (exact running sums
  of the statistics, so a resumed harvest ends with the same numbers as an uninterrupted one).

A chunk becomes visible only when the manifest's committed count moves past it, and the manifest
is written after the chunk's bytes (zarr's LocalStore writes through a temp file + rename; an
object store's PUT is atomic), so a reader never sees a half-written chunk or a row past the
committed count.

The store is a local folder or an S3-compatible bucket (``s3://bucket/prefix``), both through
zarr's own store layer (LocalStore, or ObjectStore over obstore); everything else is the same.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import xxhash
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from cache_server.store.chunk_reads import read_local_chunk
from cache_server.errors import ServiceError
from cache_server.quarantine import Quarantine, reason_of
from shared.codec import zarr_compressors
from shared.ids import is_valid_id
from shared.schemas import ArrayInfo, DatasetManifest, DatasetSummary

TOKENS_ARRAY = "tokens"
BUCKET_RECHECK_SECONDS = 1.0
"""A bucket's cached manifests are re-read after this long: another server on the bucket may have
written or deleted the dataset."""


def chunk_key(dataset_id: str, array: str, index: int) -> str:
    return f"{dataset_id}/{array}/c/{index}/0"


class StoreError(Exception):
    """The store cannot be opened or reached; the message says why."""


def open_zarr_store(location: str | Path, check: bool = False):
    """A zarr store for a folder or an ``s3://bucket/prefix`` URL (endpoint, region and credentials
    from the ``AWS_*`` environment variables, as every S3 tool reads them)."""
    if not str(location).startswith("s3://"):
        Path(location).mkdir(parents=True, exist_ok=True)
        return LocalStore(Path(location))
    from obstore.store import S3Store
    from zarr.storage import ObjectStore

    try:
        bucket = S3Store.from_url(str(location), client_options={"allow_http": True})
        if check:
            bucket.list_with_delimiter()
    except Exception as exc:  # obstore raises its own (Rust-side) error types
        raise StoreError(f"cannot use store {location}: {str(exc).splitlines()[0]}") from None
    return ObjectStore(bucket)


class DatasetUnreadable(ServiceError):
    """A dataset is stored but its manifest cannot be read (409): left in place, listed in /health."""


class DatasetStore:
    def __init__(self, location: str | Path, quarantine: Quarantine | None = None):
        self.location = str(location)
        self.quarantine = quarantine or Quarantine(Path(location).parent if not self.location.startswith("s3://")
                                                   else Path("."))
        self.root = None if self.location.startswith("s3://") else Path(location)
        """The local folder, or None for a bucket."""
        self.zarr_store = open_zarr_store(location)
        self._manifests: dict[str, tuple[DatasetManifest, object]] = {}
        self._lock = threading.Lock()

    def _stamp(self, dataset_id: str) -> object:
        """What says a cached manifest is still the stored one: the metadata file's (mtime, size)
        on disk (one stat; a delete or a write by another server shows), the time read from a bucket."""
        if self.root is None:
            return time.monotonic()
        try:
            stat = (self.root / dataset_id / "zarr.json").stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _cached(self, dataset_id: str) -> DatasetManifest | None:
        entry = self._manifests.get(dataset_id)
        if entry is None:
            return None
        manifest, stamp = entry
        if self.root is None:
            return manifest if time.monotonic() - stamp < BUCKET_RECHECK_SECONDS else None
        return manifest if self._stamp(dataset_id) == stamp else None

    def _remember(self, manifest: DatasetManifest) -> None:
        self._manifests[manifest.dataset_id] = (manifest, self._stamp(manifest.dataset_id))

    def bucket_url(self, dataset_id: str) -> str | None:
        """Where a dataset lives when the store is a bucket (told to trainers in its manifest)."""
        return None if self.root is not None else f"{self.location.rstrip('/')}/{dataset_id}"

    def get_bytes(self, key: str) -> bytes | None:
        buffer = sync(self.zarr_store.get(key, prototype=default_buffer_prototype()))
        return None if buffer is None else buffer.to_bytes()

    # -- reading -----------------------------------------------------------------------------
    def manifest(self, dataset_id: str, fresh: bool = False) -> DatasetManifest | None:
        """The dataset's manifest, or None for an id that is not one of ours. ``fresh`` reads the
        store past this process's cache (another server may have written it)."""
        if not is_valid_id(dataset_id):
            return None
        cached = None if fresh else self._cached(dataset_id)
        if cached is not None:
            return cached
        stamp = self._stamp(dataset_id)  # before the read: a write in between shows next time
        meta = self.get_bytes(f"{dataset_id}/zarr.json")
        if meta is None:
            self._manifests.pop(dataset_id, None)
            return None
        try:
            attrs = json.loads(meta).get("attributes", {})
            if "manifest" not in attrs:
                return None
            manifest = DatasetManifest.model_validate(attrs["manifest"])
            if manifest.dataset_id != dataset_id:
                raise ValueError(f"it names dataset {manifest.dataset_id!r}")
        except Exception as exc:  # garbled by hand or by a disk: one dataset, not the server
            reason = reason_of(exc)
            self.quarantine.note(f"datasets/{dataset_id}/zarr.json", "dataset", reason)
            raise DatasetUnreadable(f"dataset '{dataset_id}' is stored but its manifest cannot be read ({reason}): "
                                    f"repair its zarr.json, or DELETE /v1/datasets/{dataset_id} and harvest again",
                                    409) from None
        self._manifests[dataset_id] = (manifest, stamp)
        return manifest

    def missing(self, manifest: DatasetManifest) -> list[str]:
        """Keys of a local dataset's committed data that are not on disk (array metadata, chunks):
        a dataset someone deleted files of, or two servers fought over. A bucket is not checked."""
        if self.root is None:
            return []
        folder = self.root / manifest.dataset_id
        keys = []
        for array in [*manifest.hooks, manifest.tokens]:
            keys.append(f"{array.name}/zarr.json")
            keys += [f"{array.name}/c/{i}/0" for i in range(manifest.n_chunks)]
        return [key for key in keys if not (folder / key).exists()]

    def hook_mean(self, dataset_id: str, hook: str) -> list[float] | None:
        """The mean row of a hook over the committed rows, from the exact running sums."""
        meta = self.get_bytes(f"{dataset_id}/zarr.json") if is_valid_id(dataset_id) else None
        state = json.loads(meta).get("attributes", {}).get("harvest_state", {}).get(hook) if meta else None
        if state is None:
            return None
        return (np.asarray(state["sum"], dtype=np.float64) / max(state["count"], 1)).tolist()

    def list(self) -> list[DatasetSummary]:
        async def names() -> list[str]:
            return [name async for name in self.zarr_store.list_dir("")]

        out = []
        for name in sorted(sync(names())):
            try:
                manifest = self.manifest(name)
            except DatasetUnreadable:  # listed in /health instead
                continue
            if manifest is not None:
                out.append(DatasetSummary(
                    dataset_id=manifest.dataset_id, model=manifest.model.name,
                    hooks=[h.name for h in manifest.hooks], d={h.name: h.d for h in manifest.hooks},
                    n_items=manifest.n_items,
                    n_items_total=manifest.n_items_total, complete=manifest.complete))
        return out

    def put_bytes(self, key: str, data: bytes) -> None:
        """A whole small object (a temp file + rename on disk, one PUT in a bucket)."""
        sync(self.zarr_store.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    async def read_key(self, key: str) -> bytes | None:
        """Stored bytes of one key, as they are (no decode). Keys are built by our own code."""
        data = await self.read_stored(key)
        return None if data is None else bytes(data)

    async def read_stored(self, key: str) -> memoryview | None:
        """The same, without copying them out of the buffer they were read into: a chunk is
        megabytes, and the server spent ~10% more CPU a row with a copy (bench/train.py (e))."""
        if self.root is not None:
            read = await read_local_chunk(self.root / key)
            return None if read is None else read[0]
        buffer = await self.zarr_store.get(key, prototype=default_buffer_prototype())
        return None if buffer is None else memoryview(buffer.as_numpy_array()).cast("B")

    async def read_chunk(self, key: str) -> tuple[memoryview, str] | None:
        """A chunk's stored bytes and an ETag for them, for serving: from a local folder, the
        file's identity (``chunk_reads``); from a bucket, a content hash."""
        if self.root is not None:
            return await read_local_chunk(self.root / key)
        data = await self.read_stored(key)
        return None if data is None else (data, f'"{xxhash.xxh3_64_hexdigest(data)}"')

    # -- writing -----------------------------------------------------------------------------
    def create(self, manifest: DatasetManifest, harvest_state: dict) -> None:
        group = zarr.create_group(store=self.zarr_store, path=manifest.dataset_id, overwrite=True)
        for array in [*manifest.hooks, manifest.tokens]:
            self._create_array(group, array, manifest)
        group.attrs.update({"harvest_state": harvest_state, "manifest": manifest.model_dump(mode="json")})
        self._remember(manifest)

    def _create_array(self, group: zarr.Group, array: ArrayInfo, manifest: DatasetManifest,
                      overwrite: bool = False) -> None:
        group.create_array(
            overwrite=overwrite,
            name=array.name,
            shape=(manifest.n_items_total, array.d),
            chunks=(manifest.chunk_rows, array.d),
            dtype=array.storage_dtype,
            compressors=zarr_compressors(array.codec),
            fill_value=0,
            attributes={"logical_dtype": array.logical_dtype},
            config={"write_empty_chunks": True},  # every committed chunk exists as a key
        )

    def checked(self, manifest: DatasetManifest) -> DatasetManifest:
        """The manifest as it stands: a complete dataset with files missing is not complete."""
        missing = self.missing(manifest) if manifest.complete else []
        return manifest.model_copy(update={"complete": False, "missing_files": missing[:100]}) if missing else manifest

    def restore_arrays(self, manifest: DatasetManifest, names: set[str]) -> None:
        """Create the arrays ``names`` anew (their metadata was lost; any chunks left are dropped)."""
        group = zarr.open_group(store=self.zarr_store, path=manifest.dataset_id, mode="r+")
        for array in [*manifest.hooks, manifest.tokens]:
            if array.name in names:
                self._create_array(group, array, manifest, overwrite=True)

    def writer(self, dataset_id: str) -> DatasetWriter:
        return DatasetWriter(self, dataset_id)

    def _published(self, manifest: DatasetManifest) -> None:
        self._remember(manifest)

    def remove_partial_writes(self, dataset_id: str) -> int:
        """Delete temp files a killed writer left behind (zarr writes ``<key>.<uuid>.partial``; an
        object store has none: a PUT lands whole or not at all)."""
        if self.root is None:
            return 0
        removed = 0
        for path in (self.root / dataset_id).rglob("*.partial"):
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:  # its writer renamed it meanwhile
                pass
        return removed

    def delete(self, dataset_id: str) -> bool:
        """Remove a dataset (one whose manifest cannot be read too); False for an unknown id."""
        try:
            if self.manifest(dataset_id) is None:
                return False
        except DatasetUnreadable:
            pass
        self._manifests.pop(dataset_id, None)
        sync(self.zarr_store.delete_dir(dataset_id))
        return True


class DatasetWriter:
    """One harvest's handle on its dataset: the group and arrays stay open between chunks."""

    def __init__(self, store: DatasetStore, dataset_id: str):
        self.store = store
        self.group = zarr.open_group(store=store.zarr_store, path=dataset_id, mode="r+")
        self.arrays = {name: array for name, array in self.group.arrays()}

    def harvest_state(self) -> dict:
        return dict(self.group.attrs.get("harvest_state", {}))

    def write_rows(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        for name, rows in arrays.items():
            self.arrays[name][start : start + len(rows)] = rows

    def commit(self, manifest: DatasetManifest, harvest_state: dict) -> None:
        """Publish progress: one atomic rewrite of the group metadata, after the chunk's bytes."""
        self.group.attrs.update({"harvest_state": harvest_state, "manifest": manifest.model_dump(mode="json")})
        self.store._published(manifest)
