from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response

from cache_server.routes.deps import MUTATING, require_token, services
from cache_server.services import Services
from shared.schemas import SaeInfo

router = APIRouter(prefix="/v1/saes", tags=["saes"])


@router.post("", status_code=201, dependencies=[Depends(require_token)], responses=MUTATING,
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}})
async def register_sae(
    request: Request,
    dataset_id: str = Query(pattern=r"^[0-9a-f]{24}$", description="The dataset the SAE was trained on."),
    hook: str = Query(pattern=r"^[A-Za-z0-9_.]{1,200}$", description="The hook it reconstructs."),
    svc: Services = Depends(services),
) -> SaeInfo:
    """Register an SAE: the body is a safetensors file (W_enc, b_enc, W_dec, b_dec[, threshold])
    whose metadata entry ``cfg`` is the SAELens cfg.json text. The same file again is one SAE."""
    manifest = svc.store.manifest(dataset_id)
    if manifest is None:
        raise HTTPException(404, f"unknown dataset '{dataset_id}'")
    return await svc.saes.upload(request.stream(), manifest, hook)


@router.get("")
def list_saes(svc: Services = Depends(services)) -> list[SaeInfo]:
    return svc.saes.list()


@router.get("/{sae_id}")
def get_sae(sae_id: str, svc: Services = Depends(services)) -> SaeInfo:
    return svc.saes.info(sae_id)


@router.delete("/{sae_id}", status_code=204, dependencies=[Depends(require_token)], responses=MUTATING)
def delete_sae(sae_id: str, svc: Services = Depends(services)) -> Response:
    svc.saes.delete(sae_id)
    return Response(status_code=204)
