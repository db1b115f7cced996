from fastapi import APIRouter, Depends

from cache_server.models import ModelError
from cache_server.routes.deps import services
from cache_server.services import Services

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("/{name:path}/hooks")
def list_hooks(name: str, svc: Services = Depends(services)) -> list[str]:
    """Every hook name a harvest of this model may ask for (loads the model if it is not loaded).
    A name that is no model here is a resource not found (404); in a harvest request it is 422."""
    try:
        return sorted(svc.jobs.models.get(name).hook_names)
    except ModelError as exc:
        raise ModelError(str(exc), 404) from None
