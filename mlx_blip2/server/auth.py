"""The API key: with one set, every path but ``/health`` needs ``Authorization: Bearer KEY`` (or
``X-API-Key: KEY``); anything else gets 401 with a JSON error."""

from __future__ import annotations

import hmac

from .errors import APIError
from .openai import json_bytes

OPEN_PATHS = frozenset({"/health"})


def given_key(headers) -> bytes:
    """The key a request carries: the bearer token, else the X-API-Key header (raw ASGI headers: [(name, value)])."""
    headers = dict(headers or [])
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        return auth[7:].strip()
    return headers.get(b"x-api-key", b"")


def authorized(headers, api_key: str) -> bool:
    return hmac.compare_digest(given_key(headers), api_key.encode())


class APIKeyMiddleware:
    """ASGI middleware refusing requests without the key (compared in constant time)."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not authorized(scope.get("headers"),
                                                                                         self.api_key):
            error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": json_bytes(error.body())})
            return
        await self.app(scope, receive, send)
