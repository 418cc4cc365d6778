"""A local HTTP server for BLIP-2: ``mlx-blip2 serve --model M [--host 127.0.0.1] [--port 8080]``.

Endpoints (JSON in, JSON out; images as multipart uploads or as base64 / data URLs in JSON):

- ``POST /v1/caption``  ``{"image", "prompt"?, options...}`` -> ``{"caption"}`` (``"captions"`` with several sequences)
- ``POST /v1/ask``      ``{"image", "question": str | [str], "template"?, options...}`` -> ``{"answer"}`` / ``{"answers"}``
- ``POST /v1/chat/completions``  OpenAI's format; one ``image_url`` data URL; ``stream: true`` streams server-sent
  events
- ``POST /v1/match``    ``{"image", "texts": str | [str], "mode"?: "itm" | "itc"}`` -> ``{"scores"}`` (retrieval models)
- ``POST /v1/embeddings``  OpenAI's format for texts (``input``), ``image``/``images`` for images (retrieval models)
- ``GET /health`` (never needs the API key), ``GET /v1/models``

Generation options are those of :func:`mlx_blip2.generate.generate`, with the task's recipe as defaults, exactly as
in :mod:`mlx_blip2.pipeline`.

Design: the HTTP side (Starlette on uvicorn) parses and validates requests and decodes images on a small thread
pool; one model worker thread owns the model (MLX calls are not thread-safe) and takes queued jobs. Jobs that arrive
within a few milliseconds of each other, or that queue up while the worker is busy, and that share the task and
options, run as one batched model call (vision encoder and decoding), so concurrent clients raise throughput.
Streams run one at a time. A job whose client went away or whose time ran out is skipped if it has not started, and
a running decode stops between steps once every request in its batch is cancelled.

Safety: bodies and images are size-checked before decoding (bytes, then pixels from the header), only common image
formats are decoded, every bad input is a 4xx with a JSON error, the server never reads its own files and fetches
http(s) URLs only with ``allow_url_fetch``; with an API key every endpoint but ``/health`` requires it.

The web stack is an optional extra: ``pip install 'mlx-blip2[server]'`` (starlette, uvicorn, python-multipart).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import hmac
import inspect
import io
import json
import logging
import math
import os
import queue
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from .generation.decoding import GenerationCancelled as Cancelled

log = logging.getLogger("mlx_blip2.server")

INSTALL_HINT = "pip install 'mlx-blip2[server]'   (or: pip install starlette uvicorn python-multipart)"
SERVER_PACKAGES = {"starlette": ("starlette",), "uvicorn": ("uvicorn",),
                   "python-multipart": ("python_multipart", "multipart")}  # its module's new and old names


def missing_server_packages() -> list[str]:
    """The web-stack packages that are not installed (empty when the server can run)."""
    import importlib.util

    return [pip for pip, modules in SERVER_PACKAGES.items()
            if not any(importlib.util.find_spec(m) is not None for m in modules)]


# --- configuration and errors ------------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    """Limits and behaviour of one server; every field is a keyword of :func:`create_app`."""

    model_name: str = "blip2"
    max_batch: int = 8  # most rows (images x questions) in one model call
    batch_window: float = 0.01  # most seconds to wait for requests still being read, to batch them with the first
    max_queue: int = 256  # queued jobs beyond this get 503
    timeout: float = 120.0  # seconds per request, queueing included; then 504 and the job is cancelled
    max_upload_bytes: int = 20 * 1024 * 1024  # per image, after base64 decoding
    max_pixels: int = 50_000_000  # width x height, checked from the header before decoding
    allow_url_fetch: bool = False  # fetch http(s) image URLs (off: such requests get 400)
    url_fetch_timeout: float = 10.0
    api_key: str | None = None
    max_new_tokens: int = 512  # the largest max_new_tokens a request may ask for
    max_beams: int = 16
    max_texts: int = 256  # texts per match/embeddings request, questions per ask request, images per embeddings
    max_text_chars: int = 4000
    decode_threads: int = 0  # concurrent image decodes (0: min(8, CPU count))


class APIError(Exception):
    """A request that cannot be served: becomes ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             405: "invalid_request_error", 413: "request_too_large", 415: "invalid_request_error",
                             503: "server_busy", 504: "timeout"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# --- options -----------------------------------------------------------------------------------------------------

OPTION_TYPES: dict[str, type] = {
    "max_new_tokens": int, "min_new_tokens": int, "num_beams": int, "num_return_sequences": int,
    "length_penalty": float, "do_sample": bool, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
    "repetition_penalty": float, "no_repeat_ngram_size": int, "seed": int,
}


def _coerce(name: str, value, kind: type, from_form: bool):
    """A JSON (or form-string) value as ``kind``, or APIError naming the field."""
    if from_form and isinstance(value, str):
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            value = kind(text)
        except ValueError:
            raise APIError(400, f"'{name}' must be {_kind_name(kind)}, got {value!r}", name) from None
    if kind is bool:
        if not isinstance(value, bool):
            raise APIError(400, f"'{name}' must be true or false, got {value!r}", name)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be {_kind_name(kind)}, got {json.dumps(value)[:40]}", name)
    if kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise APIError(400, f"'{name}' must be an integer, got {value}", name)
            value = int(value)
        return value
    value = float(value)
    if not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number, got {value}", name)
    return value


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]


def parse_options(raw: dict, config: ServerConfig, from_form: bool = False) -> dict:
    """Generation options from a request (only the keys of ``OPTION_TYPES``), type- and range-checked."""
    options = {}
    for name, kind in OPTION_TYPES.items():
        if name in raw and raw[name] is not None:
            options[name] = _coerce(name, raw[name], kind, from_form)
    limits = {
        "max_new_tokens": (1, config.max_new_tokens), "min_new_tokens": (0, config.max_new_tokens),
        "num_beams": (1, config.max_beams), "num_return_sequences": (1, config.max_beams),
        "top_k": (0, None), "no_repeat_ngram_size": (0, 64), "seed": (0, 2**64 - 1),
        "temperature": (0, None), "top_p": (0, 1), "min_p": (0, 1), "length_penalty": (-100, 100),
        "repetition_penalty": (0, 100),
    }
    for name, (lo, hi) in limits.items():
        if name not in options:
            continue
        v = options[name]
        if v < lo or (hi is not None and v > hi) or (name in ("top_p", "repetition_penalty") and v == 0):
            if name == "top_p":
                rule = "in (0, 1]"
            elif name == "repetition_penalty":
                rule = f"in (0, {hi}]"
            else:
                rule = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise APIError(400, f"'{name}' must be {rule}, got {v}", name)
    return options


