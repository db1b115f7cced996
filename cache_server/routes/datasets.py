from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import Response

from cache_server.routes.deps import MUTATING, require_token, services
from cache_server.services import Services
from cache_server.store.dataset_store import chunk_key
from shared.schemas import ArrayInfo, DatasetManifest, DatasetSummary

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

# ASCII digits in canonical form: 00, +0, -0 and other scripts' digits are not aliases of chunk 0.
ChunkIndex = Annotated[str, Path(pattern=r"^(0|[1-9][0-9]{0,17})$", description="Chunk number, from 0.")]


def _manifest(svc: Services, dataset_id: str) -> DatasetManifest:
    manifest = svc.store.manifest(dataset_id)
    if manifest is None:
        raise HTTPException(404, f"unknown dataset '{dataset_id}'")
    return manifest


@router.get("")
def list_datasets(svc: Services = Depends(services)) -> list[DatasetSummary]:
    return svc.store.list()


@router.get("/{dataset_id}")
def get_dataset(dataset_id: str, svc: Services = Depends(services)) -> DatasetManifest:
    """The manifest; a complete dataset is checked for its files (stats, no reads)."""
    return svc.store.checked(_manifest(svc, dataset_id))


@router.delete("/{dataset_id}", status_code=204, dependencies=[Depends(require_token)], responses=MUTATING)
def delete_dataset(dataset_id: str, svc: Services = Depends(services)) -> Response:
    """Remove a dataset (also one whose manifest cannot be read). Refused (409) while it is being
    harvested or while SAEs registered on it remain: their pages and evaluations read its rows."""
    svc.delete_dataset(dataset_id)
    return Response(status_code=204)


@router.get("/{dataset_id}/hooks/{hook}/mean")
def get_hook_mean(dataset_id: str, hook: str, svc: Services = Depends(services)) -> list[float]:
    """The hook's mean row (d floats) over the committed rows."""
    manifest = _manifest(svc, dataset_id)
    if manifest.hook(hook) is None:
        raise HTTPException(404, f"unknown hook '{hook}' in dataset '{dataset_id}'; it holds: "
                                 f"{', '.join(h.name for h in manifest.hooks)}")
    return svc.store.hook_mean(dataset_id, hook)


@router.get("/{dataset_id}/vocabulary")
def get_vocabulary(dataset_id: str, svc: Services = Depends(services)) -> list[str]:
    """The source model's tokens by id, to render the stored token ids as text."""
    _manifest(svc, dataset_id)
    return svc.features.vocabulary(dataset_id)


_CHUNK_RESPONSE = {200: {"content": {"application/octet-stream": {}},
                         "description": "The chunk's stored bytes (raw, or zstd for tokens: X-Chunk-Codec), "
                                        "decoded by shared.codec.decode_chunk."}}


@router.get("/{dataset_id}/hooks/{hook}/chunks/{index}", response_class=Response, responses=_CHUNK_RESPONSE)
async def get_hook_chunk(dataset_id: str, hook: str, index: ChunkIndex, request: Request,
                         svc: Services = Depends(services)) -> Response:
    manifest = _manifest(svc, dataset_id)
    array = manifest.hook(hook)
    if array is None:
        valid = ", ".join(h.name for h in manifest.hooks)
        raise HTTPException(404, f"unknown hook '{hook}' in dataset '{dataset_id}'; it holds: {valid}")
    return await _chunk(svc, manifest, array, int(index), request)


@router.get("/{dataset_id}/tokens/chunks/{index}", response_class=Response, responses=_CHUNK_RESPONSE)
async def get_tokens_chunk(dataset_id: str, index: ChunkIndex, request: Request,
                           svc: Services = Depends(services)) -> Response:
    """int32 rows of (token id, sequence, position), aligned with the hooks' rows."""
    manifest = _manifest(svc, dataset_id)
    return await _chunk(svc, manifest, manifest.tokens, int(index), request)


async def _chunk(svc: Services, manifest: DatasetManifest, array: ArrayInfo, index: int, request: Request) -> Response:
    if not 0 <= index < manifest.n_chunks:
        raise HTTPException(404, f"chunk {index} out of range: dataset '{manifest.dataset_id}' has "
                                 f"{manifest.n_chunks} committed chunks of {manifest.n_chunks_total}")
    read = await svc.store.read_chunk(chunk_key(manifest.dataset_id, array.name, index))
    if read is None:
        raise HTTPException(404, f"chunk {index} of '{array.name}' is missing from the store")
    data, etag = read
    headers = {
        "ETag": etag,
        "X-Chunk-Codec": f"{array.codec.name};level={array.codec.level}",
        "X-Chunk-Shape": f"{manifest.chunk_rows},{array.d}",
        "X-Chunk-Rows": str(manifest.rows_in_chunk(index)),
        "X-Storage-Dtype": array.storage_dtype,
        "Cache-Control": "public, max-age=31536000, immutable",
    }
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    svc.metrics.served("v1", len(data))
    return Response(data, media_type="application/octet-stream", headers=headers)

