"""``create_app(settings)``: the one factory that wires the service layer to the routes."""

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from cache_server.browser.templates import render
from cache_server.errors import ServiceError
from cache_server.files import disk_full_message, is_disk_full
from cache_server.guard import RequestGuard
from cache_server.routes.deps import ERRORS
from cache_server.routes import corpora, datasets, evaluations, harvests, models, pages, saes, system, zarr_http
from cache_server.services import build_services
from cache_server.settings import Settings

log = logging.getLogger("cache_server")


def _answer(request: Request, detail: str, status: int, headers: dict | None = None) -> Response:
    """An error as JSON ({"detail": ...}), or as a page under the browser's /saes/ paths."""
    if request.url.path == "/saes" or request.url.path.startswith("/saes/"):
        return HTMLResponse(render("error.html", status=status, message=detail), status_code=status, headers=headers)
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(settings: Settings) -> FastAPI:
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        services.start()
        yield
        services.stop()

    # FastAPIOffline: /docs and /redoc serve Swagger UI's and ReDoc's assets from the package, so the
    # docs work with no internet (FastAPI's own pages load them from a CDN).
    app = FastAPIOffline(title="Activation cache server", version="0.1.0", lifespan=lifespan, responses=ERRORS,
                  description="Harvest transformer activations into chunked Zarr stores and serve them.")
    app.state.services = services
    app.add_middleware(RequestGuard, token=settings.token, max_json_bytes=settings.max_json_bytes)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return _answer(request, str(exc), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail, status = exc.detail, exc.status_code
        if status == 400 and detail == "There was an error parsing the body":  # not UTF-8: as bad JSON is
            detail, status = "invalid request: the body is not valid JSON (nor UTF-8 text)", 422
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint at {request.url.path}; the API is described at /docs"
        headers = exc.headers
        if exc.status_code == 405:
            # One route per method: Starlette's Allow names only the first that matched the path.
            allowed = sorted({m for route in request.app.routes if isinstance(route, APIRoute)
                              and route.path_regex.match(request.url.path) for m in route.methods})
            detail = f"{request.method} is not allowed on {request.url.path} (allowed: {', '.join(allowed)}); see /docs"
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return _answer(request, detail, status, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(_describe(e) for e in exc.errors())
        return _answer(request, f"invalid request: {problems}", 422)

    @app.exception_handler(OSError)
    async def disk_error(request: Request, exc: OSError) -> Response:
        if is_disk_full(exc):
            return _answer(request, disk_full_message(exc, settings.local_root), 507)
        return await unexpected(request, exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return _answer(request, f"internal error: {type(exc).__name__}", 500)

    for module in (system, corpora, models, harvests, datasets, saes, evaluations, zarr_http, pages):
        app.include_router(module.router)
    _serve_guide(app, settings)
    return app


def _serve_guide(app: FastAPI, settings: Settings) -> None:
    """The docs site at /guide/, offline like /docs; a clear 404 where none is built."""
    guide = settings.guide()
    if guide is not None:
        app.mount("/guide", StaticFiles(directory=guide, html=True), name="guide")
        return

    @app.get("/guide", include_in_schema=False)
    @app.get("/guide/{path:path}", include_in_schema=False)
    def no_guide(path: str = "") -> Response:
        return JSONResponse({"detail": "no docs site is built here: run `mkdocs build` in the repository "
                                       "(pip install -e '.[dev]' installs it), or start with --guide-dir"}, 404)


def _describe(error: dict) -> str:
    if error.get("type") == "json_invalid":  # loc is ("body", character offset)
        reason = (error.get("ctx") or {}).get("error", "JSON decode error")
        return f"the body is not valid JSON: {reason} at character {error.get('loc', (None, '?'))[-1]}"
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
    return f"{where}: {error.get('msg')}" if where else str(error.get("msg"))
