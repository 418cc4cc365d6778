"""The search page's one view of a photo index (:mod:`mlx_blip2.photo_index`), through a narrow interface:

- :meth:`LibraryIndex.search_embedding` (a normalised text embedding -> ``[(entry_id, score)]``, best first),
- :meth:`LibraryIndex.ranked` (a query in a search mode, image / text / hybrid, with filters),
- :meth:`LibraryIndex.browse` (the photos that pass the filters, newest first, when there is no query),
- :meth:`LibraryIndex.similar` ("more like this": an indexed image's stored embedding, mean-pooled, as the query),
- :meth:`LibraryIndex.entry` (an id -> its exact path, size, mtime),
- :meth:`LibraryIndex.captions` (ids -> the index's caption and whether a person corrected it),
- :meth:`LibraryIndex.correct` (save a person's caption: sidecar, index, corrections file), and
- :meth:`LibraryIndex.servable_path` (an id -> the real path of a file the page may serve, or why not).

Files are addressed only by the index's own ids (``images.id``), never by a path from a request. A file is served
only when it is still a regular file whose real path (symlinks resolved) lies inside the library: the folders the
indexer recorded as its roots (meta ``roots``, a JSON list, when the index has it), else the deepest folder holding
every indexed file. An indexed file that has since become a symlink pointing elsewhere is refused.

The store is not thread-safe, so searches and corrections run on one thread of their own; lookups use a read-only
SQLite connection per thread (the index may be updated by ``mlx-blip2 index`` while the page is served). The page
writes to the index only to save a correction, and only when edits are allowed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_ID = 2 ** 63 - 1  # SQLite's largest integer: larger ids cannot exist (and would overflow the binding)


class NotServable(Exception):
    """An id the page does not serve: ``status`` 404 (no such entry or file) or 403 (outside the library)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class IndexEntry:
    id: int
    path: str  # exact (os.fsdecode of the stored bytes)
    size: int
    mtime_ns: int


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class LibraryIndex:
    """A photo index opened for the search page (it writes only corrections)."""

    def __init__(self, db_path: str | os.PathLike):
        from ..photo_index import PhotoIndex

        self.path = Path(db_path).resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"no photo index at '{db_path}'; build one with: mlx-blip2 index DIR --db "
                                    f"{db_path}")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mlx-blip2-index")
        self._store = self._on_index_thread(PhotoIndex, self.path, create=False)
        self._local = threading.local()
        self._roots: tuple[int, list[str]] | None = None
        self.model = self._on_index_thread(lambda: self._store.model)
        self.shape = self._on_index_thread(lambda: self._store.shape)

    def _on_index_thread(self, fn, *args, **kwargs):
        return self._executor.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        if self._store is not None:
            self._on_index_thread(self._store.close)
            self._store = None
        self._executor.shutdown(wait=True)

    # --- lookups (any thread) ---------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            uri = "file:" + urllib.parse.quote(str(self.path)) + "?mode=ro"
            db = self._local.db = sqlite3.connect(uri, uri=True, timeout=30)
        return db

    def count(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM images WHERE row IS NOT NULL").fetchone()[0]

    def entry(self, entry_id: int) -> IndexEntry | None:
        """The indexed (readable) file with this id, or None."""
        if not 0 < entry_id <= MAX_ID:
            return None
        row = self._db().execute("SELECT path, size, mtime_ns FROM images WHERE id = ? AND row IS NOT NULL",
                                 (entry_id,)).fetchone()
        if row is None:
            return None
        raw = row[0]
        return IndexEntry(entry_id, os.fsdecode(bytes(raw)) if not isinstance(raw, str) else raw, row[1], row[2])

    def ids_of_paths(self, paths: list[str]) -> dict[str, int]:
        out = {}
        for p in paths:
            row = self._db().execute("SELECT id FROM images WHERE path = ?", (os.fsencode(p),)).fetchone()
            if row is not None:
                out[p] = row[0]
        return out

    def roots(self) -> list[str]:
        """The library's real root folders (cached until the index changes)."""
        db = self._db()
        generation = int((db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone() or [0])[0])
        if self._roots is not None and self._roots[0] == generation:
            return self._roots[1]
        stored = db.execute("SELECT value FROM meta WHERE key = 'roots'").fetchone()
        if stored is not None:
            roots = [str(r) for r in json.loads(stored[0])]
        else:
            folders = {os.path.dirname(os.fsdecode(bytes(p)) if not isinstance(p, str) else p)
                       for (p,) in db.execute("SELECT path FROM images WHERE row IS NOT NULL")}
            roots = [os.path.commonpath(sorted(folders))] if folders else []
        roots = [os.path.realpath(r) for r in roots if os.path.isabs(r)]
        self._roots = (generation, roots)
        return roots

    def servable_path(self, entry_id: int) -> tuple[IndexEntry, str, os.stat_result]:
        """(entry, real path, its stat) of a file the page may serve; :class:`NotServable` otherwise."""
        entry = self.entry(entry_id)
        if entry is None:
            raise NotServable(404, f"no indexed image has id {entry_id}")
        path = entry.path
        if not os.path.isabs(path) or os.path.normpath(path) != path:
            raise NotServable(403, f"indexed image {entry_id} has a path this page does not serve")
        real = os.path.realpath(path)
        if not any(_inside(real, root) for root in self.roots()):
            raise NotServable(403, f"image {entry_id} now lies outside the indexed library (a symlink?)")
        try:
            st = os.stat(real, follow_symlinks=False)
        except OSError:
            raise NotServable(404, f"image {entry_id} is no longer on disk") from None
        if not stat.S_ISREG(st.st_mode):
            raise NotServable(404, f"image {entry_id} is not a regular file")
        return entry, real, st

    def captions(self, ids: list[int]) -> dict[int, tuple[str, bool]]:
        """id -> (caption, corrected) of the given entries that have a caption in the index."""
        out = {}
        for lo in range(0, len(ids), 500):
            part = [int(i) for i in ids[lo:lo + 500]]
            out.update((i, (c, bool(x))) for i, c, x in self._db().execute(
                f"SELECT image_id, caption, corrected FROM captions WHERE image_id IN ({','.join('?' * len(part))})",
                part))
        return out

    def folders(self, limit: int = 1000) -> list[str]:
        """The folders holding indexed photos (and the folders between them and the library's roots), sorted."""
        found: set[str] = set()
        roots = self.roots()
        for (raw,) in self._db().execute("SELECT DISTINCT path FROM images WHERE row IS NOT NULL"):
            folder = os.path.dirname(os.fsdecode(bytes(raw)) if not isinstance(raw, str) else raw)
            while folder not in found and len(found) < limit:
                found.add(folder)
                if any(folder == r for r in roots) or os.path.dirname(folder) == folder:
                    break
                folder = os.path.dirname(folder)
        return sorted(found)

    # --- search (the index thread) ----------------------------------------------------------------------------

    def _ranked(self, query: np.ndarray, k: int, filters=None) -> list[tuple[int, float]]:
        from ..photo_index import top_k

        return [(r.id, float(r.score)) for r in top_k(self._store, query, k, filters)]

    def ranked(self, mode: str, text: str, text_embed: np.ndarray | None, k: int,
               filters=None) -> list[tuple[int, float]]:
        """The k best entries for a query: ``mode`` image (ITC of ``text_embed``), text (the captions' BM25 for
        ``text``) or hybrid (both, fused by reciprocal rank: :mod:`mlx_blip2.photo_index.fusion`)."""
        from ..photo_index.search import hybrid_top_k, text_top_k, top_k

        def run():
            if mode == "text":
                results = text_top_k(self._store, text, k, filters)
            elif mode == "hybrid":
                results = hybrid_top_k(self._store, text_embed, text, k, filters)
            else:
                results = top_k(self._store, text_embed, k, filters)
            return [(r.id, float(r.score)) for r in results]

        if mode != "text":
            text_embed = np.asarray(text_embed, np.float32).reshape(-1)
        return self._on_index_thread(run)

    def browse(self, filters, k: int) -> list[tuple[int, float]]:
        """The entries that pass ``filters``, newest first (by date taken); score 0."""
        where, params = filters.sql("i")
        rows = self._db().execute(f"SELECT i.id FROM images i WHERE i.row IS NOT NULL{where} "
                                  "ORDER BY i.taken DESC, i.id DESC LIMIT ?", [*params, int(k)])
        return [(i, 0.0) for (i,) in rows]

    def correct(self, entry_id: int, caption: str, previous: str | None, new_sidecar: str) -> dict:
        """Save a person's caption (:func:`mlx_blip2.photo_index.corrections.correct_caption`)."""
        from ..photo_index.corrections import correct_caption

        return self._on_index_thread(correct_caption, self._store, entry_id, caption, previous, new_sidecar)

    def search_embedding(self, text_embed: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The k best entries for a normalised (D,) embedding by ITC (max over each image's query tokens)."""
        return self._on_index_thread(self._ranked, np.asarray(text_embed, np.float32).reshape(-1), k)

    def similar(self, entry_id: int, k: int, filters=None) -> list[tuple[int, float]] | None:
        """The k entries most like an indexed image (its stored query embeddings, mean-pooled and normalised, as
        the query: the summary the duplicate finder compares); None when there is no such entry."""
        entry = self.entry(entry_id)
        if entry is None:
            return None

        def run():
            stored = self._store.embedding(entry.path)
            if stored is None:
                return None
            query = np.asarray(stored, np.float32).mean(axis=0)
            query /= max(float(np.linalg.norm(query)), 1e-12)
            return self._ranked(query, k, filters)

        return self._on_index_thread(run)
