"""Route dependencies: the app's services and the bearer-token check of mutating endpoints."""

import hmac

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cache_server.services import Services

_bearer = HTTPBearer(auto_error=False, description="Required on mutating endpoints when the server has a token.")


def services(request: Request) -> Services:
    return request.app.state.services


def require_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    expected = services(request).settings.token
    if expected is None:
        return
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
