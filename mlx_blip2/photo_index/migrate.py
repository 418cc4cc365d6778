"""Rewrites of a photo index: the schema migrations (1 -> 3, 2 -> 3) and the compaction of the matrix file."""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from .schema import SCHEMA_VERSION, create_schema
from .vectors import VectorWriter, open_matrix

_CHUNK = 4096  # rows copied at a time: 64 MiB of float16 for blip2-itm-vit-g


@contextlib.contextmanager
def _migration(index):
    """One transaction that ends by recording the new schema version; any error leaves the index as it was."""
    index.begin()
    try:
        yield
        index.set_meta("schema_version", str(SCHEMA_VERSION))
        index.set_meta("migrated_at", str(time.time()))
        index.commit()
    except BaseException:
        index.rollback()
        raise


def migrate_v1(index) -> None:
    """Schema 1 (text paths, float16 blobs in SQLite) -> 2, in one transaction: the blobs move to the matrix file
    in id order (so ties still rank in the same order), the paths become exact bytes."""
    db = index.db
    with _migration(index):
        shape = index.shape
        db.execute("ALTER TABLE images RENAME TO images_v1")
        create_schema(db)
        writer = VectorWriter(index.vectors_path(), *shape, reset=True) if shape else None
        row_bytes = shape[0] * shape[1] * 2 if shape else -1
        cursor = db.execute("SELECT path, size, mtime_ns, embedding, error, indexed_at FROM images_v1 ORDER BY id")
        rows, next_row = [], 0
        while True:
            chunk = cursor.fetchmany(_CHUNK)
            if not chunk:
                break
            good = [r for r in chunk if r[3] is not None and len(r[3]) == row_bytes]
            if good:
                data = np.frombuffer(b"".join(r[3] for r in good), np.float16).reshape(len(good), *shape)
                writer.append(next_row, data)
            for r in chunk:
                path = os.fsencode(r[0])
                if r[3] is not None and len(r[3]) == row_bytes:
                    rows.append((path, r[1], r[2], next_row, None, None, r[5]))
                    next_row += 1
                elif r[3] is not None:  # a damaged blob: re-embedded on the next run (mtime -1 never matches)
                    rows.append((path, r[1], -1, None, None, "damaged embedding; re-index", r[5]))
                else:
                    rows.append((path, r[1], r[2], None, None, r[4], r[5]))
        db.executemany("INSERT INTO images(path, size, mtime_ns, row, sha256, error, indexed_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        db.execute("DROP TABLE images_v1")
        index.set_meta("vectors_rows", str(next_row))
    db.execute("VACUUM")  # give back the space of the blobs


def migrate_v2(index) -> None:
    """Schema 2 -> 3, in one transaction: the ``taken`` column (filled by the next ``index`` run) and the caption
    tables (filled from sidecars by the next ``index`` run, from caption runs by ``index --captions``)."""
    with _migration(index):
        index.db.execute("ALTER TABLE images ADD COLUMN taken TEXT")
        create_schema(index.db)


def compact(index) -> None:
    """Copy the live rows, in row order, to a new matrix file and point the index at it."""
    db = index.db
    index.begin()
    new = None
    try:
        old = index.vectors_path()
        shape = index.shape
        live = db.execute("SELECT id, row FROM images WHERE row IS NOT NULL ORDER BY row").fetchall()
        source = open_matrix(old, index.vector_rows(), *shape)
        live = [(i, r) for i, r in live if r < source.shape[0]]  # rows a damaged file lost stay unreferenced
        number = int(index.get_meta("compactions") or 0) + 1
        new = index.path.with_name(f"{index.path.name}.vectors.{number}")
        writer = VectorWriter(new, *shape, reset=True)
        for start in range(0, len(live), _CHUNK):
            rows = np.array([r for _, r in live[start:start + _CHUNK]])
            writer.append(start, source[rows])
        del source
        # Ascending: an image's new row is at most its old one, and every row below it is already renumbered.
        db.executemany("UPDATE images SET row = ? WHERE id = ?", [(n, i) for n, (i, _) in enumerate(live)])
        # Rows a damaged file lost (numbered beyond the copied ones): re-embedded on the next run.
        db.execute("UPDATE images SET row = NULL, mtime_ns = -1, error = 'embedding lost; re-index' "
                   "WHERE row >= ?", (len(live),))
        index.set_meta("vectors_file", new.name)
        index.set_meta("vectors_rows", str(len(live)))
        index.set_meta("compactions", str(number))
        index.commit()
    except BaseException:
        index.rollback()
        if new is not None:
            new.unlink(missing_ok=True)
        raise
    index._matrix = None
    try:
        old.unlink(missing_ok=True)  # readers that mapped it keep their mapping
    except OSError:
        pass  # (Windows: still mapped by a reader) left behind, unused
