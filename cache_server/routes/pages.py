"""The feature browser's HTML pages (not part of the JSON API's schema). Their errors are pages
too (see ``app.py``): a person reads them."""

from typing import Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse, RedirectResponse

from cache_server.browser import feature_page, sae_page
from cache_server.browser.templates import render
from cache_server.errors import ServiceError
from cache_server.routes.deps import services
from cache_server.services import Services
from shared.schemas import MAX_NEW_TOKENS, MAX_STRENGTH, MAX_TEXT_CHARS, ActivationsRequest, AttributionRequest, SteerRequest

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
    return HTMLResponse(feature_page.render(detail, sae.d_sae, svc.features.byte_level(sae.dataset_id),
                                            svc.probes.causal(sae_id)))


# -- custom text: forms over the JSON routes' services (GET, so a result is a link to share) -------
Text = Query("", max_length=MAX_TEXT_CHARS, description="The text to run (empty: the form only).")


def _context(svc: Services, sae_id: str, text: str, **extra) -> dict:
    """What every text page shows: the SAE, its vocabulary's spelling, the limits, and ``query``
    (this page's query string with some parameters changed)."""
    sae = svc.saes.info(sae_id)
    return dict(sae=sae, text=text, byte_level=svc.features.byte_level(sae.dataset_id), causal=svc.probes.causal(sae_id),
                max_chars=MAX_TEXT_CHARS, max_tokens=svc.probes.max_tokens(sae_id),
                query=lambda **changes: urlencode({"text": text, **changes}), **extra)


@router.get("/{sae_id}/text", response_class=HTMLResponse)
def text(sae_id: str, text: str = Text, token: int | None = Query(None, ge=0),
         svc: Services = Depends(services)) -> HTMLResponse:
    """Each token's strongest features (POST /v1/saes/<id>/activations); ``token``: all of one token's."""
    result = svc.probes.activations(sae_id, ActivationsRequest(text=text, top=50)) if text else None
    selected = result.tokens[token] if result and token is not None and token < len(result.tokens) else None
    return HTMLResponse(render("text.html", **_context(svc, sae_id, text, result=result, token=token, selected=selected,
                                                       action=f"/saes/{sae_id}/text", button="encode")))


@router.get("/{sae_id}/features/{index}/text", response_class=HTMLResponse)
def feature_text(sae_id: str, index: int, text: str = Text, svc: Services = Depends(services)) -> HTMLResponse:
    """The text shaded by one feature's activation, relative to its maximum over the statistics' rows."""
    svc.probes.check_feature(sae_id, index)
    result = svc.probes.activations(sae_id, ActivationsRequest(text=text, feature=index, top=1)) if text else None
    scale, scale_name = None, "this feature's max"
    if result is not None:
        scale = result.feature_max
        if not scale:
            scale, scale_name = max(result.values, default=0.0), "its max on this text"
    return HTMLResponse(render("feature_text.html", **_context(
        svc, sae_id, text, result=result, feature=index, scale=scale, scale_name=scale_name,
        action=f"/saes/{sae_id}/features/{index}/text", button="shade by this feature")))


@router.get("/{sae_id}/features/{index}/steer", response_class=HTMLResponse)
def steer(sae_id: str, index: int, prompt: str = Query("", max_length=MAX_TEXT_CHARS),
          strength: float | None = Query(None, ge=-MAX_STRENGTH, le=MAX_STRENGTH), mode: Literal["add", "clamp"] = "add",
          tokens: int = Query(20, ge=1, le=MAX_NEW_TOKENS), temperature: float = Query(0.0, ge=0.0, le=2.0),
          seed: int = Query(0, ge=0, le=2**31 - 1), svc: Services = Depends(services)) -> HTMLResponse:
    """Two continuations of a prompt, with the feature pushed and without (POST /v1/saes/<id>/steer)."""
    svc.probes.check_feature(sae_id, index)
    peak = svc.features.max_value(sae_id, index)
    default = round(2 * peak, 3) if peak else 10.0  # twice the strongest activation seen: a visible push
    request = result = None
    if prompt:
        request = SteerRequest(prompt=prompt, feature=index, strength=default if strength is None else strength, mode=mode,
                               max_new_tokens=tokens, temperature=temperature, seed=seed)
        result = svc.probes.steer(sae_id, request)
    sae = svc.saes.info(sae_id)
    return HTMLResponse(render("steer.html", **_context(
        svc, sae_id, prompt, request=request, result=result, feature=index, default_strength=default,
        max_strength=MAX_STRENGTH, max_new_tokens=MAX_NEW_TOKENS, hooks=sae.output_hooks() or [sae.hook])))


@router.get("/{sae_id}/attribution", response_class=HTMLResponse)
def attribution(sae_id: str, text: str = Text, position: int | None = Query(None, ge=0),
                svc: Services = Depends(services)) -> HTMLResponse:
    """The features ranked by their effect on the next-token loss at a position (POST /v1/saes/<id>/attribution)."""
    result = svc.probes.attribution(sae_id, AttributionRequest(text=text, position=position, top=50)) if text else None
    return HTMLResponse(render("attribution.html", **_context(svc, sae_id, text, result=result,
                                                              action=f"/saes/{sae_id}/attribution", button="attribute")))


@router.get("/{sae_id}/rows/{row}", response_class=HTMLResponse)
def row(sae_id: str, row: int, svc: Services = Depends(services)) -> HTMLResponse:
    """The features active on a stored token (GET /v1/saes/<id>/rows/<row>/features): examples link here."""
    result = svc.probes.row_features(sae_id, row, 50)
    return HTMLResponse(render("row.html", **_context(svc, sae_id, "", result=result)))
