"""``create_app``: the FastAPI application — routes, error handlers, the worker's lifespan, the API key."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .auth import APIKeyMiddleware
from .config import make_config
from .context import ServerContext, context
from .docs import add_docs
from .door import Door, DoorMiddleware
from .errors import APIError, ClientGone
from .page_auth import PageAuthMiddleware
from .routes_generation import add_routes as add_generation_routes
from .routes_retrieval import add_routes as add_retrieval_routes
from .search_page import add_search_page
from .transport import json_response

log = logging.getLogger("mlx_blip2.server")

DESCRIPTION = """BLIP-2 on MLX: captions, visual question answering and OpenAI chat completions (captioning
checkpoints), or image-text matching and embeddings (retrieval checkpoints). Images are multipart file uploads,
base64 or data URLs; the server never reads its own files. Every error is `{"error": {"message", "type", "param",
"code"}}`."""


# --- endpoints that need no model ---


async def health(request: Request):
    ctx = context(request)
    return json_response({"status": "ok", "model": ctx.config.model_name, "task": ctx.task,
                          "queued": ctx.worker.queued(), "busy": ctx.worker.busy})


async def models(request: Request):
    ctx = context(request)
    return json_response({"object": "list", "data": [{"id": ctx.config.model_name, "object": "model",
                                                      "created": ctx.created, "owned_by": "mlx-blip2",
                                                      "task": ctx.task}]})


# --- errors ---


async def api_error(request: Request, exc: APIError):
    return json_response(exc.body(), exc.status, exc.headers)


async def http_error(request: Request, exc: HTTPException):
    messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}
    error = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)))
    return json_response(error.body(), exc.status_code, getattr(exc, "headers", None))


async def client_gone(request: Request, exc: ClientGone):
    return Response(status_code=499)


async def server_error(request: Request, exc: Exception):
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return json_response(APIError(500, "internal server error; see the server log").body(), 500)


ERROR_HANDLERS = {APIError: api_error, HTTPException: http_error, ClientGone: client_gone, Exception: server_error}


def create_app(pipeline, index=None, captions=(), allow_edits: bool = False, new_sidecar: str = "xmp",
               **settings) -> FastAPI:
    """The application serving ``pipeline`` (from :func:`mlx_blip2.pipelines.load`).

    With ``index`` (a photo index, ``library.sqlite``; a retrieval pipeline) the photo search page is served at
    ``/`` (:mod:`.search_page`), with captions from ``captions`` (caption run outputs, .jsonl/.csv) or sidecars;
    ``allow_edits`` lets the page correct captions (:mod:`.page_edit`; ``new_sidecar``, xmp or txt, is the sidecar
    made for a photo that has none).

    ``settings`` are :class:`~mlx_blip2.server.config.ServerConfig` fields (``model_name``, ``max_batch``,
    ``timeout``, ``max_upload_bytes``, ``max_pixels``, ``allow_url_fetch``, ``api_key``, ``allowed_hosts``,
    ``cors_origins``...). Every request passes :mod:`.door` first (the Host allow-list, cross-site requests
    refused). The model worker starts with the app's lifespan (uvicorn runs it); ``app.state.ctx`` (and its
    ``worker`` and ``config``, also on ``app.state``) are there for inspection. OpenAPI docs at ``/docs``.
    """
    config = make_config(**settings)
    door = Door(config.allowed_hosts, config.cors_origins)  # ValueError for a malformed origin, before loading
    ctx = ServerContext(pipeline, config)

    @asynccontextmanager
    async def lifespan(app):
        ctx.worker.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(ctx.worker.stop)
            if getattr(app.state, "search_page", None) is not None:
                app.state.search_page.close()

    app = FastAPI(title="mlx-blip2", description=DESCRIPTION, lifespan=lifespan, exception_handlers=ERROR_HANDLERS,
                  docs_url=None, redoc_url=None)  # /docs from this machine (docs.py); ReDoc needs a CDN
    add_docs(app, "mlx-blip2")
    app.add_api_route("/health", health, methods=["GET"], tags=["server"], summary="Liveness (never needs the key)")
    app.add_api_route("/v1/models", models, methods=["GET"], tags=["server"], summary="The model served")
    # Both sets of routes, whatever the checkpoint: the other kind's say which checkpoint they need.
    add_generation_routes(app, ctx.schemas)
    add_retrieval_routes(app, ctx.schemas)
    app.state.ctx, app.state.config, app.state.worker, app.state.pipeline = ctx, ctx.config, ctx.worker, pipeline
    app.state.door = door
    if index is not None:
        add_search_page(app, ctx, index, captions, allow_edits=allow_edits, new_sidecar=new_sidecar)
    if ctx.config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=ctx.config.api_key)
        if index is not None:  # outside the key check: the page's cookie (see page_auth)
            app.add_middleware(PageAuthMiddleware, api_key=ctx.config.api_key,
                               login_page=app.state.search_page.login_page)
    app.add_middleware(DoorMiddleware, door=door)  # added last: the outermost, before routing and the key
    return app
