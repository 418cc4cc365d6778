"""The generation endpoints: ``/v1/caption``, ``/v1/ask`` and ``/v1/chat/completions`` (OpenAI's format, streamed
as server-sent events with ``stream: true``). Each validates its request, decodes its image and hands a job to the
model worker."""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import StreamingResponse

from ..pipelines.engine import Row
from ..generation.options import GenerationOptions
from .context import ServerContext, context, model_route
from .errors import APIError, from_worker
from .openai import ChatIds, StreamText, chat_prompt, check_unsupported, chunk, completion_body, sse, usage
from .schemas import Schemas, generation_overrides, openapi_body, request_names, resolve_options
from .transport import check_uploads, json_response, parse_request, wait_for
from .worker import Job, generation_key


async def run_generation(request: Request, ctx: ServerContext, image, prompts: list, options: GenerationOptions,
                         deadline: float) -> list:
    """Completions for one image and its prompts (one row each), batched with other requests by the worker."""
    rows = [Row(image=image, prompt=p) for p in prompts]
    job = Job("generate", {"rows": rows, "options": options}, key=generation_key(options, prompts[0] is not None),
              rows=len(rows))
    return await ctx.run_job(request, job, deadline)


async def _image_request(request: Request, endpoint: str, schema_name: str):
    """(context, deadline, validated request, data, uploads) of a caption or ask request."""
    ctx = context(request)
    deadline = time.monotonic() + ctx.config.timeout
    ctx.require("captioning", endpoint)
    data, uploads, form = await parse_request(request, ctx.config)
    check_uploads(uploads, {"image"})
    return ctx, deadline, ctx.validate(schema_name, data, form), data, uploads


@model_route
async def caption(request: Request):
    ctx, deadline, req, data, uploads = await _image_request(request, "/v1/caption", "caption")
    options = resolve_options(ctx.pipeline.caption_defaults, generation_overrides(req))
    (image,) = await ctx.load_images(data, uploads)
    (completions,) = await run_generation(request, ctx, image, [ctx.pipeline.caption_prompt(req.prompt)], options,
                                          deadline)
    out = {"model": ctx.config.model_name, "caption": completions[0].text}
    if len(completions) > 1:
        out["captions"] = [c.text for c in completions]
    return json_response(out)


@model_route
async def ask(request: Request):
    ctx, deadline, req, data, uploads = await _image_request(request, "/v1/ask", "ask")
    template = req.template or ctx.pipeline.vqa_template
    if template.count("{}") != 1:
        raise APIError(400, "'template' must contain '{}' exactly once (where the question goes)", "template")
    questions = req.question if isinstance(req.question, list) else [req.question]
    options = resolve_options(ctx.pipeline.vqa_defaults, generation_overrides(req))
    (image,) = await ctx.load_images(data, uploads)
    results = await run_generation(request, ctx, image, [template.replace("{}", q) for q in questions], options,
                                   deadline)
    out: dict = {"model": ctx.config.model_name}
    if isinstance(req.question, list):
        out["answers"] = [r[0].text for r in results]
    else:
        out["answer"] = results[0][0].text
        if len(results[0]) > 1:
            out["answers"] = [c.text for c in results[0]]
    return json_response(out)


@model_route
async def chat_completions(request: Request):
    ctx = context(request)
    deadline = time.monotonic() + ctx.config.timeout
    ctx.require("captioning", "/v1/chat/completions")
    data, _, form = await parse_request(request, ctx.config)
    if form:
        raise APIError(400, "send chat completions as JSON, images as image_url data URLs")
    req = ctx.validate("chat", data)
    (param, source), prompt = chat_prompt(req.messages, ctx.config.max_text_chars)
    include_usage = check_unsupported(req)
    recipe = ctx.pipeline.caption_defaults if prompt is None else ctx.pipeline.vqa_defaults
    options = resolve_options(recipe, generation_overrides(req), stream=bool(req.stream), names=request_names(req))
    if prompt is None:
        prompt = ctx.pipeline.caption_prompt(None)
    image = await ctx.decode(param, source)
    ids = ChatIds(ctx.config.model_name)
    if req.stream:
        return await chat_stream(request, ctx, Row(image=image, prompt=prompt), options, ids, include_usage, deadline)
    (completions,) = await run_generation(request, ctx, image, [prompt], options, deadline)
    return json_response(completion_body(ids, completions))


# --- streaming ---------------------------------------------------------------------------------------------------


class JobStream(StreamingResponse):
    """Server-sent events whose job is cancelled however the response ends (finished, failed, or Starlette stopped
    it because the client disconnected): a client that goes away frees the model between two tokens."""

    def __init__(self, job: Job, events):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def stream_events(job: Job, first, ids: ChatIds, include_usage: bool, deadline: float, timeout: float):
    """The worker's ("chunk" | "error" | "end", value) events as chat completion chunks, then ``[DONE]``."""
    item, finish, tokens, text = first, "stop", 0, StreamText()
    try:
        yield chunk(ids, {"role": "assistant", "content": ""})
        while True:
            kind, value = item
            if kind == "chunk":
                content = text.delta(value.text)
                if content:
                    yield chunk(ids, {"content": content})
                if value.finish_reason:
                    finish, tokens = value.finish_reason, value.generation_tokens
            elif kind == "error":
                yield sse(from_worker(value).body())
                return
            else:  # "end", with the prompt's tokens
                yield chunk(ids, {}, finish)
                if include_usage:
                    yield chunk(ids, {}, usage=usage(value, tokens))
                yield sse("[DONE]")
                return
            try:
                item = await asyncio.wait_for(job.events.get(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                yield sse(APIError(504, f"the stream did not finish within this server's {timeout:g} s limit and "
                                        "was cancelled").body())
                return
    finally:
        job.cancel()


async def chat_stream(request: Request, ctx: ServerContext, row: Row, options: GenerationOptions, ids: ChatIds,
                      include_usage: bool, deadline: float):
    """Errors before the first piece are plain JSON errors; after it, error events."""
    job = Job("stream", {"row": row, "options": options}, loop=asyncio.get_running_loop(), events=asyncio.Queue())
    ctx.submit(request, job)
    try:
        first = await wait_for(request, job.events.get(), deadline, ctx.config.timeout)
    except BaseException:
        job.cancel()
        raise
    if first[0] == "error":
        job.cancel()
        raise from_worker(first[1])
    return JobStream(job, stream_events(job, first, ids, include_usage, deadline, ctx.config.timeout))


def add_routes(app, schemas: Schemas) -> None:
    """Register the generation endpoints on a FastAPI app, documented with ``schemas``."""
    tags = ["generation"]
    app.add_api_route("/v1/caption", caption, methods=["POST"], tags=tags, openapi_extra=openapi_body(schemas.caption),
                      summary="Caption an image",
                      description="-> {model, caption} (and captions with several sequences). Options default to "
                                  "LAVIS's captioning recipe (5 beams, 1 to 30 new tokens).")
    app.add_api_route("/v1/ask", ask, methods=["POST"], tags=tags, openapi_extra=openapi_body(schemas.ask),
                      summary="Answer questions about an image",
                      description="-> {model, answer} for a question, {model, answers} for a list (one image "
                                  "encoding). Options default to LAVIS's VQA recipe.")
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], tags=tags,
                      openapi_extra=openapi_body(schemas.chat, multipart=False), summary="OpenAI chat completions",
                      description="OpenAI's format with one image_url data URL; stream: true streams server-sent "
                                  "events. Turns become BLIP-2's 'Question: ... Answer:' prompt; no text, a caption.")
