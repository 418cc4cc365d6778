"""Captions in the photo index: one per image, with an SQLite FTS5 index over them (``captions_fts``, kept in step
by triggers; see :mod:`.schema`).

Where captions come from, and which wins:

- **sidecars** beside each photo (``photo.txt``; the ``x-default`` ``dc:description`` of ``photo.jpg.xmp`` or
  ``photo.xmp``): read by every ``index`` run for the photos whose sidecars changed since the last read (their size
  and mtime are recorded), so a sidecar edited by hand or by another program reaches the index on the next run;
- **caption runs** (``index --captions captions.jsonl``, and the one pass): they replace what the index held, except
  a person's correction (a newer run does not undo a correction);
- **corrections** made on the search page (:mod:`.corrections`): written to the sidecar and here at once.

A caption that changes for any reason but a correction is no longer marked corrected.
"""

from __future__ import annotations

import csv
import io
import os
import re
import time
from collections.abc import Iterable, Mapping

from ..library.records import parse_json, record_path
from ..library.sidecars import XMP_NAMES, txt_sidecar, xmp_sidecar
from ..library.xmp import XmpError, xmp_description
from .store import PhotoIndex, encode_path

MAX_SIDECAR_BYTES = 1 << 20
MAX_CAPTION_CHARS = 1000
_BATCH = 500  # photos per transaction
_STOP_WORDS = frozenset("a an and are at by for from in is it of on or the to with".split())


def clean_caption(text) -> str | None:
    """A caption as stored and shown: whitespace collapsed, at most MAX_CAPTION_CHARS; None when empty."""
    if not isinstance(text, str):
        return None
    text = " ".join(text.split())
    return text[:MAX_CAPTION_CHARS] or None


def sidecar_paths(path: str) -> tuple[str, ...]:
    """The sidecars a photo's caption is read from, in the order they are tried."""
    return (txt_sidecar(path),) + tuple(xmp_sidecar(path, naming) for naming in XMP_NAMES)


def sidecar_stamp(path: str) -> str:
    """size:mtime of each of the photo's sidecars ('-' for a missing one): changes whenever one of them does."""
    parts = []
    for sidecar in sidecar_paths(path):
        try:
            st = os.stat(sidecar)
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append("-")
    return " ".join(parts)


def _read_small(path: str, allowed=None) -> bytes | None:
    try:
        if allowed is not None and not allowed(path):
            return None
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_SIDECAR_BYTES:
                return None
            return f.read(MAX_SIDECAR_BYTES)
    except OSError:
        return None


def read_sidecar_caption(path: str, allowed=None) -> tuple[str | None, str | None]:
    """(caption, 'txt' or 'xmp') from the photo's sidecars: photo.txt, else the XMP x-default description
    (photo.jpg.xmp, then photo.xmp); (None, None) when none holds one (or one cannot be parsed). ``allowed``: a
    check each sidecar's path must pass before it is read (the search page's: inside the library)."""
    data = _read_small(txt_sidecar(path), allowed)
    if data is not None:
        caption = clean_caption(data.decode("utf-8", "replace"))
        if caption:
            return caption, "txt"
    for naming in XMP_NAMES:
        data = _read_small(xmp_sidecar(path, naming), allowed)
        if data is None:
            continue
        try:
            caption = clean_caption(xmp_description(data))
        except (XmpError, ValueError):
            continue
        if caption:
            return caption, "xmp"
    return None, None


def read_caption_records(path: str) -> dict[str, str]:
    """exact image path -> caption, from a caption run's jsonl or csv output (the last record of an image wins;
    relative paths are taken from the file's folder)."""
    with open(path, "rb") as f:
        data = f.read()
    folder = os.path.dirname(os.path.abspath(path))
    if path.lower().endswith(".csv"):
        text = data.decode("utf-8", "surrogateescape")
        records = [r for r in csv.DictReader(io.StringIO(text, newline="")) if r.get("path")]
        records = [{k: v for k, v in r.items() if v not in (None, "")} for r in records]
    else:
        records = [r for line in data.split(b"\n") if line.strip() and (r := parse_json(line)) is not None]
    out: dict[str, str] = {}
    for record in records:
        caption = clean_caption(record.get("caption"))
        if caption is None:
            continue
        image = record_path(record)
        out[image if os.path.isabs(image) else os.path.normpath(os.path.join(folder, image))] = caption
    return out


# --- the caption table -------------------------------------------------------------------------------------------


def image_ids(db: PhotoIndex, paths: Iterable[str]) -> dict[str, int]:
    """path -> id of the given files that the index holds (readable or not)."""
    out = {}
    for p in paths:
        row = db.db.execute("SELECT id FROM images WHERE path = ?", (encode_path(p),)).fetchone()
        if row is not None:
            out[p] = row[0]
    return out


def caption_row(db: PhotoIndex, image_id: int) -> tuple[str, str, bool, str | None] | None:
    """(caption, source, corrected, sidecar stamp) of an image, or None."""
    row = db.db.execute("SELECT caption, source, corrected, sidecars FROM captions WHERE image_id = ?",
                        (image_id,)).fetchone()
    return None if row is None else (row[0], row[1], bool(row[2]), row[3])


def set_caption(db: PhotoIndex, image_id: int, caption: str, source: str, corrected: bool = False,
                sidecars: str | None = None) -> None:
    """Store an image's caption (inside the caller's transaction)."""
    db.db.execute("INSERT INTO captions(image_id, caption, source, corrected, sidecars, updated_at) "
                  "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(image_id) DO UPDATE SET caption=excluded.caption, "
                  "source=excluded.source, corrected=excluded.corrected, sidecars=excluded.sidecars, "
                  "updated_at=excluded.updated_at", (image_id, caption, source, int(corrected), sidecars, time.time()))


