"""What the routes of one app share (:class:`ServerContext` on ``app.state.ctx``): the config, the model worker,
the request schemas, the task; and the steps every model route takes: counting the request in for batching,
decoding its images off the event loop, running its job against the deadline."""

from __future__ import annotations

import asyncio
import functools
import os
import time

import anyio
from starlette.requests import Request

from .config import ServerConfig
from .errors import APIError, ClientGone, from_worker
from .images import image_sources, load_image, resize_spec
from .schemas import build_schemas, validate
from .transport import wait_for
from .worker import Job, ModelWorker

NEEDS = {"captioning": "a captioning (Blip2ForConditionalGeneration)",
         "retrieval": "a retrieval (Blip2ForImageTextRetrieval)"}


def pipeline_kind(pipeline) -> str:
    """"captioning" or "retrieval"; TypeError for anything else."""
    kind = getattr(pipeline, "kind", None)
    if kind not in NEEDS:
        raise TypeError(f"{type(pipeline).__name__} is neither a captioning nor a retrieval pipeline")
    return kind


class ServerContext:
    def __init__(self, pipeline, config: ServerConfig):
        self.pipeline, self.config = pipeline, config
        self.kind = pipeline_kind(pipeline)
        self.task = "generation" if self.kind == "captioning" else "retrieval"
        self.schemas = build_schemas(config)
        self.worker = ModelWorker(pipeline, config.max_batch, config.batch_window, config.max_queue)
        self.resize = resize_spec(pipeline)
        self.created = int(time.time())
        self._limiter: anyio.CapacityLimiter | None = None

    def require(self, kind: str, endpoint: str) -> None:
        if kind != self.kind:
            raise APIError(400, f"{endpoint} needs {NEEDS[kind]} checkpoint; this server runs "
                                f"{self.config.model_name} ({self.task})")

    def served_names(self) -> set[str]:
        """The ``model`` names a request may give: the one /v1/models lists, and its last path component."""
        name = self.config.model_name
        return {name, name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]}

    def validate(self, schema: str, data: dict, from_form: bool = False):
        """The request validated against ``self.schemas.<schema>``; a ``model`` this server does not run is 404
        ``model_not_found``, as OpenAI answers (a client must not get another model's answer unknowingly)."""
        req = validate(getattr(self.schemas, schema), data, from_form)
        if req.model is not None and req.model not in self.served_names():
            raise APIError(404, f"the model '{req.model[:200]}' does not exist on this server; it runs "
                                f"'{self.config.model_name}' (see /v1/models)", "model",
                           type="invalid_request_error", code="model_not_found")
        return req

    # --- images ---

    async def decode(self, param: str, source):
        """One image (bytes or a request string) decoded and checked on the decode thread pool."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.config.decode_threads or min(8, os.cpu_count() or 1))
        return await anyio.to_thread.run_sync(load_image, source, self.config, param, self.resize,
                                              limiter=self._limiter)

    async def load_images(self, data: dict, uploads: dict, names=("image",), many: bool = False) -> list:
        """The request's images (decoded, checked, resized), from uploads or strings; at least one."""
        sources = image_sources(data, uploads, names, many, self.config.max_texts)
        return [await self.decode(name, source) for name, source in sources]

    # --- jobs ---

    def departed(self, request: Request) -> None:
        if getattr(request.state, "arrived", False):
            request.state.arrived = False
            self.worker.depart()

    def submit(self, request: Request, job: Job) -> Job:
        try:
            return self.worker.submit(job)
        finally:
            self.departed(request)

    async def run_job(self, request: Request, job: Job, deadline: float):
        """The job's result; 504 past the deadline, and a client that leaves cancels it."""
        self.submit(request, job)
        try:
            return await wait_for(request, asyncio.wrap_future(job.future), deadline, self.config.timeout)
        except (APIError, ClientGone, asyncio.CancelledError):
            job.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - the worker's failure on this request
            raise from_worker(e) from None


def context(request: Request) -> ServerContext:
    return request.app.state.ctx


def model_route(handler):
    """Count the request as on its way to the worker until it queued its job (see ModelWorker.arrive), and hold it
    to the time limit from its first byte (a client trickling its upload gets 504 too)."""
    @functools.wraps(handler)
    async def route(request: Request):
        ctx = context(request)
        ctx.worker.arrive()
        request.state.arrived = True
        try:
            with anyio.move_on_after(ctx.config.timeout + 1):
                return await handler(request)
            raise APIError(504, f"the request did not finish within this server's {ctx.config.timeout:g} s limit")
        finally:
            ctx.departed(request)

    return route
