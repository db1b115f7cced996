"""The feature browser's HTML pages (not part of the JSON API's schema). Their errors are pages
too (see ``app.py``): a person reads them."""

from typing import Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse, RedirectResponse

from cache_server.browser import feature_page, sae_page
from cache_server.errors import ServiceError
from cache_server.routes.deps import services
from cache_server.services import Services

router = APIRouter(prefix="/saes", include_in_schema=False)
PAGE = 100  # features a list page shows


@router.get("/", response_class=HTMLResponse)
def index(sort: Literal[sae_page.INDEX_SORTS] = "name", svc: Services = Depends(services)) -> HTMLResponse:
    return HTMLResponse(sae_page.render_index([(s, _summary(svc, s.sae_id)) for s in svc.saes.list()], sort))


def _summary(svc: Services, sae_id: str):
    """The SAE's summary, or None while its feature statistics are not computed."""
    try:
        return svc.sae_summary(sae_id)
    except ServiceError:
        return None


@router.get("/{sae_id}/", response_class=HTMLResponse)
def sae(sae_id: str, sort: Literal["index", "density", "max"] = "density",
        order: Literal["ascending", "descending"] = "descending", q: str = Query("", max_length=100),
        offset: int = Query(0, ge=0), svc: Services = Depends(services)) -> HTMLResponse:
    """The SAE's summary over a page of its features (GET /v1/saes/<id>/summary and /feature-list)."""
    listing = svc.features.feature_list(sae_id, sort, order == "descending", q, offset, PAGE)
    return HTMLResponse(sae_page.render(svc.sae_summary(sae_id), listing, sort, order, q, PAGE))


@router.get("/{sae_id}")
def sae_without_slash(sae_id: str, svc: Services = Depends(services)) -> RedirectResponse:
    svc.saes.info(sae_id)  # 404 for an unknown SAE
    return RedirectResponse(f"/saes/{sae_id}/", status_code=308)


@router.get("/{sae_id}/random")
def random_feature(sae_id: str, svc: Services = Depends(services)) -> RedirectResponse:
    """A random live feature's page (not only the strongest ones)."""
    return RedirectResponse(f"/saes/{sae_id}/features/{svc.features.random_feature(sae_id)}", status_code=303)


@router.get("/{sae_id}/features/{index}", response_class=HTMLResponse)
def feature(sae_id: str, index: int, svc: Services = Depends(services)) -> HTMLResponse:
    """One feature's page, from the same figures as GET /v1/saes/<id>/features/<index>."""
    detail = svc.features.detail(sae_id, index)
    sae = svc.saes.info(sae_id)
    return HTMLResponse(feature_page.render(detail, sae.d_sae, svc.features.byte_level(sae.dataset_id)))
