"""The search page's HTML, rendered on the server (every value escaped with :func:`html.escape`), so that a results
page (``/?q=...``) can be bookmarked and works without JavaScript. ``static/search.js`` improves it when it runs
(live search, keyboard navigation) and builds the same markup from ``/api/search``."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from urllib.parse import urlencode

# Nothing but this server: no CDN, no external font, no inline script or style.
CSP = ("default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store"}


@dataclass
class Hit:
    """One result as the page shows it (also the JSON of ``/api/search``)."""

    id: int
    score: float
    name: str  # the file name (valid UTF-8)
    path: str  # the full path (valid UTF-8), shown as a tooltip
    caption: str | None
    corrected: bool = False  # the caption is a person's correction

    def to_dict(self) -> dict:
        return {"id": self.id, "score": round(self.score, 4), "name": self.name, "path": self.path,
                "caption": self.caption, "corrected": self.corrected, "thumb": f"/thumb/{self.id}",
                "image": f"/image/{self.id}", "like": "/?" + urlencode({"like": self.id})}


@dataclass(frozen=True)
class View:
    """The filters as the address holds them (empty: no filter)."""

    folder: str = ""
    date_from: str = ""
    date_to: str = ""
    corrected: str = ""  # "", "yes", "no"

    def filters(self):
        from ..photo_index.filters import Filters

        return Filters(self.folder or None, self.date_from or None, self.date_to or None,
                       {"yes": True, "no": False}.get(self.corrected))

    def params(self) -> dict[str, str]:
        """The address parameters of the filters that are set."""
        named = {"folder": self.folder, "from": self.date_from, "to": self.date_to, "corrected": self.corrected}
        return {k: v for k, v in named.items() if v}


@dataclass
class PageState:
    query: str = ""
    like: int | None = None  # "more like this": the id of the image searched by
    like_name: str | None = None
    hits: list[Hit] | None = None  # None: nothing searched yet
    error: str | None = None
    total: int = 0  # searchable images in the index
    took_ms: float = 0.0
    mode: str = "hybrid"
    view: View = View()
    folders: list[str] | None = None  # the folder filter's choices
    edits: bool = False  # corrections allowed (the server's --allow-edits)
    csrf: str | None = None  # the token a correction must carry


def status_text(state: PageState) -> str:
    if state.error:
        return state.error
    if state.hits is None:
        return f"{state.total} photos indexed. Type what you are looking for."
    n = len(state.hits)
    if state.like is None and not state.query:
        return f"{n} photo{'s' if n != 1 else ''} (filtered, newest first)"
    what = f"images like {state.like_name}" if state.like is not None else f"\u201c{state.query}\u201d"
    return f"{n} result{'s' if n != 1 else ''} for {what} ({state.took_ms:.0f} ms)"


def hit_html(hit: Hit, rank: int, edits: bool = False) -> str:
    caption = hit.caption or hit.name
    alt = hit.caption or hit.name
    like = escape("/?" + urlencode({"like": hit.id}))
    corrected = ' <span class="corrected" title="corrected by hand">corrected</span>' if hit.corrected else ""
    edit = (f'<button type="button" class="edit" aria-label="Correct the caption of {escape(hit.name)}">'
            f'edit</button>') if edits else ""
    return (f'<figure class="hit{" is-corrected" if hit.corrected else ""}" data-id="{hit.id}">'
            f'<a class="open" href="/image/{hit.id}" title="{escape(hit.path)}">'
            f'<img src="/thumb/{hit.id}" alt="{escape(alt)}" loading="{"eager" if rank < 12 else "lazy"}" '
            f'decoding="async"></a>'
            f'<figcaption><span class="caption">{escape(caption)}</span>'
            f'<span class="meta"><span class="score" title="similarity">{hit.score:.3f}</span>{corrected}'
            f'<a class="like" href="{like}">more like this</a>{edit}</span></figcaption></figure>')


def grid_html(hits: list[Hit] | None, edits: bool = False) -> str:
    return "".join(hit_html(h, i, edits) for i, h in enumerate(hits or []))


def _options(choices, selected: str) -> str:
    return "".join(f'<option value="{escape(value)}"{" selected" if value == selected else ""}>{escape(label)}'
                   f'</option>' for value, label in choices)


def filters_html(state: PageState) -> str:
    """The mode and the filters: fields of the search form, so that they go into the address."""
    v = state.view
    folders = list(state.folders or [])
    if v.folder and v.folder not in folders:
        folders.append(v.folder)
    modes = [("hybrid", "images + captions"), ("image", "images"), ("text", "captions")]
    return (f'<fieldset id="filters"><legend class="visually-hidden">Filters</legend>'
            f'<label>match <select name="mode" id="mode">{_options(modes, state.mode)}</select></label>'
            f'<label>folder <select name="folder" id="folder">'
            f'{_options([("", "all folders")] + [(f, f) for f in folders], v.folder)}</select></label>'
            f'<label>taken from <input type="date" name="from" id="from" value="{escape(v.date_from)}"></label>'
            f'<label>to <input type="date" name="to" id="to" value="{escape(v.date_to)}"></label>'
            f'<label>captions <select name="corrected" id="corrected">'
            f'{_options([("", "all"), ("yes", "corrected"), ("no", "not corrected")], v.corrected)}</select>'
            f'</label></fieldset>')


def page_html(state: PageState, assets: dict[str, str], k: int) -> str:
    """The whole page. ``assets``: static file name -> its URL (with a version for caching)."""
    title = f"{state.query} \u2013 photo search" if state.query else "Photo search"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{escape(title)}</title>
<link rel="stylesheet" href="{escape(assets['search.css'])}">
<link rel="icon" href="{escape(assets['favicon.svg'])}" type="image/svg+xml">
{f'<meta name="csrf-token" content="{escape(state.csrf)}">' if state.edits and state.csrf else ""}
<script src="{escape(assets['search.js'])}" defer></script>
</head>
<body>
<header>
<form id="search" action="/" method="get" role="search">
<label for="q" class="visually-hidden">Search photos</label>
<input id="q" name="q" type="search" value="{escape(state.query)}" placeholder="a dog on a beach"
 autocomplete="off" autofocus maxlength="500">
<input type="hidden" name="k" value="{k}">
<button type="submit">Search</button>
{filters_html(state)}
</form>
<p id="status" role="status" aria-live="polite">{escape(status_text(state))}</p>
</header>
<main id="results" class="grid" data-k="{k}" data-edits="{'1' if state.edits else ''}">{grid_html(state.hits, state.edits)}</main>
<footer><kbd>/</kbd> search &middot; <kbd>&larr;</kbd><kbd>&uarr;</kbd><kbd>&rarr;</kbd><kbd>&darr;</kbd> move
 &middot; <kbd>Enter</kbd> open &middot; <kbd>m</kbd> more like this{' &middot; <kbd>e</kbd> correct the caption' if state.edits else ''}
 &middot; <kbd>Esc</kbd> back to the box</footer>
</body>
</html>
"""


def login_html(assets: dict[str, str], failed: bool = False, next_url: str = "/") -> str:
    """The form a browser gets without the API key (it sets the key cookie; so does ``/?key=KEY``)."""
    message = "Wrong key; try again." if failed else "This server needs its API key."
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Photo search \u2013 API key</title>
<link rel="stylesheet" href="{escape(assets['search.css'])}">
<link rel="icon" href="{escape(assets['favicon.svg'])}" type="image/svg+xml">
</head>
<body>
<header>
<form id="login" action="/login" method="post">
<label for="key">{escape(message)}</label>
<input id="key" name="key" type="password" autocomplete="current-password" autofocus>
<input type="hidden" name="next" value="{escape(next_url)}">
<button type="submit">Enter</button>
</form>
</header>
</body>
</html>
"""
