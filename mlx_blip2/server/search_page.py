"""The photo search page, served with an index (``mlx-blip2 serve -m RETRIEVAL_CHECKPOINT --index library.sqlite``):

- ``GET /`` the page; ``/?q=TEXT`` renders its results on the server (bookmarkable, works without JavaScript),
  ``/?like=ID`` the images most like an indexed one; ``k`` results (default 60, at most 200); ``mode`` image, text
  or hybrid (default; :mod:`mlx_blip2.photo_index.fusion`); filters ``folder`` (an absolute folder),
  ``from`` / ``to`` (dates taken, YYYY-MM-DD) and ``corrected`` (yes / no), all in the address; filters without a
  query list the photos that pass, newest first
- ``GET /api/search?q=TEXT`` (or ``?like=ID``) the same results as JSON, for the page's live search
- ``POST /api/caption/ID`` a person's correction of a caption (only with ``allow_edits``: :mod:`.page_edit`)
- ``GET /thumb/ID`` a thumbnail (JPEG, at most 512 px, made once and cached in ``library.sqlite.thumbs/``)
- ``GET /image/ID`` the full image (as stored when browsers show its format, else converted to JPEG)
- ``GET /static/search.css``, ``search.js``, ``favicon.svg``: the page's own files (package data)

Files are addressed by the index's ids only, never by a path from the request, and served only from inside the
library (:mod:`.page_index`). Text queries are embedded by the model worker, batched with the other requests.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
import time
from collections import OrderedDict
from importlib import resources
from urllib.parse import quote

import anyio
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

from ..files import display_path
from ..images import ImageLoadError, open_image
from .captions_lookup import CaptionLookup
from .context import ServerContext
from .errors import APIError
from ..photo_index.filters import FilterError
from ..photo_index.search import MODES
from .page_html import PAGE_HEADERS, Hit, PageState, View, login_html, page_html, status_text
from .page_index import LibraryIndex, NotServable
from .thumbnails import THUMB_SIZE, ThumbnailCache
from .transport import json_response
from .worker import Job

log = logging.getLogger("mlx_blip2.server")

DEFAULT_K, MAX_K = 60, 200
ASSETS = ("search.css", "search.js", "favicon.svg")
ASSET_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
# Formats every current browser shows: sent as stored. Anything else (HEIC, TIFF, RAW...) is converted to JPEG.
BROWSER_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
                 ".webp": "image/webp", ".bmp": "image/bmp", ".avif": "image/avif"}
SPARE = 20  # results asked for beyond k, in place of files deleted (or moved out) since they were indexed
EMBED_CACHE = 256  # query embeddings kept (typing repeats queries)


def load_assets() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, version) of the page's static files, read once from the package."""
    folder = resources.files(__package__).joinpath("static")
    out = {}
    for name in ASSETS:
        data = folder.joinpath(name).read_bytes()
        out[name] = (data, hashlib.sha256(data).hexdigest()[:12])
    return out