def resolve_options(defaults: dict, options: dict, stream: bool = False) -> dict:
    """The keyword arguments ``generate`` gets: the task's recipe overridden by the request, a sampling option
    switching to sampling, exactly as :func:`mlx_blip2.pipeline.generation_options` resolves them for ``caption`` and
    ``ask``. Streams decode without beams. Raises APIError for combinations ``generate`` refuses."""
    from .generation.options import resolve as _resolve
    generation_options = lambda d, o: {k: v for k, v in _resolve(d, o).to_dict().items() if v is not None}

    if stream:
        if options.get("num_beams", 1) != 1:
            raise APIError(400, "streaming needs num_beams=1: beam search only knows its text at the end", "num_beams")
        if options.get("num_return_sequences", 1) != 1:
            raise APIError(400, "streaming returns one sequence (n / num_return_sequences must be 1)", "n")
        defaults = {k: v for k, v in defaults.items() if k not in ("length_penalty", "num_return_sequences")}
        defaults["num_beams"] = 1
    try:
        kw = generation_options(defaults, options)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    low, high = kw.get("min_new_tokens", 0), kw.get("max_new_tokens", 20)
    if low > high:
        raise APIError(400, f"min_new_tokens ({low}) must not exceed max_new_tokens ({high})", "min_new_tokens")
    return kw


# --- images ------------------------------------------------------------------------------------------------------

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "HEIF", "AVIF")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_PATH_LIKE = re.compile(r"^(/|~|\.{1,2}/|[a-zA-Z]:[\\/])|\.(jpe?g|png|webp|gif|bmp|tiff?|heic|avif)$", re.IGNORECASE)
_PATH_ERROR = ("'{}' looks like a file path: the server never reads files from its own disk; send the image bytes as "
               "a multipart upload, base64 or a data URL")


def _formats() -> tuple[str, ...]:
    from PIL import Image

    Image.init()
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


def _size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _too_large(what: str, size: int, config: ServerConfig, param: str) -> APIError:
    return APIError(413, f"{what} is {_size(size)}; this server accepts at most {_size(config.max_upload_bytes)} "
                         "per image", param)


def _b64decode(text: str, config: ServerConfig, param: str) -> bytes:
    text = "".join(text.split())
    if len(text) * 3 // 4 > config.max_upload_bytes + 3:
        raise _too_large(f"'{param}'", len(text) * 3 // 4, config, param)
    if "-" in text or "_" in text:  # the URL-safe alphabet
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"'{param}' is not valid base64", param) from None


def image_bytes_from_string(value: str, config: ServerConfig, param: str = "image") -> bytes:
    """The bytes of an image given as a data URL, plain base64 or (when enabled) an http(s) URL."""
    text = value.strip()
    if not text:
        raise APIError(400, f"'{param}' is empty", param)
    scheme = _SCHEME.match(text[:40])
    if scheme and len(scheme.group(1)) > 1:  # "C:\..." is a Windows path, handled below
        name = scheme.group(1).lower()
        if name == "data":
            header, sep, payload = text.partition(",")
            media = header[5:].split(";")[0].strip().lower()
            if not sep or ";base64" not in header.lower():
                raise APIError(400, f"'{param}': data URLs must be base64-encoded (data:image/png;base64,...)", param)
            if media and not (media.startswith("image/") or media == "application/octet-stream"):
                raise APIError(400, f"'{param}': the data URL's media type is {media!r}, not an image", param)
            return _b64decode(payload, config, param)
        if name in ("http", "https"):
            if not config.allow_url_fetch:
                raise APIError(400, f"'{param}': fetching image URLs is disabled on this server (start it with "
                                    "--allow-url-fetch); send the image bytes as a multipart upload, base64 or a "
                                    "data URL", param)
            return _fetch_url(text, config, param)
        raise APIError(400, f"'{param}': {name}: URLs are not accepted (the server never reads files from its own "
                            "disk); send the image bytes as a multipart upload, base64 or a data URL", param)
    try:
        return _b64decode(text, config, param)
    except APIError as e:
        if e.status == 400 and looks_like_path(text):
            raise APIError(400, _PATH_ERROR.format(param), param) from None
        raise


