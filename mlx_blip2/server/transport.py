"""HTTP plumbing: size-capped body reading, JSON and multipart parsing into (fields, uploads), JSON responses, and
waiting for a result while watching the client's connection."""

from __future__ import annotations

import asyncio
import inspect
import json
import time

from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .config import ServerConfig
from .errors import APIError, ClientGone
from .images import human_size
from .openai import json_bytes


def json_response(data, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json_bytes(data), status_code=status, media_type="application/json", headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 from its Content-Length (before reading) or once it grows past ``limit``."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, "invalid Content-Length header")
        if int(length) > limit:
            raise APIError(413, f"the request body is {human_size(int(length))}; this server accepts at most "
                                f"{human_size(limit)}")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise APIError(413, f"the request body exceeds this server's {human_size(limit)} limit")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def parse_json(body: bytes) -> dict:
    """A JSON object, or a 400 saying what is wrong with the body."""
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise APIError(400, f"malformed JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the JSON body must be an object, got {type(data).__name__}")
    return data


async def parse_form(request: Request, body: bytes, multipart: bool, max_fields: int) -> tuple[dict, dict]:
    """(text fields {name: str | [str]}, uploads {name: [bytes]}) of a form body, kept in memory."""
    async def chunks():
        yield body

    class InMemory(MultiPartParser):
        spool_max_size = len(body) + 1  # the body is capped already: uploads stay in memory, never in temp files

    parser = InMemory if multipart else FormParser
    limits = {"max_files": 64, "max_fields": max_fields, "max_part_size": 1 << 20}
    accepted = inspect.signature(parser.__init__).parameters  # older Starlettes take fewer limits
    try:
        form = await parser(request.headers, chunks(), **{k: v for k, v in limits.items() if k in accepted}).parse()
    except MultiPartException as e:
        raise APIError(400, f"malformed form data: {e.message}") from None
    except Exception as e:  # noqa: BLE001 - python-multipart's own parse errors
        raise APIError(400, f"malformed form data: {str(e)[:200]}") from None
    values: dict[str, list] = {}
    for key, value in form.multi_items():
        values.setdefault(key, []).append(value)
    data, uploads = {}, {}
    for key, items in values.items():
        if all(isinstance(v, str) for v in items):
            data[key] = items[0] if len(items) == 1 else items
        elif all(not isinstance(v, str) for v in items):
            uploads[key] = [await v.read() for v in items]
        else:
            raise APIError(400, f"'{key}' mixes file uploads and text fields", key)
    await form.close()
    return data, uploads


async def parse_request(request: Request, config: ServerConfig) -> tuple[dict, dict, bool]:
    """(fields, uploads {name: [bytes]}, from_form) of a JSON, multipart or url-encoded request."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    per_image = config.max_upload_bytes
    if ctype == "application/json" or ctype.endswith("+json"):
        body = await read_body(request, -(-per_image * 4 // 3) + (1 << 20))  # base64 takes 4/3
        return parse_json(body), {}, False
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        body = await read_body(request, per_image + (1 << 20))
        data, uploads = await parse_form(request, body, ctype == "multipart/form-data", config.max_texts + 64)
        return data, uploads, True
    raise APIError(415, f"send application/json or multipart/form-data (got {ctype or 'no Content-Type'})")


def check_uploads(uploads: dict, file_fields: set[str]) -> None:
    """Only image fields take file uploads."""
    for key in uploads:
        if key not in file_fields:
            raise APIError(400, f"'{key}' must be a text field, not a file upload", key)


async def wait_for(request: Request, awaitable, deadline: float, timeout: float):
    """``awaitable``'s result; APIError 504 past ``deadline``, ClientGone when the client disconnects."""
    target = asyncio.ensure_future(awaitable)

    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({target, watcher}, timeout=max(0.0, deadline - time.monotonic()),
                                    return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if target in done:
        if target.cancelled():  # the worker dropped the job: the server is stopping
            raise APIError(503, "the request was cancelled: the server is shutting down")
        return target.result()
    target.cancel()
    if watcher in done:
        raise ClientGone()
    raise APIError(504, f"the request did not finish within this server's {timeout:g} s limit and was cancelled")