class SearchPage:
    """What the page's routes share: the index, thumbnails, captions, static files, cached query embeddings."""

    def __init__(self, ctx: ServerContext, index: str | os.PathLike, captions=(), sidecars: bool = True,
                 thumb_size: int = THUMB_SIZE, allow_edits: bool = False, new_sidecar: str = "xmp"):
        if ctx.kind != "retrieval":
            raise ValueError(f"the search page needs a retrieval checkpoint (e.g. Salesforce/blip2-itm-vit-g); "
                             f"this server runs {ctx.config.model_name}")
        self.ctx = ctx
        self.index = LibraryIndex(index)
        self.thumbs = ThumbnailCache.beside(self.index.path, thumb_size=thumb_size,
                                            max_pixels=ctx.config.max_pixels)
        self.captions = CaptionLookup(captions, sidecars, allowed=self.in_library)
        self.assets = load_assets()
        self.asset_urls = {name: f"/static/{name}?v={version}" for name, (_, version) in self.assets.items()}
        self.allow_edits, self.new_sidecar = allow_edits, new_sidecar
        self.csrf = secrets.token_urlsafe(32) if allow_edits else None  # in the page; other origins cannot read it
        self._embeds: OrderedDict[str, object] = OrderedDict()
        self._limiter: anyio.CapacityLimiter | None = None

    def close(self) -> None:
        self.index.close()

    def in_library(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.index.roots())

    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:  # made on the event loop
            self._limiter = anyio.CapacityLimiter(max(1, min(4, os.cpu_count() or 1)))
        return self._limiter

    def login_page(self, failed: bool, next_url: str) -> str:
        return login_html(self.asset_urls, failed, next_url)

    # --- searching ---

    async def text_embedding(self, request: Request, query: str):
        cached = self._embeds.get(query)
        if cached is not None:
            self._embeds.move_to_end(query)
            return cached
        ctx = self.ctx
        job = Job("embed_texts", {"texts": [query]}, key=("embed_texts",), rows=1)
        vectors, _ = await ctx.run_job(request, job, time.monotonic() + ctx.config.timeout)
        self._embeds[query] = vectors[0]
        while len(self._embeds) > EMBED_CACHE:
            self._embeds.popitem(last=False)
        return vectors[0]

    def caption_of(self, path: str, indexed: tuple[str, bool] | None) -> tuple[str | None, bool]:
        """(caption, corrected) to show: a person's correction first, then the caption files and sidecars read
        now (:class:`.captions_lookup.CaptionLookup`), then the index's caption."""
        if indexed is not None and indexed[1]:
            return indexed
        shown = self.captions.caption(path)
        if shown is not None:
            return shown, False
        return (indexed[0], False) if indexed is not None else (None, False)

    def hits(self, ranked: list[tuple[int, float]]) -> list[Hit]:
        """The results to show: files deleted since they were indexed, or now outside the library, left out."""
        out = []
        indexed = self.index.captions([i for i, _ in ranked])
        for entry_id, score in ranked:
            try:
                entry, _, _ = self.index.servable_path(entry_id)
            except NotServable:
                continue
            shown = display_path(entry.path)
            caption, corrected = self.caption_of(entry.path, indexed.get(entry_id))
            out.append(Hit(entry_id, score, os.path.basename(shown), shown, caption, corrected))
        return out

    async def search(self, request: Request) -> PageState:
        """The page state a request asks for (``q`` or ``like``, ``k``, ``mode``, filters); APIError 400 for bad
        parameters."""
        params = request.query_params
        query = " ".join(params.get("q", "").split())
        like = parse_id(params.get("like"), "like") if params.get("like") else None
        k = parse_k(params.get("k"))
        if len(query) > self.ctx.config.max_text_chars:
            raise APIError(400, f"the query is longer than {self.ctx.config.max_text_chars} characters", "q")
        state = PageState(query=query, like=like, total=await anyio.to_thread.run_sync(self.index.count),
                          mode=parse_mode(params.get("mode")), view=parse_view(params), edits=self.allow_edits,
                          csrf=self.csrf, folders=await anyio.to_thread.run_sync(self.index.folders))
        filters = state.view.filters()
        if not query and like is None and not filters.active():
            return state
        start = time.perf_counter()
        if like is not None:
            entry = self.index.entry(like)
            if entry is None:
                raise APIError(404, f"no indexed image has id {like}", "like")
            state.like_name = os.path.basename(display_path(entry.path))
            ranked = await anyio.to_thread.run_sync(self.index.similar, like, k + SPARE, filters) or []
        elif not query:
            ranked = await anyio.to_thread.run_sync(self.index.browse, filters, k + SPARE)
        else:
            embedding = None if state.mode == "text" else await self.text_embedding(request, query)
            ranked = await anyio.to_thread.run_sync(self.index.ranked, state.mode, query, embedding, k + SPARE,
                                                    filters)
        state.hits = (await anyio.to_thread.run_sync(self.hits, ranked))[:k]
        state.took_ms = (time.perf_counter() - start) * 1000
        return state


def parse_id(value: str | None, param: str) -> int:
    if value is None or not value.isdigit() or len(value) > 19:
        raise APIError(400, f"'{param}' must be an image id (a positive integer)", param)
    return int(value)


def parse_mode(value: str | None) -> str:
    if value in (None, ""):
        return "hybrid"
    if value not in MODES:
        raise APIError(400, f"'mode' must be one of {', '.join(MODES)}", "mode")
    return value


def parse_view(params) -> View:
    """The filters of a request (empty values: no filter); APIError 400 naming a bad one."""
    corrected = params.get("corrected") or ""
    if corrected not in ("", "yes", "no"):
        raise APIError(400, "'corrected' must be yes or no", "corrected")
    view = View(params.get("folder") or "", params.get("from") or "", params.get("to") or "", corrected)
    try:
        view.filters()
    except FilterError as e:
        raise APIError(400, str(e), e.param) from None
    return view


def parse_k(value: str | None) -> int:
    if value in (None, ""):
        return DEFAULT_K
    if not value.isdigit() or not 1 <= int(value) <= MAX_K:
        raise APIError(400, f"'k' must be an integer from 1 to {MAX_K}", "k")
    return int(value)


def page(request: Request) -> SearchPage:
    return request.app.state.search_page


def html_response(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)


# --- routes ---


