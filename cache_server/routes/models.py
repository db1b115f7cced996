from fastapi import APIRouter, Depends, HTTPException, Request

from cache_server.models import ModelError
from cache_server.routes.deps import authorized, services
from cache_server.services import Services
from shared.schemas import ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_models(svc: Services = Depends(services)) -> ModelList:
    """The models this server can run without a hub: built in, and folders in ``--models-dir``;
    and those loaded now (a hub model among them once a harvest loaded it). Loads nothing."""
    return svc.jobs.models.available()


@router.get("/{name:path}/hooks", responses={401: {"description": "The model is not loaded, and loading it "
                                                   "needs the bearer token (when the server has one)."}})
def list_hooks(name: str, request: Request, svc: Services = Depends(services)) -> list[str]:
    """Every hook name a harvest of this model may ask for. A model not yet loaded is loaded, which
    (like a harvest) needs the token when the server has one. A name that is no model here is a
    resource not found (404); in a harvest request it is 422."""
    models = svc.jobs.models
    if not models.is_loaded(name) and not authorized(request):
        raise HTTPException(401, f"model '{name}' is not loaded, and loading it needs the bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    try:
        return sorted(models.get(name).hook_names)
    except ModelError as exc:
        raise ModelError(str(exc), 404) from None