def looks_like_path(text: str) -> bool:
    """Short strings that read like a file path (the error then says why paths are refused)."""
    return len(text) < 4096 and bool(_PATH_LIKE.search(text.strip()))


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.URLError(f"redirect to a non-http(s) URL: {newurl[:100]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_url(url: str, config: ServerConfig, param: str) -> bytes:
    opener = urllib.request.build_opener(_HTTPOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-blip2-server"})
    try:
        with opener.open(request, timeout=config.url_fetch_timeout) as response:
            data = response.read(config.max_upload_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise APIError(400, f"'{param}': could not fetch the image URL: {reason}", param) from None
    if len(data) > config.max_upload_bytes:
        raise _too_large(f"the image at '{param}'", len(data), config, param)
    return data


def decode_image(data: bytes, config: ServerConfig, param: str = "image", size: dict | None = None):
    """Image bytes -> an RGB PIL image (resized to ``size`` when given), or APIError saying what is wrong.

    The pixel count is checked from the header, before anything is decoded.
    """
    from PIL import Image, ImageOps

    from .processing import load_image

    if not data:
        raise APIError(400, f"'{param}' is empty (0 bytes)", param)
    if len(data) > config.max_upload_bytes:
        raise _too_large(f"'{param}'", len(data), config, param)
    try:
        img = Image.open(io.BytesIO(data), formats=_formats())
    except Image.DecompressionBombError as e:
        raise APIError(413, f"'{param}' is too large to decode: {e}", param) from None
    except Exception:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError...: not an image we read
        raise APIError(400, f"'{param}' is not an image in a supported format ({', '.join(_formats())})",
                       param) from None
    w, h = img.size
    if w * h > config.max_pixels:
        raise APIError(413, f"'{param}' is {w}x{h} = {w * h / 1e6:.1f} megapixels; this server accepts at most "
                            f"{config.max_pixels / 1e6:g} megapixels", param)
    if w < 1 or h < 1:
        raise APIError(400, f"'{param}' has no pixels ({w}x{h})", param)
    try:
        img.load()
        rgb = load_image(ImageOps.exif_transpose(img))
        if size is not None and rgb.size != (size["width"], size["height"]):
            rgb = rgb.resize((size["width"], size["height"]), resample=Image.Resampling(size["resample"]),
                             reducing_gap=None)
    except Image.DecompressionBombError as e:
        raise APIError(413, f"'{param}' is too large to decode: {e}", param) from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data, whatever the decoder raises
        raise APIError(400, f"'{param}' could not be decoded ({img.format} data is corrupt or truncated: "
                            f"{str(e)[:120] or type(e).__name__})", param) from None
    return rgb


def _resize_spec(pipeline) -> dict | None:
    """The processor's resize, done while decoding so that the worker's own resize is a copy (PIL returns a copy
    for a same-size resize): the same pixels, with the expensive part off the model thread."""
    ip = getattr(getattr(pipeline, "processor", None), "image_processor", None)
    if ip is None or not getattr(ip, "do_resize", False) or not isinstance(getattr(ip, "size", None), dict):
        return None
    return {"width": ip.size["width"], "height": ip.size["height"], "resample": ip.resample}


# --- batched generation with cancellation ------------------------------------------------------------------------


@dataclass
class Completion:
    text: str
    tokens: int  # new tokens, the end-of-sequence token included
    finish_reason: str  # "stop" (end of sequence) or "length" (max_new_tokens)


def prompt_lengths(pipeline, prompts: list[str | None]) -> list[int]:
    """Language-model prompt lengths (query tokens included) of prompts, as the processor builds them."""
    tok = pipeline.processor.tokenizer
    q = pipeline.model.config.num_query_tokens
    return [q + (len(tok(p)["input_ids"]) if p is not None else 1) for p in prompts]


def generate_batch(pipeline, images: list, prompts: list[str] | None, options: dict, *, eos_token_id=None,
                   should_stop: Callable[[], bool] | None = None) -> list[list[Completion]]:
    """Generate for rows of (image, prompt) in one model call, as ``pipeline.caption``/``ask`` would one by one.

    ``images`` are PIL images; the same object on several rows is encoded once. ``options`` are the keyword
    arguments ``generate`` gets (see :func:`resolve_options`). Returns ``num_return_sequences`` completions per row.
    """
    import mlx.core as mx

    model, processor = pipeline.model, pipeline.processor
    if eos_token_id is None:
        eos_token_id = pipeline.eos_token_ids()
    unique, index, seen = [], [], {}
    for im in images:
        if id(im) not in seen:
            seen[id(im)] = len(unique)
            unique.append(im)
        index.append(seen[id(im)])
    inputs = processor(images=unique, text=prompts, padding=True)
    kwargs = {"eos_token_id": eos_token_id, "pad_token_id": processor.tokenizer.pad_token_id, **options}
    if len(unique) < len(images):  # several prompts on one image: run the vision encoder and Q-Former once for it
        features = model.encode_images(inputs["pixel_values"])
        kwargs["image_features"] = features if index == list(range(len(unique))) else features[mx.array(index)]
    else:
        kwargs["pixel_values"] = inputs["pixel_values"]
    ids = model.generate(input_ids=inputs.get("input_ids"), attention_mask=inputs.get("attention_mask"),
                         should_stop=should_stop, **kwargs).tolist()
    texts = [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
    completions = []
    for row, text in zip(ids, texts):
        end = next((i + 1 for i, t in enumerate(row) if t in eos), None)
        completions.append(Completion(text, end or len(row), "stop" if end else "length"))
    n = len(completions) // len(images)
    return [completions[i * n:(i + 1) * n] for i in range(len(images))]


# --- the model worker ------------------------------------------------------------------------------------------


class Job:
    """One request's work for the model thread. ``key``: jobs with equal keys may share a model call (None: never
    batched). Streams get their pieces through ``events`` (an asyncio queue on ``loop``)."""

    def __init__(self, kind: str, payload: dict, key=None, rows: int = 1, loop=None, events=None):
        self.kind, self.payload, self.key, self.rows = kind, payload, key, rows
        self.loop, self.events = loop, events
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        self.future.cancel()

    def emit(self, item) -> None:
        if self.loop is None or self.cancelled.is_set():
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()


_STOP = object()


class ModelWorker:
    """The one thread that runs the model; batches compatible queued jobs into one call."""

    def __init__(self, pipeline, max_batch: int = 8, batch_window: float = 0.01, max_queue: int = 256):
        self.pipeline = pipeline
        self.max_batch, self.batch_window, self.max_queue = max(1, max_batch), max(0.0, batch_window), max_queue
        self._queue: queue.Queue = queue.Queue()
        self._pending: deque = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._incoming = 0  # requests being read and decoded that will queue a job
        self._lock = threading.Lock()
        self.busy = False
        self.stats = {"batches": 0, "jobs": 0, "rows": 0, "largest_batch": 0, "cancelled": 0, "failed": 0}
        self._eos = None
        if hasattr(pipeline, "eos_token_ids"):
            self._eos = pipeline.eos_token_ids()

    # --- lifecycle ---

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="mlx-blip2-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                job.cancel()
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def queued(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def arrive(self) -> None:
        """A request is being read and will queue a job (``depart`` when it did, or failed): while requests are on
        their way, the batcher waits for them, up to the batch window; when none are, a lone request runs at once."""
        with self._lock:
            self._incoming += 1

    def depart(self) -> None:
        with self._lock:
            self._incoming -= 1

    def submit(self, job: Job) -> Job:
        if self._stopping or self._thread is None:
            raise APIError(503, "the server is shutting down")
        if self.queued() >= self.max_queue:
            raise APIError(503, f"the server is busy ({self.max_queue} requests queued); retry later",
                           headers={"Retry-After": "1"})
        self._queue.put(job)
        return job

    # --- the loop ---

    def _next_batch(self) -> list[Job] | None:
        if not self._pending:
            job = self._queue.get()
            if job is _STOP:
                return None
            self._pending.append(job)
        first = self._pending[0]
        # Take whatever queued up meanwhile; while other requests are still being read, wait for them up to the
        # batch window.
        end = time.monotonic() + (self.batch_window if first.key is not None and self.max_batch > 1 else 0)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = end - time.monotonic()
                if remaining <= 0 or self._incoming == 0:
                    break
                try:
                    job = self._queue.get(timeout=min(remaining, 0.001))
                except queue.Empty:
                    continue
            if job is _STOP:
                self._stopping = True
                self._queue.put(_STOP)
                break
            self._pending.append(job)
            if first.key is not None and sum(j.rows for j in self._pending if j.key == first.key) >= self.max_batch:
                break
        self._pending.popleft()
        batch, rows = [first], first.rows
        if first.key is not None:
            for job in list(self._pending):
                if job.key == first.key and rows + job.rows <= self.max_batch:
                    batch.append(job)
                    rows += job.rows
                    self._pending.remove(job)
        return batch

    def _loop(self) -> None:
        import mlx.core as mx

        try:
            self._serve_jobs()
        finally:
            # MLX gives each thread its own default stream, run by a thread of its own: end it with this one, or
            # interpreter shutdown may destroy it still running and abort the process.
            mx.clear_streams()

    def _serve_jobs(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                for job in self._pending:
                    job.cancel()
                self._pending.clear()
                return
            live = [j for j in batch if not j.cancelled.is_set() and j.future.set_running_or_notify_cancel()]
            self.stats["cancelled"] += len(batch) - len(live)
            if not live:
                continue
            self.busy = True
            self.stats["batches"] += 1
            self.stats["jobs"] += len(live)
            self.stats["rows"] += sum(j.rows for j in live)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], sum(j.rows for j in live))
            try:
                getattr(self, f"_run_{live[0].kind}")(live)
            except Exception as e:  # every failure must reach its requests, never end the thread
                if isinstance(e, Cancelled):
                    self.stats["cancelled"] += len(live)
                else:
                    self.stats["failed"] += len(live)
                    if not isinstance(e, (APIError, ValueError, TypeError)):
                        log.exception("model call failed")
                for job in live:
                    if job.events is not None:
                        job.emit(("error", e))
                    if not job.future.done():
                        job.future.set_exception(e)
            finally:
                self.busy = False

    # --- generation ---

    def _check_context(self, job: Job) -> None:
        """Decoder-only models have a fixed number of positions: prompt + new tokens must fit."""
        model = self.pipeline.model
        if not model.config.use_decoder_only_language_model:
            return
        limit = getattr(model.config.text_config, "max_position_embeddings", None)
        if not limit:
            return
        longest = max(prompt_lengths(self.pipeline, job.payload["prompts"]))
        new = job.payload["options"].get("max_new_tokens", 20)
        if longest + new > limit:
            raise APIError(400, f"the prompt ({longest} tokens with the image's) plus max_new_tokens ({new}) exceed "
                                f"the model's {limit} positions; shorten the text or lower max_new_tokens",
                           "max_new_tokens")

    def _run_generate(self, jobs: list[Job]) -> None:
        ready = []
        for job in jobs:
            try:
                self._check_context(job)
                ready.append(job)
            except APIError as e:
                job.future.set_exception(e)
        if not ready:
            return
        images, prompts = [], []
        for job in ready:
            for prompt in job.payload["prompts"]:
                images.append(job.payload["image"])
                prompts.append(prompt)
        has_prompt = prompts[0] is not None
        results = generate_batch(self.pipeline, images, prompts if has_prompt else None, ready[0].payload["options"],
                                 eos_token_id=self._eos, should_stop=lambda: all(j.cancelled.is_set() for j in ready))
        lengths = prompt_lengths(self.pipeline, prompts)
        i = 0
        for job in ready:
            n = len(job.payload["prompts"])
            job.future.set_result((results[i:i + n], lengths[i:i + n]))
            i += n

    def _run_stream(self, jobs: list[Job]) -> None:
        from .generation import engine as G

        (job,) = jobs
        self._check_context(job)
        p = job.payload
        pipe = self.pipeline
        gen = G.stream_generate(pipe.model, pipe.processor, p["image"], p["prompts"][0], eos_token_id=self._eos,
                                pad_token_id=pipe.processor.tokenizer.pad_token_id, **p["options"])
        try:
            for response in gen:
                if job.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    break
                job.emit(("chunk", response))
        finally:
            gen.close()
        job.emit(("end", prompt_lengths(pipe, p["prompts"])[0]))
        job.future.set_result(None)

    # --- retrieval ---

    def _run_embed_images(self, jobs: list[Job]) -> None:
        images = [im for job in jobs for im in job.payload["images"]]
        embeds = self.pipeline.embed_images(images)
        i = 0
        for job in jobs:
            n = len(job.payload["images"])
            job.future.set_result(embeds[i:i + n])
            i += n

    def _run_embed_texts(self, jobs: list[Job]) -> None:
        texts = [t for job in jobs for t in job.payload["texts"]]
        embeds = self.pipeline.embed_texts(texts)
        tokenizer = getattr(getattr(self.pipeline, "processor", None), "tokenizer", None)
        i = 0
        for job in jobs:
            n = len(job.payload["texts"])
            tokens = sum(len(tokenizer(t)["input_ids"]) for t in job.payload["texts"]) if tokenizer else 0
            job.future.set_result((embeds[i:i + n], tokens))
            i += n

    def _run_match(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.cancelled.is_set():
                job.future.set_exception(Cancelled())
                continue
            p = job.payload
            try:
                if p["mode"] == "itc":
                    scores = self.pipeline.similarity([p["image"]], p["texts"])[0]
                else:
                    scores = self.pipeline.match(p["image"], p["texts"])
                job.future.set_result([float(s) for s in list(scores)])
            except Exception as e:  # noqa: BLE001 - one job's failure is its own
                job.future.set_exception(e)


# --- the HTTP application -------------------------------------------------------------------------------------


def _json_bytes(data) -> bytes:
    return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8", "replace")


def _capabilities(pipeline) -> set[str]:
    caps = set()
    if all(hasattr(pipeline, m) for m in ("caption", "ask", "model", "processor")):
        caps.add("generate")
    if all(hasattr(pipeline, m) for m in ("match", "similarity")):
        caps.add("match")
    if all(hasattr(pipeline, m) for m in ("embed_images", "embed_texts")):
        caps.add("embed")
    return caps


def create_app(pipeline, **limits):
    """The Starlette application serving ``pipeline`` (from :func:`mlx_blip2.pipeline.load`).

    ``limits`` are :class:`ServerConfig` fields (``model_name``, ``max_batch``, ``timeout``, ``max_upload_bytes``,
    ``max_pixels``, ``allow_url_fetch``, ``api_key``...). The model worker starts with the app's lifespan (uvicorn
    runs it); ``app.state.worker`` and ``app.state.config`` are there for inspection.
    """
    from contextlib import asynccontextmanager

    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    known = {f.name for f in fields(ServerConfig)}
    unknown = set(limits) - known
    if unknown:
        raise TypeError(f"unknown server settings: {', '.join(sorted(unknown))}")
    config = ServerConfig(**limits)
    caps = _capabilities(pipeline)
    if not caps:
        raise TypeError(f"{type(pipeline).__name__} has neither caption/ask nor match/embed methods")
    task = "generation" if "generate" in caps else "retrieval"
    worker = ModelWorker(pipeline, config.max_batch, config.batch_window, config.max_queue)
    resize = _resize_spec(pipeline)
    created = int(time.time())
    decode_limiter: list = []

    def json_response(data, status: int = 200, headers: dict | None = None) -> Response:
        return Response(_json_bytes(data), status_code=status, media_type="application/json", headers=headers)

    # --- request parsing ---

    async def read_body(request: Request, limit: int) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError(400, "invalid Content-Length header")
            if int(length) > limit:
                raise APIError(413, f"the request body is {_size(int(length))}; this server accepts at most "
                                    f"{_size(limit)}")
        chunks, total = [], 0
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise APIError(413, f"the request body exceeds this server's {_size(limit)} limit")
                chunks.append(chunk)
        except ClientDisconnect:
            raise _ClientGone() from None
        return b"".join(chunks)

    async def parse_request(request: Request) -> tuple[dict, dict, bool]:
        """(fields, uploads {name: [bytes]}, from_form) of a JSON or multipart/form request."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        per_image = config.max_upload_bytes
        if ctype == "application/json" or ctype.endswith("+json"):
            body = await read_body(request, -(-per_image * 4 // 3) + (1 << 20))  # base64 takes 4/3
            if not body.strip():
                raise APIError(400, "the request body is empty; send a JSON object")
            try:
                data = json.loads(body)
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise APIError(400, f"malformed JSON: {str(e)[:200]}") from None
            if not isinstance(data, dict):
                raise APIError(400, f"the JSON body must be an object, got {type(data).__name__}")
            return data, {}, False
        if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            limit = per_image + (1 << 20)
            body = await read_body(request, limit)

            async def chunks():
                yield body

            class InMemory(MultiPartParser):
                spool_max_size = limit  # the body is capped already: keep uploads in memory, never in temp files

            parser = (InMemory if ctype == "multipart/form-data" else FormParser)
            limits = {"max_files": 64, "max_fields": config.max_texts + 64, "max_part_size": 1 << 20}
            accepted = inspect.signature(parser.__init__).parameters  # older Starlettes take fewer limits
            limits = {k: v for k, v in limits.items() if k in accepted}
            try:
                form = await parser(request.headers, chunks(), **limits).parse()
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
            return data, uploads, True
        raise APIError(415, "send application/json or multipart/form-data (got "
                            f"{ctype or 'no Content-Type'})")

    def check_fields(data: dict, uploads: dict, allowed: set[str], file_fields: set[str]) -> None:
        for key in list(data) + list(uploads):
            if key not in allowed and key not in file_fields:
                raise APIError(400, f"unknown field '{key}'", key)
        for key in uploads:
            if key not in file_fields:
                raise APIError(400, f"'{key}' must be a text field, not a file upload", key)

    def text_value(data: dict, name: str, required: bool = False, allow_list: bool = False):
        value = data.get(name)
        if value is None:
            if required:
                raise APIError(400, f"'{name}' is required", name)
            return None
        items = value if allow_list and isinstance(value, list) else [value]
        if allow_list and isinstance(value, list):
            if not value:
                raise APIError(400, f"'{name}' is an empty list", name)
            if len(value) > config.max_texts:
                raise APIError(400, f"'{name}' has {len(value)} items; at most {config.max_texts} are accepted", name)
        for item in items:
            if not isinstance(item, str):
                what = "a string or a list of strings" if allow_list else "a string"
                raise APIError(400, f"'{name}' must be {what}", name)
            if len(item) > config.max_text_chars:
                raise APIError(400, f"'{name}' is {len(item)} characters long; at most {config.max_text_chars} are "
                                    "accepted", name)
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"'{name}' is not valid Unicode text", name) from None
        return value

    async def load_images(data: dict, uploads: dict, names=("image",), many: bool = False) -> list:
        """The request's images (decoded, checked, resized), from uploads or strings; at least one."""
        sources = []
        for name in names:
            for blob in uploads.get(name, []):
                sources.append((name, blob))
            value = data.get(name)
            if value is None:
                continue
            for item in (value if isinstance(value, list) else [value]):
                if not isinstance(item, str):
                    raise APIError(400, f"'{name}' must be a base64 string or data URL"
                                        f"{' (or a list of them)' if many else ''}", name)
                sources.append((name, item))
        if not sources:
            raise APIError(400, f"'{names[0]}' is required: a multipart file upload, base64 or a data URL", names[0])
        if not many and len(sources) > 1:
            raise APIError(400, f"send one image ('{names[0]}'), got {len(sources)}", names[0])
        if len(sources) > config.max_texts:
            raise APIError(400, f"at most {config.max_texts} images per request", names[0])
        return [await decode_in_thread(name, src) for name, src in sources]

    async def decode_in_thread(name: str, source):
        if not decode_limiter:
            decode_limiter.append(anyio.CapacityLimiter(config.decode_threads or min(8, os.cpu_count() or 1)))

        def work():
            if isinstance(source, bytes):
                return decode_image(source, config, name, resize)
            blob = image_bytes_from_string(source, config, name)
            try:
                return decode_image(blob, config, name, resize)
            except APIError as e:
                if e.status == 400 and looks_like_path(source):  # "/etc/passwd" is valid base64, of garbage
                    raise APIError(400, _PATH_ERROR.format(name), name) from None
                raise

        return await anyio.to_thread.run_sync(work, limiter=decode_limiter[0])

    def require(cap: str, endpoint: str) -> None:
        if cap not in caps:
            need = "a captioning (Blip2ForConditionalGeneration)" if cap == "generate" else "a retrieval " \
                   "(Blip2ForImageTextRetrieval)"
            raise APIError(400, f"{endpoint} needs {need} checkpoint; this server runs {config.model_name} "
                                f"({task})")

    # --- waiting for the worker ---

    async def wait_for(request: Request, awaitable, deadline: float):
        """``awaitable``'s result; APIError 504 past ``deadline``, _ClientGone when the client disconnects."""
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
            raise _ClientGone()
        raise APIError(504, f"the request did not finish within this server's {config.timeout:g} s limit and was "
                            "cancelled")

    def departed(request: Request) -> None:
        if getattr(request.state, "arrived", False):
            request.state.arrived = False
            worker.depart()

    def model_route(handler):
        """Count the request as on its way to the worker until it queued its job (see ModelWorker.arrive)."""
        async def route(request: Request):
            worker.arrive()
            request.state.arrived = True
            try:
                # The time limit covers reading the body and decoding too (a client trickling its upload).
                with anyio.move_on_after(config.timeout + 1):
                    return await handler(request)
                raise APIError(504, f"the request did not finish within this server's {config.timeout:g} s limit")
            finally:
                departed(request)

        return route

    async def run_job(request: Request, job: Job, deadline: float):
        worker.submit(job)
        departed(request)
        try:
            return await wait_for(request, asyncio.wrap_future(job.future), deadline)
        except (APIError, _ClientGone, asyncio.CancelledError):
            job.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - the worker's failure on this request
            raise worker_error(e) from None

    def worker_error(e: BaseException) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, (ValueError, TypeError)):
            return APIError(400, str(e))
        if isinstance(e, Cancelled):
            return APIError(504, "the request was cancelled")
        return APIError(500, "the model failed on this request; see the server log")

    async def run_generate(request: Request, image, prompts: list, kw: dict, deadline: float):
        """(completions per prompt, prompt lengths) for one image and its prompts; ``kw`` from resolve_options."""
        if kw.get("do_sample") and kw.get("seed") is not None:
            key = None  # a seeded sample is reproducible only on its own
        else:
            key = ("generate", tuple(sorted(kw.items())), prompts[0] is not None)
        job = Job("generate", {"image": image, "prompts": prompts, "options": kw}, key=key, rows=len(prompts))
        return await run_job(request, job, deadline)

    # --- endpoints ---

    async def health(request: Request):
        return json_response({"status": "ok", "model": config.model_name, "task": task, "queued": worker.queued(),
                              "busy": worker.busy})

    async def models(request: Request):
        return json_response({"object": "list", "data": [{"id": config.model_name, "object": "model",
                                                          "created": created, "owned_by": "mlx-blip2",
                                                          "task": task}]})

    base_fields = {"model"}

    async def caption(request: Request):
        from .generation.options import CAPTION_DEFAULTS

        deadline = time.monotonic() + config.timeout
        require("generate", "/v1/caption")
        data, uploads, form = await parse_request(request)
        check_fields(data, uploads, base_fields | {"image", "prompt"} | set(OPTION_TYPES), {"image"})
        prompt = text_value(data, "prompt")
        kw = resolve_options(CAPTION_DEFAULTS, parse_options(data, config, form))
        (image,) = await load_images(data, uploads)
        results, _ = await run_generate(request, image, [prompt], kw, deadline)
        out = {"model": config.model_name, "caption": results[0][0].text}
        if len(results[0]) > 1:
            out["captions"] = [c.text for c in results[0]]
        return json_response(out)

    async def ask(request: Request):
        from .generation.options import VQA_DEFAULTS, VQA_TEMPLATE

        deadline = time.monotonic() + config.timeout
        require("generate", "/v1/ask")
        data, uploads, form = await parse_request(request)
        check_fields(data, uploads, base_fields | {"image", "question", "template"} | set(OPTION_TYPES), {"image"})
        question = text_value(data, "question", required=True, allow_list=True)
        template = text_value(data, "template") or VQA_TEMPLATE
        if template.count("{}") != 1:
            raise APIError(400, "'template' must contain '{}' exactly once (where the question goes)", "template")
        questions = question if isinstance(question, list) else [question]
        kw = resolve_options(VQA_DEFAULTS, parse_options(data, config, form))
        (image,) = await load_images(data, uploads)
        results, _ = await run_generate(request, image, [template.replace("{}", q) for q in questions], kw, deadline)
        out: dict[str, Any] = {"model": config.model_name}
        if isinstance(question, list):
            out["answers"] = [r[0].text for r in results]
        else:
            out["answer"] = results[0][0].text
            if len(results[0]) > 1:
                out["answers"] = [c.text for c in results[0]]
        return json_response(out)

    chat_fields = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                   "temperature", "top_p", "n", "seed", "stop", "frequency_penalty", "presence_penalty", "user",
                   "logprobs", "response_format", "top_k", "min_p", "num_beams", "length_penalty",
                   "repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "do_sample"}

    def chat_prompt(messages) -> tuple[str, str | None]:
        """(image source, prompt) from OpenAI messages: user turns become "Question: ... Answer:" and assistant
        turns their answers, as BLIP-2 was prompted for conversations; no text at all means a caption."""
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", "messages")
        images, turns = [], []
        for i, message in enumerate(messages):
            param = f"messages[{i}]"
            if not isinstance(message, dict):
                raise APIError(400, f"'{param}' must be an object", param)
            # Clients echo assistant messages back with empty extras (refusal, tool_calls...): those are fine.
            extra = sorted(k for k, v in message.items() if k not in ("role", "content", "name") and v)
            if extra:
                raise APIError(400, f"'{param}.{extra[0]}' is not supported by this server", param)
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "developer", "user", "assistant"):
                raise APIError(400, f"'{param}.role' must be system, developer, user or assistant", param)
            if content is None:
                content = []
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise APIError(400, f"'{param}.content' must be a string or a list of parts", param)
            texts = []
            for j, part in enumerate(parts):
                pp = f"{param}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise APIError(400, f"'{pp}.image_url.url' must be a string (a data URL)", pp)
                    if role != "user":
                        raise APIError(400, f"'{pp}': only user messages may carry images", pp)
                    images.append((pp, url))
                else:
                    raise APIError(400, f"'{pp}' must be a text part or an image_url part", pp)
            text = " ".join(t.strip() for t in texts if t.strip())
            if len(text) > config.max_text_chars:
                raise APIError(400, f"'{param}' is longer than {config.max_text_chars} characters", param)
            if role in ("user", "assistant"):
                turns.append((role, text))
        if len(images) != 1:
            raise APIError(400, f"BLIP-2 needs exactly one image per conversation (an image_url part with a data "
                                f"URL), got {len(images)}", "messages")
        if not turns or turns[-1][0] != "user":
            raise APIError(400, "the last message must be the user's", "messages")
        if not any(text for _, text in turns):
            return images[0], None
        pieces = []
        for role, text in turns:
            if role == "user" and text:
                pieces.append(f"Question: {text} Answer:")
            elif role == "assistant" and text:
                pieces.append(text)
        return images[0], " ".join(pieces)

    async def chat_completions(request: Request):
        from .generation.options import CAPTION_DEFAULTS, VQA_DEFAULTS

        deadline = time.monotonic() + config.timeout
        require("generate", "/v1/chat/completions")
        data, uploads, _ = await parse_request(request)
        if uploads:
            raise APIError(400, "send chat completions as JSON, images as image_url data URLs")
        check_fields(data, {}, chat_fields, set())
        (param, source), prompt = chat_prompt(data.get("messages"))
        stream = data.get("stream") or False
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be true or false", "stream")
        for name, ok in (("stop", None), ("logprobs", False), ("frequency_penalty", 0), ("presence_penalty", 0)):
            if data.get(name) not in (None, ok):
                raise APIError(400, f"'{name}' is not supported by this server", name)
        if data.get("response_format") not in (None, {"type": "text"}):
            raise APIError(400, "only text responses are supported", "response_format")
        stream_options = data.get("stream_options")
        if stream_options is not None and (not isinstance(stream_options, dict)
                                           or set(stream_options) - {"include_usage"}):
            raise APIError(400, "'stream_options' may only hold include_usage", "stream_options")
        raw = {k: v for k, v in data.items() if k in OPTION_TYPES}
        renamed = {}  # our option -> the OpenAI name the client used
        for ours, theirs in (("max_new_tokens", "max_tokens"), ("max_new_tokens", "max_completion_tokens"),
                             ("num_return_sequences", "n")):
            if data.get(theirs) is not None:
                raw[ours] = _coerce(theirs, data[theirs], int, False)
                renamed[ours] = theirs
        try:
            options = parse_options(raw, config)
        except APIError as e:
            if e.param in renamed and e.param not in data:
                e.message = e.message.replace(f"'{e.param}'", f"'{renamed[e.param]}'")
                e.param = renamed[e.param]
            raise
        defaults = CAPTION_DEFAULTS if prompt is None else VQA_DEFAULTS
        kw = resolve_options(defaults, options, stream=stream)
        image = await decode_in_thread(param, source)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        if stream:
            include_usage = bool((stream_options or {}).get("include_usage"))
            return await chat_stream(request, image, prompt, kw, cid, now, include_usage, deadline)
        results, prompt_tokens = await run_generate(request, image, [prompt], kw, deadline)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(results[0])]
        completion = sum(c.tokens for c in results[0])
        return json_response({"id": cid, "object": "chat.completion", "created": now, "model": config.model_name,
                              "choices": choices, "usage": {"prompt_tokens": prompt_tokens[0],
                                                            "completion_tokens": completion,
                                                            "total_tokens": prompt_tokens[0] + completion}})

    async def chat_stream(request: Request, image, prompt, kw: dict, cid: str, now: int, include_usage: bool,
                          deadline: float):
        loop = asyncio.get_running_loop()
        job = Job("stream", {"image": image, "prompts": [prompt], "options": kw}, loop=loop, events=asyncio.Queue())
        worker.submit(job)
        departed(request)
        try:
            first = await wait_for(request, job.events.get(), deadline)
        except BaseException:
            job.cancel()
            raise
        if first[0] == "error":
            job.cancel()
            raise worker_error(first[1])

        def chunk(delta: dict, finish_reason=None, usage=None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": config.model_name,
                    "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish_reason}]}
            if usage:
                body["usage"] = usage
            return f"data: {_json_bytes(body).decode()}\n\n"

        async def events():
            item, finish, tokens, started = first, "stop", 0, False
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = item
                    if kind == "chunk":
                        text = value.text if started else value.text.lstrip()  # as the non-streamed text is stripped
                        if text:
                            started = True
                            yield chunk({"content": text})
                        if value.finish_reason:
                            finish, tokens = value.finish_reason, value.generation_tokens
                    elif kind == "error":
                        error = worker_error(value)
                        yield f"data: {_json_bytes(error.body()).decode()}\n\n"
                        return
                    else:  # "end"
                        yield chunk({}, finish)
                        if include_usage:
                            yield chunk({}, usage={"prompt_tokens": value, "completion_tokens": tokens,
                                                   "total_tokens": value + tokens})
                        yield "data: [DONE]\n\n"
                        return
                    remaining = deadline - time.monotonic()
                    try:
                        item = await asyncio.wait_for(job.events.get(), max(remaining, 0.001))
                    except asyncio.TimeoutError:
                        error = APIError(504, f"the stream did not finish within this server's {config.timeout:g} s "
                                              "limit and was cancelled")
                        yield f"data: {_json_bytes(error.body()).decode()}\n\n"
                        return
            finally:
                job.cancel()  # a client that went away frees the model between two tokens

        class JobStream(StreamingResponse):
            async def __call__(self, scope, receive, send):
                try:
                    await super().__call__(scope, receive, send)
                finally:  # the body finished, failed, or Starlette stopped it because the client disconnected
                    job.cancel()

        return JobStream(events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def match(request: Request):
        deadline = time.monotonic() + config.timeout
        require("match", "/v1/match")
        data, uploads, _ = await parse_request(request)
        check_fields(data, uploads, base_fields | {"image", "texts", "mode"}, {"image"})
        texts = text_value(data, "texts", required=True, allow_list=True)
        texts = texts if isinstance(texts, list) else [texts]
        mode = data.get("mode", "itm")
        if mode not in ("itm", "itc"):
            raise APIError(400, "'mode' must be 'itm' (image-text matching probability) or 'itc' (contrastive "
                                "similarity)", "mode")
        (image,) = await load_images(data, uploads)
        job = Job("match", {"image": image, "texts": texts, "mode": mode}, key=("match",), rows=1)
        scores = await run_job(request, job, deadline)
        return json_response({"model": config.model_name, "mode": mode, "texts": texts, "scores": scores})

    async def embeddings(request: Request):
        deadline = time.monotonic() + config.timeout
        require("embed", "/v1/embeddings")
        data, uploads, _ = await parse_request(request)
        check_fields(data, uploads, base_fields | {"input", "image", "images", "encoding_format", "user",
                                                   "dimensions"}, {"image", "images"})
        fmt = data.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise APIError(400, "'encoding_format' must be 'float' or 'base64'", "encoding_format")
        if data.get("dimensions") is not None:
            raise APIError(400, "'dimensions' is not supported: the embedding size is fixed by the model",
                           "dimensions")
        has_images = any(k in data or k in uploads for k in ("image", "images"))
        if has_images == ("input" in data):
            raise APIError(400, "send either 'input' (texts) or 'image'/'images', not both" if has_images else
                                "'input' (a text or a list of texts) or 'image'/'images' is required", "input")
        if has_images:
            images = await load_images(data, uploads, ("image", "images"), many=True)
            job = Job("embed_images", {"images": images}, key=("embed_images",), rows=len(images))
            usage = 0
        else:
            texts = text_value(data, "input", required=True, allow_list=True)
            texts = texts if isinstance(texts, list) else [texts]
            job = Job("embed_texts", {"texts": texts}, key=("embed_texts",), rows=len(texts))
        vectors = await run_job(request, job, deadline)
        if not has_images:
            vectors, usage = vectors
        import numpy as np

        items = []
        for i, v in enumerate(vectors):
            v = np.asarray(v, dtype=np.float32)
            value = base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
            items.append({"object": "embedding", "index": i, "embedding": value})
        return json_response({"object": "list", "data": items, "model": config.model_name,
                              "usage": {"prompt_tokens": usage, "total_tokens": usage}})

    # --- errors, auth, lifecycle ---

    async def api_error(request: Request, exc: APIError):
        return json_response(exc.body(), exc.status, exc.headers)

    async def http_error(request: Request, exc: HTTPException):
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        error = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)))
        return json_response(error.body(), exc.status_code, getattr(exc, "headers", None))

    async def client_gone(request: Request, exc: _ClientGone):
        return Response(status_code=499)

    async def server_error(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return json_response(APIError(500, "internal server error; see the server log").body(), 500)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(worker.stop)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/caption", model_route(caption), methods=["POST"]),
        Route("/v1/ask", model_route(ask), methods=["POST"]),
        Route("/v1/chat/completions", model_route(chat_completions), methods=["POST"]),
        Route("/v1/match", model_route(match), methods=["POST"]),
        Route("/v1/embeddings", model_route(embeddings), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: api_error, HTTPException: http_error, _ClientGone: client_gone,
                                        Exception: server_error})
    app.state.config, app.state.worker, app.state.pipeline = config, worker, pipeline
    if config.api_key:
        return _APIKeyMiddleware(app, config.api_key)
    return app


class _APIKeyMiddleware:
    """Every path but /health needs ``Authorization: Bearer KEY`` (or ``X-API-Key: KEY``)."""

    def __init__(self, app, api_key: str):
        self.app, self._key = app, api_key.encode()
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"x-api-key", b"")
            auth = headers.get(b"authorization", b"")
            if auth[:7].lower() == b"bearer ":
                given = auth[7:].strip()
            if not hmac.compare_digest(given, self._key):
                error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": _json_bytes(error.body())})
                return
        await self.app(scope, receive, send)


