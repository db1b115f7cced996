"""Route dependencies: the app's services and the bearer-token check of mutating endpoints."""

import hmac

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cache_server.services import Services
from shared.schemas import ErrorBody

ERRORS = {422: {"model": ErrorBody, "description": "Invalid input; `detail` says what and where."},
          404: {"model": ErrorBody, "description": "No such object (dataset, job, SAE, corpus...)."}}
"""Answers every route may give: the app documents them for all (FastAPI's own 422 schema, a list
of errors, is not what this server answers)."""
MUTATING = {401: {"model": ErrorBody, "description": "Missing or wrong bearer token (when the server has one)."},
            409: {"model": ErrorBody, "description": "Conflicts with the state of the object."},
            413: {"model": ErrorBody, "description": "Body over the server's limit."},
            507: {"model": ErrorBody, "description": "The server's disk is full."}}
"""What a mutating route may answer besides: documented on each of them."""

_bearer = HTTPBearer(auto_error=False, description="Required on mutating endpoints when the server has a token.")


def services(request: Request) -> Services:
    return request.app.state.services


def authorized(request: Request) -> bool:
    """The request carries the server's token, or the server has none. Read from the header here
    (not as a security dependency): a read that needs the token only for some answers must not be
    documented as one that always does."""
    expected = services(request).settings.token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return expected is None or (scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), expected.encode()))


def require_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    if not authorized(request):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
