from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse

from cache_server.routes.deps import MUTATING, require_token, services
from cache_server.services import Services
from shared.schemas import HarvestAccepted, HarvestJob, HarvestRequest

router = APIRouter(prefix="/v1/harvests", tags=["harvests"])


@router.post("", status_code=202, dependencies=[Depends(require_token)],
             responses={**MUTATING, 200: {"model": HarvestAccepted, "description": "Cache hit: the dataset is complete."}})
def submit_harvest(request: HarvestRequest, svc: Services = Depends(services)) -> HarvestAccepted:
    """Start (or join) the harvest of a dataset; the same request twice is one harvest."""
    answer, _ = svc.jobs.submit(request)
    if answer.status == "completed":
        return JSONResponse(answer.model_dump(mode="json"), status_code=200)
    return answer


@router.get("")
def list_harvests(svc: Services = Depends(services)) -> list[HarvestJob]:
    return svc.jobs.list()


@router.get("/{job_id}")
def get_harvest(job_id: str, svc: Services = Depends(services)) -> HarvestJob:
    job = svc.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"unknown job '{job_id}'")
    return job


@router.delete("/{job_id}", dependencies=[Depends(require_token)], responses=MUTATING)
def cancel_harvest(job_id: str, svc: Services = Depends(services)) -> HarvestJob:
    """Cancel a queued or running harvest; committed chunks stay and a new request resumes them."""
    return svc.jobs.cancel(job_id)
