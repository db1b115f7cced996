from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from cache_server.routes.deps import services
from cache_server.services import Services
from shared.schemas import Health

router = APIRouter(tags=["system"])


@router.get("/health", responses={503: {"description": "A worker thread has stopped: restart the server."}})
def health(svc: Services = Depends(services)) -> Health:
    """ok while the harvest, evaluation and feature workers run (a load balancer's check), with the
    stored files the server could not read and left out (moved to quarantine/ in the store's folder)."""
    stopped = [name for name, alive in (("harvest", svc.jobs.worker_alive()),
                                        ("evaluation", svc.evaluations.worker_alive()),
                                        ("feature", svc.features.worker_alive())) if not alive]
    if stopped:
        return JSONResponse({"status": "unhealthy", "detail": f"the {' and '.join(stopped)} worker stopped; "
                             "restart the server (queued jobs resume)"}, status_code=503)
    return Health(status="ok", skipped=svc.quarantine.skipped())


@router.get("/metrics", response_class=Response)
def metrics(svc: Services = Depends(services)) -> Response:
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")
