"""The photo index store: an SQLite database of files, with their embeddings in a matrix file beside it.

SQLite (WAL, one transaction per batch) holds one row per file: its exact path (``os.fsencode`` bytes, so a name
that is not valid UTF-8 round-trips), size, mtime, content hash, the row of the embedding matrix
(:mod:`.vectors`) that holds its embeddings, or the reason it could not be read. The matrix is memory-mapped for
search, so a new process reads no embedding through SQLite.

Schema history: version 1 kept text paths and float16 blobs in SQLite; it is migrated on open (the blobs move to
the matrix file, in the same order, so rankings and ties are unchanged). Version 2 had neither the date taken nor
captions; it gains both tables' columns on open (:func:`.migrate.migrate_v2`) and the next ``index`` run fills them.
Captions and their full-text index are kept by :mod:`.captions`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import utf8_text
from .metadata import date_taken
from .migrate import compact, migrate_v1, migrate_v2
from .schema import SCHEMA_VERSION, create_schema
from .vectors import VectorFileError, VectorWriter, open_matrix


class PhotoIndexError(ValueError):
    """A database that cannot be used as a photo index (wrong file, other schema, other model)."""


def encode_path(path: str) -> bytes:
    return os.fsencode(path)


def decode_path(raw) -> str:
    return os.fsdecode(raw) if isinstance(raw, bytes) else raw


@dataclass
class Entry:
    """One stored embedding to write: the file, its stat, its (Q, D) embeddings and content hash."""

    path: str
    size: int
    mtime_ns: int
    embedding: np.ndarray
    sha256: bytes | None = None
    taken: str | None = None  # when the photo was taken (:func:`.metadata.date_taken`; read at write when None)


@dataclass
class Move:
    """A file found under a new path with the content of a stored one: its entry moves, nothing is re-embedded."""

    old_path: str
    path: str
    size: int
    mtime_ns: int


@dataclass
class Matrix:
    """A consistent view for search: the memory-mapped rows and which of them are live."""

    generation: int
    vectors: np.ndarray  # (rows, Q, D) float16, memory-mapped
    live: np.ndarray  # (rows,) bool
    count: int  # live rows


class PhotoIndex:
    """The store. ``PhotoIndex(path)`` opens (and with ``create=True`` creates) a database."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"no photo index at '{self.path}'; build one with: mlx-blip2 index DIR --db "
                                    f"{self.path}")
        try:
            # Autocommit mode: transactions are opened explicitly (one per batch).
            self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            version = self._schema_version()
            if version == 1:
                migrate_v1(self)
            elif version == 2:
                migrate_v2(self)
            elif version not in (None, SCHEMA_VERSION):
                raise PhotoIndexError(f"'{self.path}' has photo index schema version {version}; this mlx-blip2 "
                                      f"reads version {SCHEMA_VERSION}")
            create_schema(self.db)
            if version is None:
                self.set_meta("schema_version", str(SCHEMA_VERSION))
        except sqlite3.DatabaseError as e:
            raise PhotoIndexError(f"'{self.path}' is not a usable photo index database: {e}") from None
        self._matrix: Matrix | None = None
        self._wrote = False

    def _schema_version(self) -> int | None:
        has_meta = self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        version = self.get_meta("schema_version") if has_meta else None
        return None if version is None else int(version)

    def close(self) -> None:
        if self._wrote:
            try:  # fold the write-ahead log back into the database
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # a concurrent reader holds it; SQLite checkpoints later on its own
        self._matrix = None
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- metadata ----------------------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    @property
    def model(self) -> str | None:
        """The checkpoint the stored embeddings come from."""
        return self.get_meta("model")

    @property
    def shape(self) -> tuple[int, int] | None:
        """(num_query_tokens, embed_dim) of the stored embeddings, once a model is bound."""
        q, d = self.get_meta("num_query_tokens"), self.get_meta("embed_dim")
        return None if q is None or d is None else (int(q), int(d))

    def generation(self) -> int:
        """Bumped by every write transaction; a cached search matrix is refreshed when it changes."""
        return int(self.get_meta("generation") or 0)

    def vectors_path(self) -> Path:
        return self.path.with_name(self.get_meta("vectors_file") or self.path.name + ".vectors")

    def vector_rows(self) -> int:
        """Rows of the matrix file that committed transactions cover (live and dead)."""
        return int(self.get_meta("vectors_rows") or 0)

    def begin(self) -> None:
        """Start a write transaction (takes SQLite's write lock, which also guards the matrix file)."""
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.set_meta("generation", str(self.generation() + 1))
        self.db.execute("COMMIT")
        self._wrote = True

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def bind_model(self, model: str, num_queries: int, embed_dim: int) -> None:
        """Record which model the embeddings come from; refuse to mix embeddings of different models."""
        stored = self.model
        if stored is not None and stored != model:
            raise PhotoIndexError(f"'{self.path}' holds embeddings from {stored}, not {model}; index with "
                                  f"--model {stored} or use another --db")
        if self.shape is not None and self.shape != (num_queries, embed_dim):
            raise PhotoIndexError(f"'{self.path}' stores {self.shape[0]}x{self.shape[1]} embeddings; {model} makes "
                                  f"{num_queries}x{embed_dim}")
        if stored is None:
            self.begin()
            self.set_meta("model", model)
            self.set_meta("num_query_tokens", str(num_queries))
            self.set_meta("embed_dim", str(embed_dim))
            self.commit()

    # --- rows --------------------------------------------------------------------------------------------------

    def files(self) -> dict[str, tuple[int, int, bool]]:
        """path -> (size, mtime_ns, ok) for every stored file."""
        rows = self.db.execute("SELECT path, size, mtime_ns, row IS NOT NULL FROM images")
        return {decode_path(p): (s, m, bool(ok)) for p, s, m, ok in rows}

    def hashes(self, paths: Iterable[str]) -> dict[str, tuple[int, bytes]]:
        """path -> (size, sha256) of the given stored, readable files that have a hash."""
        out = {}
        for p in paths:
            row = self.db.execute("SELECT size, sha256 FROM images WHERE path = ? AND row IS NOT NULL "
                                  "AND sha256 IS NOT NULL", (encode_path(p),)).fetchone()
            if row is not None:
                out[p] = (row[0], bytes(row[1]))
        return out

    def errors(self) -> list[tuple[str, str]]:
        """(path, reason) for the files recorded as unreadable."""
        rows = self.db.execute("SELECT path, error FROM images WHERE row IS NULL ORDER BY path").fetchall()
        return [(decode_path(p), e) for p, e in rows]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images WHERE row IS NOT NULL").fetchone()[0]

    def embedding(self, path: str) -> np.ndarray | None:
        """The stored (Q, D) float16 embeddings of a file, or None."""
        row = self.db.execute("SELECT row FROM images WHERE path = ?", (encode_path(path),)).fetchone()
        if row is None or row[0] is None:
            return None
        m = self.matrix()
        return np.array(m.vectors[row[0]]) if row[0] < m.vectors.shape[0] else None

    def write_batch(self, embedded: Sequence[Entry | tuple] = (), failed: Sequence[tuple[str, int, int, str]] = (),
                    removed: Iterable[str] = (), moved: Sequence[Move] = ()) -> None:
        """One transaction: store embeddings (:class:`Entry`, or (path, size, mtime_ns, (Q, D) array[, sha256])),
        record failures (path, size, mtime_ns, reason), drop removed paths and move entries. Either all of it
        lands or, if the process dies, none (matrix rows written before a failed commit stay unreferenced)."""
        entries = [e if isinstance(e, Entry) else Entry(*e) for e in embedded]
        taken = [e.taken or date_taken(e.path, e.mtime_ns) for e in entries]  # file reads before the transaction
        now = time.time()
        upsert = ("INSERT INTO images(path, size, mtime_ns, row, sha256, error, indexed_at, taken) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET size=excluded.size, "
                  "mtime_ns=excluded.mtime_ns, row=excluded.row, sha256=excluded.sha256, error=excluded.error, "
                  "indexed_at=excluded.indexed_at, taken=excluded.taken")
        self.begin()
        try:
            rows = []
            if entries:
                if self.shape is None:
                    raise PhotoIndexError(f"'{self.path}' has no model bound; call bind_model first")
                first = self.vector_rows()
                VectorWriter(self.vectors_path(), *self.shape, reset=first == 0).append(first, np.stack([e.embedding for e in entries]))
                self.set_meta("vectors_rows", str(first + len(entries)))
                rows = [(encode_path(e.path), e.size, e.mtime_ns, first + i, e.sha256, None, now, t)
                        for i, (e, t) in enumerate(zip(entries, taken))]
            rows += [(encode_path(p), s, m, None, None, utf8_text(reason), now, None) for p, s, m, reason in failed]
            # Removals and moves first: a new file may take the path a removed or moved one had.
            self.db.executemany("DELETE FROM images WHERE path = ?", [(encode_path(p),) for p in removed])
            for mv in moved:
                self.db.execute("DELETE FROM images WHERE path = ?", (encode_path(mv.path),))
                self.db.execute("UPDATE images SET path = ?, size = ?, mtime_ns = ?, indexed_at = ? WHERE path = ?",
                                (encode_path(mv.path), mv.size, mv.mtime_ns, now, encode_path(mv.old_path)))
            self.db.executemany(upsert, rows)
            self.commit()
        except BaseException:
            self.rollback()
            raise

    # --- the matrix --------------------------------------------------------------------------------------------

    def dead_rows(self) -> int:
        return self.vector_rows() - self.count()

    def matrix(self) -> Matrix:
        """The memory-mapped embeddings and the live-row mask, cached until the index changes."""
        for attempt in range(3):
            self.db.execute("BEGIN")  # one snapshot for the counter, the file name and the live rows
            try:
                generation = self.generation()
                if self._matrix is not None and self._matrix.generation == generation:
                    return self._matrix
                shape, rows = self.shape, self.vector_rows()
                live_rows = np.fromiter((r for (r,) in self.db.execute(
                    "SELECT row FROM images WHERE row IS NOT NULL")), np.int64)
                try:
                    vectors = open_matrix(self.vectors_path(), rows, *shape) if shape else np.empty((0, 1, 1),
                                                                                                    np.float16)
                except VectorFileError:
                    if attempt < 2 and self.vectors_path().name != self.get_meta("vectors_file"):
                        continue  # compacted in between: read the new name
                    raise
            finally:
                self.db.execute("COMMIT")
            live = np.zeros(vectors.shape[0], bool)
            live[live_rows[live_rows < vectors.shape[0]]] = True
            self._matrix = Matrix(generation, vectors, live, int(live.sum()))
            return self._matrix
        raise PhotoIndexError(f"'{self.path}' kept changing while being read")

    def paths_of_rows(self, rows: Sequence[int], generation: int) -> dict[int, str] | None:
        """row -> path for matrix rows, or None when the index changed since ``generation`` (search again)."""
        entries = self.entries_of_rows(rows, generation)
        return None if entries is None else {r: p for r, (_, p) in entries.items()}

    def entries_of_rows(self, rows: Sequence[int], generation: int) -> dict[int, tuple[int, str]] | None:
        """row -> (id, path) for matrix rows, or None when the index changed since ``generation``."""
        self.db.execute("BEGIN")
        try:
            if self.generation() != generation:
                return None
            out = {}
            for lo in range(0, len(rows), 500):  # within SQLite's limit on parameters
                part = [int(r) for r in rows[lo:lo + 500]]
                found = self.db.execute(f"SELECT row, id, path FROM images WHERE row IN "
                                        f"({','.join('?' * len(part))})", part)
                out.update((r, (i, decode_path(p))) for r, i, p in found)
            return out
        finally:
            self.db.execute("COMMIT")

    def compact(self, min_dead: int = 1024, min_fraction: float = 0.25) -> bool:
        """Rewrite the live rows to a new matrix file when dead rows are at least ``min_dead`` and
        ``min_fraction`` of the file. Crash-safe: the new file is complete before the transaction that switches
        to it commits; the old one is removed after."""
        dead, rows = self.dead_rows(), self.vector_rows()
        if dead < max(1, min_dead) or dead < min_fraction * rows:
            return False
        compact(self)
        return True
