"""The search page's one view of a photo index (:mod:`mlx_blip2.photo_index`), through a narrow interface:

- :meth:`LibraryIndex.search_embedding` (a normalised text embedding -> ``[(entry_id, score)]``, best first),
- :meth:`LibraryIndex.similar` ("more like this": an indexed image's stored embedding, mean-pooled, as the query),
- :meth:`LibraryIndex.entry` (an id -> its exact path, size, mtime), and
- :meth:`LibraryIndex.servable_path` (an id -> the real path of a file the page may serve, or why not).

Files are addressed only by the index's own ids (``images.id``), never by a path from a request. A file is served
only when it is still a regular file whose real path (symlinks resolved) lies inside the library: the folders the
indexer recorded as its roots (meta ``roots``, a JSON list, when the index has it), else the deepest folder holding
every indexed file. An indexed file that has since become a symlink pointing elsewhere is refused.

The store is not thread-safe, so searches run on one thread of their own; id lookups use a read-only SQLite
connection per thread (the index may be updated by ``mlx-blip2 index`` while the page is served).
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
    """A photo index opened for the search page (read-only: it never writes to the database)."""

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

    # --- search (the index thread) ----------------------------------------------------------------------------

    def _ranked(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        from ..photo_index import top_k

        results = top_k(self._store, query, k)
        ids = self.ids_of_paths([r.path for r in results])
        return [(ids[r.path], float(r.score)) for r in results if r.path in ids]

    def search_embedding(self, text_embed: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The k best entries for a normalised (D,) embedding by ITC (max over each image's query tokens)."""
        return self._on_index_thread(self._ranked, np.asarray(text_embed, np.float32).reshape(-1), k)

    def similar(self, entry_id: int, k: int) -> list[tuple[int, float]] | None:
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
            return self._ranked(query, k)

        return self._on_index_thread(run)
