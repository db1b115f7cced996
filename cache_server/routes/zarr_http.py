"""The store, read-only, as a Zarr v3 hierarchy over HTTP for stock zarr clients.

Only committed data is visible: array metadata is served with ``shape[0]`` set to the committed row
count, the group metadata inlines that (consolidated) metadata so members can be listed, and chunk
keys past the committed count answer 404. Keys are matched against a fixed grammar and the
manifest's own array names, never used as paths.
"""

import json
import re

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

from cache_server.routes.deps import services
from cache_server.services import Services
from shared.schemas import DatasetManifest

router = APIRouter(prefix="/zarr", tags=["zarr"])
_CHUNK = re.compile(r"c/(0|[1-9][0-9]{0,17})/0")  # ASCII digits, canonical form (no 00, +0, ٠)


@router.api_route("/{dataset_id}/{key:path}", methods=["GET", "HEAD"], response_class=Response)
async def zarr_key(dataset_id: str, key: str, svc: Services = Depends(services)) -> Response:
    manifest = svc.store.manifest(dataset_id)
    if manifest is None:
        raise HTTPException(404, f"unknown dataset '{dataset_id}'")
    if key == "zarr.json":
        return _json(await _group_metadata(svc, manifest))
    arrays = {a.name for a in [*manifest.hooks, manifest.tokens]}
    array, sep, rest = key.partition("/")
    if array not in arrays or not sep:
        raise HTTPException(404, f"no key '{key}' in dataset '{dataset_id}'")
    if rest == "zarr.json":
        return _json(await _array_metadata(svc, manifest, array))
    match = _CHUNK.fullmatch(rest)
    if match is None or int(match.group(1)) >= manifest.n_chunks:
        raise HTTPException(404, f"no committed chunk '{key}' in dataset '{dataset_id}'")
    data = await svc.store.read_stored(f"{dataset_id}/{array}/c/{int(match.group(1))}/0")
    if data is None:
        raise HTTPException(404, f"no chunk '{key}'")
    svc.metrics.served("zarr", len(data))
    return Response(data, media_type="application/octet-stream")


async def _array_metadata(svc: Services, manifest: DatasetManifest, array: str) -> dict:
    raw = await svc.store.read_key(f"{manifest.dataset_id}/{array}/zarr.json")
    if raw is None:  # files deleted under the server: say so, not a 500
        raise HTTPException(409, f"dataset '{manifest.dataset_id}' has lost the metadata of array '{array}'; "
                                 "delete it and harvest it again")
    meta = json.loads(raw)
    meta["shape"][0] = manifest.n_items
    return meta


async def _group_metadata(svc: Services, manifest: DatasetManifest) -> dict:
    meta = json.loads(await svc.store.read_key(f"{manifest.dataset_id}/zarr.json"))
    meta["attributes"]["manifest"] = manifest.model_dump(mode="json")
    meta["attributes"].pop("harvest_state", None)
    members = {a.name: await _array_metadata(svc, manifest, a.name) for a in [*manifest.hooks, manifest.tokens]}
    meta["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": members}
    return meta


def _json(obj: dict) -> Response:
    return Response(json.dumps(obj), media_type="application/json")