# --- running it ------------------------------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; without it small responses wait ~40 ms for
    # delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """uvicorn serving ``app`` on a thread (for tests, examples and benchmarks): ``with BackgroundServer(app) as s:
    s.url``. Port 0 picks a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self._sock = _bind(host, port)
        self.host, self.port = host, self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_keep_alive=5))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="mlx-blip2-http")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve captioning, VQA and retrieval over HTTP (needs the server extra)",
                       description="A local HTTP server: /v1/caption, /v1/ask, /v1/chat/completions (OpenAI), "
                                   "/v1/match, /v1/embeddings, /v1/models, /health.")
    p.add_argument("--model", "-m", default=None, help="checkpoint directory or Hub repo id "
                   "(default: Salesforce/blip2-opt-2.7b)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute precision (default: float32 on the CPU, float16 on a GPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--max-batch", type=int, default=8, help="most images x questions in one model call (default: 8)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="most time to wait for requests still being read, to batch them together (default: 10 ms)")
    p.add_argument("--api-key", default=os.environ.get("MLX_BLIP2_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $MLX_BLIP2_API_KEY)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image accepted, MB (default: 20)")
    p.add_argument("--max-pixels", type=float, default=50e6, help="largest image accepted, pixels (default: 50e6)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a request may take, queueing included, before it is cancelled (default: 120)")
    p.add_argument("--max-queue", type=int, default=256, help="queued requests beyond this get 503 (default: 256)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="largest max_new_tokens a request may ask for")
    p.add_argument("--allow-url-fetch", action="store_true",
                   help="let requests name http(s) image URLs for the server to fetch (off by default)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    missing = missing_server_packages()
    if missing:
        print(f"error: `mlx-blip2 serve` needs {', '.join(missing)}: {INSTALL_HINT}", file=sys.stderr)
        return 2
    import mlx.core as mx
    import uvicorn

    from .pipelines import DEFAULT_MODEL, load

    if args.max_batch < 1 or args.max_upload_mb <= 0 or args.max_pixels < 1 or args.timeout <= 0:
        print("error: --max-batch, --max-upload-mb, --max-pixels and --timeout must be positive", file=sys.stderr)
        return 2
    loopback = args.host in ("127.0.0.1", "localhost", "::1") or args.host.startswith("127.")
    if not loopback and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this address can use the "
              "model", file=sys.stderr)
    name = args.model or DEFAULT_MODEL
    print(f"loading {name}...", file=sys.stderr)
    pipeline = load(name, dtype=getattr(mx, args.dtype) if args.dtype else None)
    app = create_app(pipeline, model_name=str(name), max_batch=args.max_batch,
                     batch_window=args.batch_window_ms / 1000, api_key=args.api_key or None,
                     max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=int(args.max_pixels),
                     timeout=args.timeout, max_queue=args.max_queue, max_new_tokens=args.max_new_tokens,
                     allow_url_fetch=args.allow_url_fetch)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5)
    return 0
