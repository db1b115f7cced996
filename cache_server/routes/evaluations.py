from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from cache_server.routes.deps import MUTATING, require_token, services
from cache_server.services import Services
from shared.schemas import EvaluationJob, EvaluationRequest

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"])


@router.post("", status_code=202, dependencies=[Depends(require_token)],
             responses={**MUTATING, 200: {"model": EvaluationJob, "description": "Cache hit: already evaluated."}})
def submit_evaluation(request: EvaluationRequest, svc: Services = Depends(services)) -> EvaluationJob:
    """Splice a registered SAE into its dataset's model and measure CE loss and KL against the
    clean and ablated runs, on held-out text; poll GET /v1/evaluations/{id} for the figures."""
    job = svc.evaluations.submit(request)
    if job.status == "completed":
        return JSONResponse(job.model_dump(mode="json"), status_code=200)
    return job


@router.get("")
def list_evaluations(svc: Services = Depends(services)) -> list[EvaluationJob]:
    return svc.evaluations.list()


@router.get("/{evaluation_id}")
def get_evaluation(evaluation_id: str, svc: Services = Depends(services)) -> EvaluationJob:
    return svc.evaluations.get(evaluation_id)
