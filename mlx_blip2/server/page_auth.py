"""The API key for a browser: with ``--api-key``, the search page also accepts a cookie, set by opening
``/?key=KEY`` once (the key is then dropped from the address: a 303 to the same page without it) or by the form at
``/login`` (shown in place of the page while the key is missing). ``/logout`` clears it.

The cookie holds an HMAC of the key (never the key itself), is ``HttpOnly`` and ``SameSite=Strict``, and is
accepted on the page's own GET routes only (``/``, ``/api/search``, ``/thumb/ID``, ``/image/ID``), and on its
caption corrections (``POST /api/caption/ID``, which also need the page's CSRF token): the model
endpoints (``/v1/...``) still need ``Authorization: Bearer KEY``. This middleware sits outside
:class:`~mlx_blip2.server.auth.APIKeyMiddleware`: a request with a valid cookie reaches it carrying the key as a
bearer token; anything else is left for it to judge (a 401).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Callable
from urllib.parse import parse_qsl, urlencode

from .auth import authorized
from .page_html import PAGE_HEADERS

COOKIE = "mlx_blip2_page"
COOKIE_MAX_AGE = 30 * 24 * 3600
MAX_FORM_BYTES = 8192
PAGE_PATHS = frozenset({"/", "/api/search"})
PAGE_PREFIXES = ("/thumb/", "/image/")
OPEN_PREFIXES = ("/static/",)  # the page's CSS and JS: public, so that the login form is styled
EDIT_PREFIX = "/api/caption/"  # POST: a correction from the page (page_edit)


def cookie_token(api_key: str) -> str:
    return hmac.new(api_key.encode(), b"mlx-blip2 search page cookie v1", hashlib.sha256).hexdigest()


def _cookies(headers) -> dict[str, str]:
    out = {}
    for name, value in headers:
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, sep, v = part.strip().partition("=")
                if sep:
                    out.setdefault(k, v)
    return out


def safe_next(url: str) -> str:
    """A local address to return to after logging in (never another site: no ``//host`` or ``/\\host``)."""
    if not url.startswith("/") or url.startswith("//") or url.startswith("/\\") or any(c < " " for c in url):
        return "/"
    return url


class PageAuthMiddleware:
    """ASGI middleware: the key cookie for the search page (see the module's docstring)."""

    def __init__(self, app, api_key: str, login_page: Callable[[bool, str], str]):
        self.app, self.api_key, self.login_page = app, api_key, login_page
        self.token = cookie_token(api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path.startswith(OPEN_PREFIXES) and method in ("GET", "HEAD"):
            return await self.app(self._as_authorized(scope), receive, send)
        if path == "/login":
            return await self._login(scope, receive, send)
        if path == "/logout":
            return await self._redirect(send, "/", clear=True)
        is_page = path in PAGE_PATHS or path.startswith(PAGE_PREFIXES)
        page_read = is_page and method in ("GET", "HEAD")
        if not page_read and not (path.startswith(EDIT_PREFIX) and method == "POST"):
            return await self.app(scope, receive, send)
        if hmac.compare_digest(_cookies(scope.get("headers") or []).get(COOKIE, ""), self.token):
            return await self.app(self._as_authorized(scope), receive, send)
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        keys = [v for k, v in query if k == "key"]
        if path == "/" and keys:
            if hmac.compare_digest(keys[-1].encode(), self.api_key.encode()):
                rest = urlencode([(k, v) for k, v in query if k != "key"])
                return await self._redirect(send, "/" + ("?" + rest if rest else ""), set_cookie=True)
            return await self._html(send, 401, self.login_page(True, "/"))
        if authorized(scope.get("headers"), self.api_key):
            return await self.app(scope, receive, send)
        if path == "/":
            next_url = "/" + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
            return await self._html(send, 401, self.login_page(False, safe_next(next_url)))
        return await self.app(scope, receive, send)  # the API key middleware answers 401

    def _as_authorized(self, scope):
        headers = [(k, v) for k, v in scope.get("headers") or [] if k not in (b"authorization", b"x-api-key")]
        headers.append((b"authorization", b"Bearer " + self.api_key.encode()))
        return {**scope, "headers": headers}

    async def _login(self, scope, receive, send):
        if scope["method"] in ("GET", "HEAD"):
            return await self._html(send, 200, self.login_page(False, "/"))
        if scope["method"] != "POST":
            return await self._html(send, 405, self.login_page(False, "/"))
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_FORM_BYTES:
                return await self._html(send, 413, self.login_page(True, "/"))
            if not message.get("more_body"):
                break
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        next_url = safe_next(form.get("next", "/"))
        if hmac.compare_digest(form.get("key", "").encode(), self.api_key.encode()):
            return await self._redirect(send, next_url, set_cookie=True)
        return await self._html(send, 401, self.login_page(True, next_url))

    async def _redirect(self, send, location: str, set_cookie: bool = False, clear: bool = False):
        headers = [(b"location", location.encode("latin-1", "replace")), (b"cache-control", b"no-store"),
                   (b"content-length", b"0")]
        if set_cookie or clear:
            value = self.token if set_cookie else ""
            age = COOKIE_MAX_AGE if set_cookie else 0
            headers.append((b"set-cookie", f"{COOKIE}={value}; Path=/; Max-Age={age}; HttpOnly; "
                                           f"SameSite=Strict".encode()))
        await send({"type": "http.response.start", "status": 303, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _html(self, send, status: int, page: str):
        body = page.encode("utf-8")
        headers = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in PAGE_HEADERS.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