async def home(request: Request):
    sp = page(request)
    k = DEFAULT_K
    try:
        k = parse_k(request.query_params.get("k"))
        state = await sp.search(request)
        status = 200
    except APIError as e:
        query = " ".join(request.query_params.get("q", "").split())
        state, status = PageState(query=query, error=e.message, edits=sp.allow_edits, csrf=sp.csrf), e.status
    except Exception as e:  # noqa: BLE001 - the index failed (e.g. built with another model): say so on the page
        log.error("search failed", exc_info=e)
        state, status = PageState(error=f"the search failed: {e}"), 500
    return html_response(page_html(state, sp.asset_urls, k), status)


async def api_search(request: Request):
    sp = page(request)
    state = await sp.search(request)
    return json_response({"query": state.query, "like": state.like, "total": state.total, "mode": state.mode,
                          "filters": state.view.params(), "edits": state.edits,
                          "took_ms": round(state.took_ms, 1), "status": status_text(state),
                          "results": [h.to_dict() for h in state.hits or []]}, headers={"Cache-Control": "no-store"})


def servable(sp: SearchPage, request: Request):
    entry_id = request.path_params["entry_id"]
    try:
        return sp.index.servable_path(entry_id)
    except NotServable as e:
        raise APIError(e.status, e.message) from None


async def thumb(request: Request):
    sp = page(request)
    entry, real, st = await anyio.to_thread.run_sync(servable, sp, request)
    try:
        data, key = await anyio.to_thread.run_sync(sp.thumbs.get, real, st.st_size, st.st_mtime_ns,
                                                   limiter=sp.limiter())
    except (OSError, ImageLoadError) as e:
        raise APIError(422, f"image {entry.id} cannot be read: {display_path(str(e))}") from None
    etag = f'"{key}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="image/jpeg", headers=headers)


def as_jpeg(path: str, max_pixels: int) -> bytes:
    out = io.BytesIO()
    open_image(path, max_pixels=max_pixels).save(out, "JPEG", quality=92)
    return out.getvalue()


async def image(request: Request):
    sp = page(request)
    entry, real, st = await anyio.to_thread.run_sync(servable, sp, request)
    name = os.path.basename(display_path(entry.path))
    headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff",
               "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}"}
    media_type = BROWSER_TYPES.get(os.path.splitext(real)[1].lower())
    if media_type is not None:
        return FileResponse(real, media_type=media_type, headers=headers, stat_result=st)
    try:
        data = await anyio.to_thread.run_sync(as_jpeg, real, sp.ctx.config.max_pixels, limiter=sp.limiter())
    except (OSError, ImageLoadError) as e:
        raise APIError(422, f"image {entry.id} cannot be read: {display_path(str(e))}") from None
    headers["Content-Disposition"] = f"inline; filename*=UTF-8''{quote(os.path.splitext(name)[0] + '.jpg')}"
    return Response(data, media_type="image/jpeg", headers=headers)


def asset_route(name: str):
    async def serve_asset(request: Request):
        data, version = page(request).assets[name]
        headers = {"ETag": f'"{version}"', "X-Content-Type-Options": "nosniff",
                   "Cache-Control": "public, max-age=86400"}
        if request.headers.get("if-none-match") == headers["ETag"]:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=ASSET_TYPES[os.path.splitext(name)[1]], headers=headers)

    return serve_asset


def add_search_page(app, ctx: ServerContext, index: str | os.PathLike, captions=(), sidecars: bool = True,
                    thumb_size: int = THUMB_SIZE, allow_edits: bool = False, new_sidecar: str = "xmp") -> SearchPage:
    """Mount the search page on ``app`` (``app.state.search_page``; close it when the app stops). With
    ``allow_edits`` each result's caption can be corrected on the page (:mod:`.page_edit`); ``new_sidecar`` (xmp or
    txt) is the sidecar made for a photo that has none."""
    from .page_edit import edit_caption

    sp = SearchPage(ctx, index, captions, sidecars, thumb_size, allow_edits, new_sidecar)
    app.state.search_page = sp
    get = ["GET", "HEAD"]
    app.add_route("/", home, methods=get, include_in_schema=False)
    app.add_route("/api/search", api_search, methods=get, include_in_schema=False)
    app.add_route("/thumb/{entry_id:int}", thumb, methods=get, include_in_schema=False)
    app.add_route("/image/{entry_id:int}", image, methods=get, include_in_schema=False)
    app.add_route("/api/caption/{entry_id:int}", edit_caption, methods=["POST"], include_in_schema=False)
    for name in ASSETS:
        app.add_route(f"/static/{name}", asset_route(name), methods=get, include_in_schema=False)
    return sp


__all__ = ["DEFAULT_K", "MAX_K", "SearchPage", "add_search_page"]