def _in_batches(db: PhotoIndex, items: list, step) -> int:
    changed = 0
    for lo in range(0, len(items), _BATCH):
        chunk = items[lo:lo + _BATCH]
        prepared = [(item, step(item, None)) for item in chunk]  # file reads outside the transaction
        if not any(p is not None for _, p in prepared):
            continue
        db.begin()
        try:
            for item, p in prepared:
                if p is not None:
                    changed += step(item, p)
            db.commit()
        except BaseException:
            db.rollback()
            raise
    return changed


def refresh_from_sidecars(db: PhotoIndex, paths: Iterable[str]) -> int:
    """Read the sidecars of the given indexed photos that changed since they were last read; store their captions
    and fill a missing date taken. Returns how many captions changed."""
    from .metadata import date_taken

    ids = image_ids(db, paths)
    known = {i: (s, c, t) for i, s, c, t in db.db.execute(
        "SELECT i.id, c.sidecars, c.caption, i.taken FROM images i LEFT JOIN captions c ON c.image_id = i.id")}

    def step(item, prepared):
        path, image_id = item
        stored_stamp, stored_caption, taken = known.get(image_id, (None, None, None))
        if prepared is None:  # outside the transaction: stat and read the files
            stamp = sidecar_stamp(path)
            new_taken = None if taken else date_taken(path)
            if stamp == stored_stamp and new_taken is None:
                return None
            caption, source = read_sidecar_caption(path) if stamp != stored_stamp else (None, None)
            return stamp, stored_stamp, caption, source, new_taken
        stamp, _, caption, source, new_taken = prepared
        if new_taken is not None:
            db.db.execute("UPDATE images SET taken = ? WHERE id = ?", (new_taken, image_id))
        if stamp == stored_stamp:
            return 0
        row = caption_row(db, image_id)
        if caption is None:
            if row is not None and row[1] in ("txt", "xmp"):  # its sidecar was emptied or removed
                db.db.execute("DELETE FROM captions WHERE image_id = ?", (image_id,))
                return 1
            if row is not None:
                db.db.execute("UPDATE captions SET sidecars = ? WHERE image_id = ?", (stamp, image_id))
            return 0
        if row is not None and row[0] == caption:  # the same words (e.g. a correction the page wrote there)
            db.db.execute("UPDATE captions SET sidecars = ? WHERE image_id = ?", (stamp, image_id))
            return 0
        set_caption(db, image_id, caption, source, False, stamp)
        return 1

    return _in_batches(db, sorted(ids.items()), step)


def import_captions(db: PhotoIndex, captions: Mapping[str, str], source: str = "run") -> int:
    """Store a caption run's captions (exact path -> caption) for the indexed photos among them; a person's
    correction is kept. Returns how many captions changed."""
    cleaned = {p: c for p, c in ((p, clean_caption(c)) for p, c in captions.items()) if c}
    ids = image_ids(db, cleaned)

    def step(item, prepared):
        path, image_id = item
        if prepared is None:
            return sidecar_stamp(path)
        row = caption_row(db, image_id)
        if row is not None and (row[2] or row[0] == cleaned[path]):
            return 0
        set_caption(db, image_id, cleaned[path], source, False, prepared)
        return 1

    return _in_batches(db, sorted(ids.items()), step)


def import_caption_files(db_path, files: Iterable[str]) -> int:
    """``index --captions FILE...``: the captions of caption runs' outputs (jsonl or csv; later files win) into an
    index. Returns how many captions changed."""
    merged: dict[str, str] = {}
    for f in files:
        merged.update(read_caption_records(os.fspath(f)))
    with PhotoIndex(db_path, create=False) as db:
        return import_captions(db, merged)


# --- full-text search --------------------------------------------------------------------------------------------


def fts_query(text: str) -> str | None:
    """An FTS5 query for what a person typed: any of its words (common English words left out unless there is
    nothing else), the last one also as a prefix while it is being typed; None when it has no words."""
    words = re.findall(r"\w+", text.lower())
    kept = [w for w in words if w not in _STOP_WORDS] or words
    if not kept:
        return None
    terms = [f'"{w}"' for w in dict.fromkeys(kept)]
    if len(kept[-1]) >= 3 and words and words[-1] == kept[-1]:
        terms[-1] += "*"
    return " OR ".join(terms)


def text_ranking(db: PhotoIndex, query: str, limit: int, filters=None) -> list[tuple[int, int, float]]:
    """(image id, matrix row, BM25 score, higher is better) of the searchable photos whose caption matches
    ``query``, best first (ties by id), at most ``limit``."""
    match = fts_query(query)
    if match is None or limit <= 0:
        return []
    where, params = filters.sql("i") if filters is not None else ("", [])
    rows = db.db.execute(
        "SELECT i.id, i.row, bm25(captions_fts) AS s FROM captions_fts JOIN images i ON i.id = captions_fts.rowid "
        f"WHERE captions_fts MATCH ? AND i.row IS NOT NULL {where} ORDER BY s, i.id LIMIT ?",
        [match, *params, int(limit)]).fetchall()
    return [(i, r, -s) for i, r, s in rows]


def caption_count(db: PhotoIndex) -> int:
    return db.db.execute("SELECT COUNT(*) FROM captions").fetchone()[0]
