from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response

from cache_server.routes.deps import MUTATING, require_token, services
from cache_server.services import Services
from shared.schemas import (ActivationsRequest, Attribution, AttributionRequest, FeatureDetail, FeatureJob, FeatureList,
                            RowFeatures, SaeInfo, SaeSummary, Steering, SteerRequest, TextActivations)

router = APIRouter(prefix="/v1/saes", tags=["saes"])


@router.post("", status_code=201, dependencies=[Depends(require_token)], responses=MUTATING,
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}})
async def register_sae(
    request: Request,
    dataset_id: str = Query(pattern=r"^[0-9a-f]{24}$", description="The dataset the SAE was trained on."),
    hook: str = Query(pattern=r"^[A-Za-z0-9_.]{1,200}$", description="The hook it reconstructs."),
    name: str | None = Query(None, pattern=r"^[A-Za-z0-9_.+=-]{1,200}$", description=(
        "What to call it in the browser (sae-train sends its folder's name); the first name given stays.")),
    svc: Services = Depends(services),
) -> SaeInfo:
    """Register an SAE: the body is a safetensors file (W_enc, b_enc, W_dec, b_dec[, threshold])
    whose metadata entry ``cfg`` is the SAELens cfg.json text. The same file again is one SAE."""
    manifest = svc.store.manifest(dataset_id)
    if manifest is None:
        raise HTTPException(404, f"unknown dataset '{dataset_id}'")
    return await svc.saes.upload(request.stream(), manifest, hook, name)


@router.get("")
def list_saes(svc: Services = Depends(services)) -> list[SaeInfo]:
    return svc.saes.list()


@router.get("/{sae_id}")
def get_sae(sae_id: str, svc: Services = Depends(services)) -> SaeInfo:
    return svc.saes.info(sae_id)


@router.delete("/{sae_id}", status_code=204, dependencies=[Depends(require_token)], responses=MUTATING)
def delete_sae(sae_id: str, svc: Services = Depends(services)) -> Response:
    """Remove an SAE and its feature statistics (409 while a job of its runs); its finished
    evaluations stay listed."""
    svc.delete_sae(sae_id)
    return Response(status_code=204)


@router.post("/{sae_id}/features", status_code=202, dependencies=[Depends(require_token)], responses=MUTATING)
def compute_features(
    sae_id: str,
    max_rows: int = Query(262_144, ge=1, le=100_000_000, description="Rows of the SAE's dataset to cover (its first ones)."),
    chunks: str | None = Query(None, pattern=r"^[0-9]{1,9}(,[0-9]{1,9})*$", description=(
        "Comma-separated chunk ids to cover instead (e.g. the trainer's held-out chunks, which it never trained on).")),
    svc: Services = Depends(services),
) -> FeatureJob:
    """Compute the SAE's feature statistics (the browser's data) as a job; once done, a cache hit."""
    return svc.features.submit(sae_id, max_rows, [int(c) for c in chunks.split(",")] if chunks else None)


@router.get("/{sae_id}/summary")
def summary(sae_id: str, svc: Services = Depends(services)) -> SaeSummary:
    """L0, FVU, dead and dense counts and the density histogram over the statistics' rows, with the
    SAE's latest completed evaluation (downstream loss) where one was asked for."""
    return svc.sae_summary(sae_id)


@router.get("/{sae_id}/feature-list")
def feature_list(
    sae_id: str,
    sort: Literal["index", "density", "max"] = "density",
    order: Literal["ascending", "descending"] = "descending",
    q: str = Query("", max_length=100, description="Only features whose top examples' tokens contain this."),
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
    svc: Services = Depends(services),
) -> FeatureList:
    return svc.features.feature_list(sae_id, sort, order == "descending", q, offset, limit)


@router.get("/{sae_id}/features")
def feature_job(sae_id: str, svc: Services = Depends(services)) -> FeatureJob:
    return svc.features.get(sae_id)


@router.get("/{sae_id}/features/{index}")
def feature(sae_id: str, index: int, svc: Services = Depends(services)) -> FeatureDetail:
    """One feature: density, activations, top and interval examples with their contexts, neighbours."""
    return svc.features.detail(sae_id, index)


# Custom text: reads (no token), but each runs the model: plain ``def`` routes run off the event loop.
@router.post("/{sae_id}/activations")
def activations(sae_id: str, request: ActivationsRequest, svc: Services = Depends(services)) -> TextActivations:
    """Text (tokenized as the SAE's dataset was) or token ids through the model to the SAE's hook:
    each token's strongest features, and one feature's activation on every token if asked."""
    return svc.probes.activations(sae_id, request)


@router.get("/{sae_id}/rows/{row}/features")
def row_features(sae_id: str, row: int, top: int = Query(50, ge=1, le=1000),
                 svc: Services = Depends(services)) -> RowFeatures:
    """The features active on one stored token (row) of the SAE's dataset, strongest first."""
    return svc.probes.row_features(sae_id, row, top)


@router.post("/{sae_id}/steer")
def steer(sae_id: str, request: SteerRequest, svc: Services = Depends(services)) -> Steering:
    """A continuation of the prompt with the feature pushed at the SAE's hook, beside the one without
    (same seed and sampling). Causal LMs only."""
    return svc.probes.steer(sae_id, request)


@router.post("/{sae_id}/attribution")
def attribution(sae_id: str, request: AttributionRequest, svc: Services = Depends(services)) -> Attribution:
    """Each active feature's activation times the gradient of the next-token loss at a position."""
    return svc.probes.attribution(sae_id, request)
