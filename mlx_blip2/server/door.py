"""The server's door: which requests reach a route at all (ASGI middleware, outside every other one).

- **Host allow-list** (against DNS rebinding: a web page whose own name an attacker points at 127.0.0.1 is, to the
  browser, same-origin with this server, and carries its own name in ``Host``). Only ``127.0.0.1``, ``localhost``,
  ``[::1]``, the address the connection arrived on, and the names given with ``allowed_hosts`` (``--allowed-host``)
  reach a route; any other name gets 403, a missing or empty one 400. An IP address cannot be rebound, so the
  address a connection arrived on is always accepted (``--host 0.0.0.0`` serves the machine's own addresses).
  ``"*"`` in ``allowed_hosts`` turns the check off.
- **Cross-site requests refused.** A request whose ``Origin`` is not the server's own (``http://`` + its ``Host``),
  or whose ``Sec-Fetch-Site`` says another site (or another port of this one) sent it, gets 403 on every path but
  ``/health`` and the page's static files. ``cors_origins`` (``--cors-origin``) are let in, and get CORS headers
  (preflights included). Requests without these headers (curl, scripts) are not a browser's, and pass.

Routes that change state (POST) call :func:`require_same_origin` as well: it also insists on a JSON body, which a
cross-site form cannot send without a preflight.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from .errors import APIError
from .openai import json_bytes

LOCAL_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
OPEN_PATHS = frozenset({"/health"})
OPEN_PREFIXES = ("/static/",)
BROWSER_OWN = frozenset({"same-origin", "none"})  # Sec-Fetch-Site of the page's own requests and typed addresses
CORS_HEADERS = "Authorization, Content-Type, X-API-Key"
CORS_METHODS = "GET, POST, OPTIONS"


def host_name(host: str) -> str:
    """The name in a ``Host`` header, without its port or brackets, lower case ("" when there is none)."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name[:-1] if name.endswith(".") else name


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` of an origin or URL, lower case ("" when it is not one; ValueError never)."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return ""
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return ""
    return f"{parts.scheme}://{parts.netloc.lower()}"


def check_origin_list(origins) -> tuple[str, ...]:
    """The ``--cors-origin`` values, normalized; ValueError naming one that is not ``scheme://host[:port]``."""
    out = []
    for origin in origins:
        normal = normalize_origin(origin)
        if not normal or urlsplit(origin.strip()).path not in ("", "/"):
            raise ValueError(f"--cors-origin '{origin}' is not an origin like http://localhost:3000")
        out.append(normal)
    return tuple(out)


class Door:
    """The rules (see the module's docstring), as pure functions of a request's headers."""

    def __init__(self, allowed_hosts=(), cors_origins=()):
        names = [n.strip().lower() for n in allowed_hosts]
        self.any_host = "*" in names
        self.hosts = LOCAL_NAMES | {host_name(n) for n in names if n != "*"}
        self.cors = frozenset(check_origin_list(cors_origins))

    def host_refusal(self, headers: dict, server_addr: str | None) -> APIError | None:
        """None when the request's Host may reach a route, else the 400/403 to answer."""
        hosts = headers.get("host")
        if hosts is None or not host_name(hosts):
            return APIError(400, "the request has no Host header (or an empty one); this server needs one",
                            "host", type="invalid_request_error")
        name = host_name(hosts)
        if self.any_host or name in self.hosts or (server_addr and name == server_addr.lower()):
            return None
        return APIError(403, f"host '{name}' is not allowed: this server answers to 127.0.0.1, localhost and [::1]; "
                             f"to reach it by that name, start it with --allowed-host {name}", "host",
                        type="forbidden")

    def cors_origin(self, headers: dict) -> str | None:
        """The request's Origin when it is one of ``cors_origins`` (such a request gets CORS headers)."""
        origin = normalize_origin(headers.get("origin", ""))
        return origin if origin in self.cors else None

    def cross_site_refusal(self, headers: dict, scheme: str = "http") -> APIError | None:
        """None when the request comes from the server's own page (or from no browser), else the 403 to answer."""
        origin = headers.get("origin")
        own = {f"http://{headers.get('host', '').lower()}", f"https://{headers.get('host', '').lower()}"}
        if origin is not None:
            normal = normalize_origin(origin)
            if normal in own or normal in self.cors:
                return None
            return APIError(403, f"cross-site request refused: origin '{origin[:100]}' is not this server's own; "
                                 "to let a web app at that origin use this server, start it with --cors-origin "
                                 "ORIGIN", "origin", type="forbidden")
        site = headers.get("sec-fetch-site")
        if site is None or site in BROWSER_OWN:
            return None
        referrer = normalize_origin(headers.get("referer", ""))
        if referrer and referrer in self.cors:
            return None
        return APIError(403, f"cross-site request refused (Sec-Fetch-Site: {site[:30]}): another site cannot "
                             "read this server's photos or run its model; open the page itself instead",
                        "sec-fetch-site", type="forbidden")


def header_dict(raw_headers) -> dict[str, str]:
    """ASGI headers as {lower-case name: value} (the first of repeated ones)."""
    out: dict[str, str] = {}
    for name, value in raw_headers or []:
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def require_same_origin(request) -> None:
    """For routes that change state (POST edits): APIError 403 unless the request is the page's own (or no
    browser's) and its body is JSON (415) - a cross-site form can only send form or text bodies."""
    door: Door = request.app.state.door
    headers = header_dict(request.scope.get("headers"))
    refusal = door.cross_site_refusal(headers)
    if refusal is not None:
        raise refusal
    if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise APIError(415, "this endpoint takes a JSON body (Content-Type: application/json)", "content-type")


async def _answer(send, error: APIError, extra=()) -> None:
    body = json_bytes(error.body())
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), *extra]})
    await send({"type": "http.response.body", "body": body})


class DoorMiddleware:
    """ASGI middleware applying a :class:`Door` before routing (every route, the docs and OpenAPI included)."""

    def __init__(self, app, door: Door):
        self.app, self.door = app, door

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = header_dict(scope.get("headers"))
        server = scope.get("server")
        refusal = self.door.host_refusal(headers, server[0] if server else None)
        if refusal is None and scope["path"] not in OPEN_PATHS and not scope["path"].startswith(OPEN_PREFIXES):
            refusal = self.door.cross_site_refusal(headers)
        if refusal is not None:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _answer(send, refusal)
        cors = self.door.cors_origin(headers)
        if cors is None or scope["type"] != "http":
            return await self.app(scope, receive, send)
        cors_headers = [(b"access-control-allow-origin", cors.encode()), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await send({"type": "http.response.start", "status": 204, "headers": cors_headers + [
                (b"access-control-allow-methods", CORS_METHODS.encode()),
                (b"access-control-allow-headers", CORS_HEADERS.encode()), (b"access-control-max-age", b"600")]})
            return await send({"type": "http.response.body", "body": b""})

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers") or []) + cors_headers}
            await send(message)

        return await self.app(scope, receive, send_with_cors)


__all__ = ["Door", "DoorMiddleware", "header_dict", "host_name", "normalize_origin", "require_same_origin"]
