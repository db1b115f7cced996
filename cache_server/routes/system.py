from fastapi import APIRouter, Depends
from fastapi.responses import Response

from cache_server.routes.deps import services
from cache_server.services import Services

router = APIRouter(tags=["system"])


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", response_class=Response)
def metrics(svc: Services = Depends(services)) -> Response:
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")
