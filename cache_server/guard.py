"""``RequestGuard``: what is checked before a request's body is read.

A mutating request without the bearer token is answered 401 before a byte of its body is read
(an anonymous 150 MB body costs nothing), and a JSON request body is capped (a harvest or
evaluation request is a few KB): 413 from its Content-Length, or as soon as a chunked body passes
the cap (such a body is read here, at most the cap, and handed on). The streaming uploads (corpora, SAE files) have their own, larger limits.
"""

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
STREAMING_UPLOADS = frozenset({"/v1/corpora", "/v1/saes"})


class RequestGuard:
    def __init__(self, app: ASGIApp, token: str | None, max_json_bytes: int):
        self.app, self.token, self.max_json_bytes = app, token, max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None and not self._authorized(headers.get("authorization", "")):
            return await _answer(send, 401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")])
        if scope["path"].rstrip("/") in STREAMING_UPLOADS:
            return await self.app(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_json_bytes:
            return await _answer(send, 413, self._too_large())
        # No trustworthy length (chunked): read up to the cap here, then hand the app the body.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_json_bytes:
                return await _answer(send, 413, self._too_large())
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def _too_large(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_json_bytes:,} bytes for JSON requests"


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
