"""``POST /api/caption/ID``: a person's correction of a caption, from the search page (``--allow-edits`` only).

The body is JSON, ``{"caption": "Rex on the beach"}``; the answer is the corrections file's record plus
``corrected: true``. What a correction writes (the sidecar, the index, the corrections file) is
:mod:`mlx_blip2.photo_index.corrections`'s. A correction writes into the person's library, so it is refused:

- without ``--allow-edits`` (403; the page then shows no edit control either);
- from any page but this server's own (:func:`.door.require_same_origin`: the ``Origin`` must be the server's,
  the body JSON, which a cross-site form cannot send);
- without the page's CSRF token in ``X-CSRF-Token`` (403): a random token made when the server starts, written into
  the page, which another origin cannot read;
- for an id the page would not serve (a file outside the library, deleted, a symlink out: 403/404).
"""

from __future__ import annotations

import hmac
import json

import anyio
from starlette.requests import Request

from ..photo_index.captions import MAX_CAPTION_CHARS
from ..photo_index.corrections import CorrectionError
from .door import require_same_origin
from .errors import APIError
from .page_index import NotServable
from .transport import json_response, read_body

MAX_BODY = 16 * 1024


def _caption(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        raise APIError(400, "the body is not JSON; send {\"caption\": \"...\"}", "caption") from None
    caption = data.get("caption") if isinstance(data, dict) else None
    if not isinstance(caption, str) or not caption.strip():
        raise APIError(400, "'caption' must be a non-empty string", "caption")
    if len(caption) > MAX_CAPTION_CHARS:
        raise APIError(400, f"'caption' is longer than {MAX_CAPTION_CHARS} characters", "caption")
    return caption


async def edit_caption(request: Request):
    sp = request.app.state.search_page
    if not sp.allow_edits:
        raise APIError(403, "correcting captions is off: start the server with --allow-edits", type="forbidden")
    require_same_origin(request)
    token = request.headers.get("x-csrf-token", "")
    if not hmac.compare_digest(token.encode("utf-8", "replace"), sp.csrf.encode()):
        raise APIError(403, "missing or wrong CSRF token (X-CSRF-Token); reload the page", "x-csrf-token",
                       type="forbidden")
    caption = _caption(await read_body(request, MAX_BODY))
    entry_id = request.path_params["entry_id"]
    try:
        entry, _, _ = await anyio.to_thread.run_sync(sp.index.servable_path, entry_id)
    except NotServable as e:
        raise APIError(e.status, e.message) from None

    def save():
        previous, _ = sp.caption_of(entry.path, sp.index.captions([entry_id]).get(entry_id))
        return sp.index.correct(entry_id, caption, previous, sp.new_sidecar)

    try:
        record = await anyio.to_thread.run_sync(save, limiter=sp.limiter())
    except CorrectionError as e:
        raise APIError(e.status, str(e), "caption") from None
    return json_response({**record, "corrected": True}, headers={"Cache-Control": "no-store"})
