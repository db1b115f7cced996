"""The feature browser's HTML pages (not part of the JSON API's schema)."""

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from cache_server.browser import feature_page
from cache_server.routes.deps import services
from cache_server.services import Services

router = APIRouter(prefix="/saes", include_in_schema=False)


@router.get("/{sae_id}/features/{index}", response_class=HTMLResponse)
def feature(sae_id: str, index: int, svc: Services = Depends(services)) -> HTMLResponse:
    """One feature's page, from the same figures as GET /v1/saes/<id>/features/<index>."""
    detail = svc.features.detail(sae_id, index)
    return HTMLResponse(feature_page.render(detail, svc.saes.info(sae_id).d_sae))
