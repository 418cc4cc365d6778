"""A local HTTP server for BLIP-2: ``mlx-blip2 serve --model M [--host 127.0.0.1] [--port 8080]``.

Endpoints (JSON in, JSON out; images as multipart uploads or as base64 / data URLs in JSON; OpenAPI docs at
``/docs``):

- ``POST /v1/caption``  ``{"image", "prompt"?, options...}`` -> ``{"caption"}`` (``"captions"`` with several sequences)
- ``POST /v1/ask``      ``{"image", "question": str | [str], "template"?, options...}`` -> ``{"answer"}``
  (``{"answers"}`` for a list)
- ``POST /v1/chat/completions``  OpenAI's format; one ``image_url`` data URL; ``stream: true`` streams server-sent
  events
- ``POST /v1/match``    ``{"image", "texts": str | [str], "mode"?: "itm" | "itc"}`` -> ``{"scores"}`` (retrieval models)
- ``POST /v1/embeddings``  OpenAI's format for texts (``input``), ``image``/``images`` for images (retrieval models)
- ``GET /health`` (never needs the API key), ``GET /v1/models``

The data flow, one module a step: :mod:`.auth` (the API key) -> :mod:`.transport` (body, JSON or multipart) ->
:mod:`.schemas` (validation; the generation fields generated from the one declaration of generation options) ->
:mod:`.images` (image input, limits) -> :mod:`.worker` (the model thread: batches concurrent requests into one
``Engine.generate`` call, streams through ``Engine.stream``) -> :mod:`.openai` (OpenAI's formats). The routes
(:mod:`.routes_generation`, :mod:`.routes_retrieval`) tie the steps together, :mod:`.app` assembles them,
:mod:`.background` runs uvicorn on a thread.

The web stack is an optional extra: ``pip install 'mlx-blip2[server]'`` (fastapi, pydantic, starlette, uvicorn,
python-multipart). This module imports none of it until ``create_app`` or ``BackgroundServer`` is used.
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = ("pip install 'mlx-blip2[server]'   (or: pip install fastapi pydantic starlette uvicorn "
                "python-multipart)")
SERVER_PACKAGES = {"fastapi": ("fastapi",), "pydantic": ("pydantic",), "starlette": ("starlette",),
                   "uvicorn": ("uvicorn",),
                   "python-multipart": ("python_multipart", "multipart")}  # its module's new and old names

__all__ = ["INSTALL_HINT", "BackgroundServer", "create_app", "missing_server_packages"]


def missing_server_packages() -> list[str]:
    """The web-stack packages that are not installed (empty when the server can run)."""
    return [pip for pip, modules in SERVER_PACKAGES.items()
            if not any(importlib.util.find_spec(m) is not None for m in modules)]


def __getattr__(name: str):
    """``create_app`` and ``BackgroundServer`` import the web stack when first used."""
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "BackgroundServer":
        from .background import BackgroundServer

        return BackgroundServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
