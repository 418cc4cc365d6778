"""The retrieval endpoints (retrieval checkpoints such as Salesforce/blip2-itm-vit-g): ``/v1/match`` (ITM
probabilities or ITC similarities of one image against texts) and ``/v1/embeddings`` (OpenAI's format for texts,
``image``/``images`` for images)."""

from __future__ import annotations

import time

from starlette.requests import Request

from .context import context, model_route
from .errors import APIError
from .openai import embeddings_body
from .schemas import Schemas, openapi_body
from .transport import check_uploads, json_response, parse_request
from .worker import Job


@model_route
async def match(request: Request):
    ctx = context(request)
    deadline = time.monotonic() + ctx.config.timeout
    ctx.require("retrieval", "/v1/match")
    data, uploads, form = await parse_request(request, ctx.config)
    check_uploads(uploads, {"image"})
    req = ctx.validate("match", data, form)
    texts = req.texts if isinstance(req.texts, list) else [req.texts]
    (image,) = await ctx.load_images(data, uploads)
    job = Job("match", {"image": image, "texts": texts, "mode": req.mode}, key=("match",), rows=1)
    scores = await ctx.run_job(request, job, deadline)
    return json_response({"model": ctx.config.model_name, "mode": req.mode, "texts": texts, "scores": scores})


@model_route
async def embeddings(request: Request):
    ctx = context(request)
    deadline = time.monotonic() + ctx.config.timeout
    ctx.require("retrieval", "/v1/embeddings")
    data, uploads, form = await parse_request(request, ctx.config)
    check_uploads(uploads, {"image", "images"})
    req = ctx.validate("embeddings", data, form)
    if req.dimensions is not None:
        raise APIError(400, "'dimensions' is not supported: the embedding size is fixed by the model", "dimensions")
    has_images = req.image is not None or req.images is not None or bool(uploads)
    if has_images == (req.input is not None):
        raise APIError(400, "send either 'input' (texts) or 'image'/'images', not both" if has_images else
                            "'input' (a text or a list of texts) or 'image'/'images' is required", "input")
    if has_images:
        images = await ctx.load_images(data, uploads, ("image", "images"), many=True)
        job = Job("embed_images", {"images": images}, key=("embed_images",), rows=len(images))
        vectors, tokens = await ctx.run_job(request, job, deadline), 0
    else:
        texts = req.input if isinstance(req.input, list) else [req.input]
        job = Job("embed_texts", {"texts": texts}, key=("embed_texts",), rows=len(texts))
        vectors, tokens = await ctx.run_job(request, job, deadline)
    return json_response(embeddings_body(vectors, ctx.config.model_name, req.encoding_format or "float", tokens))


def add_routes(app, schemas: Schemas) -> None:
    """Register the retrieval endpoints on a FastAPI app, documented with ``schemas``."""
    tags = ["retrieval"]
    app.add_api_route("/v1/match", match, methods=["POST"], tags=tags, openapi_extra=openapi_body(schemas.match),
                      summary="Score texts against an image",
                      description="Fields: image (a file upload, base64 or a data URL), texts (a text or a list), "
                                  "mode ('itm', the default: image-text matching probabilities in [0, 1]; 'itc': "
                                  "contrastive similarities). -> {model, mode, texts, scores}, one score per text.")
    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"], tags=tags,
                      openapi_extra=openapi_body(schemas.embeddings, files=("image", "images")),
                      summary="Embed texts or images",
                      description="OpenAI's format: input (texts) -> one normalised vector per text; image/images "
                                  "instead -> one (query tokens x dim) array per image. encoding_format 'base64' "
                                  "sends little-endian float32.")
