"""``/docs``: the interactive API documentation (Swagger UI), served from this machine.

FastAPI's own page loads Swagger UI from a CDN, so offline - where a local photo server often is - it is blank.
Here its files (Swagger UI 5, which reads FastAPI's OpenAPI 3.1) come from the ``fastapi-offline`` package (in the
``server`` extra) under ``/docs/assets/``; without that package ``/docs`` says how to get it and points at
``/openapi.json``, which needs nothing.
"""

from __future__ import annotations

import importlib.util
import os

from fastapi.openapi.docs import get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse

ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
          "favicon.png": "image/png"}
PREFIX = "/docs/assets/"
MISSING = """<!doctype html><meta charset="utf-8"><title>mlx-blip2 API docs</title>
<p>The interactive API docs need the <code>fastapi-offline</code> package, which holds Swagger UI's files for this
machine to serve: <code>pip install fastapi-offline</code> (or <code>pip install 'mlx-blip2[server]'</code>), then
restart the server.</p><p>The API description itself is at <a href="/openapi.json">/openapi.json</a>.</p>"""


def swagger_folder() -> str | None:
    """The folder holding Swagger UI's files, or None when fastapi-offline is not installed."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "static")


def add_docs(app, title: str) -> None:
    """``/docs`` and its assets on ``app`` (made with ``docs_url=None, redoc_url=None``)."""
    folder = swagger_folder()

    async def docs(request: Request):
        if folder is None:
            return HTMLResponse(MISSING, status_code=503)
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{title} - API docs",
                                   swagger_js_url=PREFIX + "swagger-ui-bundle.js",
                                   swagger_css_url=PREFIX + "swagger-ui.css",
                                   swagger_favicon_url=PREFIX + "favicon.png")

    async def asset(request: Request):
        name = request.path_params["name"]
        if folder is None or name not in ASSETS:
            return HTMLResponse("not found", status_code=404)
        return FileResponse(os.path.join(folder, name), media_type=ASSETS[name],
                            headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})

    app.add_route("/docs", docs, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_route(PREFIX + "{name}", asset, methods=["GET", "HEAD"], include_in_schema=False)
