"""The SQLite schema of the photo index (version 2: exact byte paths, embeddings in the matrix file)."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 2

_SCHEMA = ("""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
)""", """
CREATE TABLE IF NOT EXISTS images (
    id         INTEGER PRIMARY KEY,
    path       BLOB NOT NULL UNIQUE,  -- os.fsencode(absolute path): exact bytes, not necessarily UTF-8
    size       INTEGER NOT NULL,      -- bytes, from stat() when the file was read
    mtime_ns   INTEGER NOT NULL,
    row        INTEGER UNIQUE,        -- row of the embedding matrix; NULL if the file is unreadable
    sha256     BLOB,                  -- content hash (finds moved and renamed files); NULL if unreadable
    error      TEXT,                  -- why the file could not be indexed (NULL when it was)
    indexed_at REAL NOT NULL
)""", "CREATE INDEX IF NOT EXISTS images_by_hash ON images(size, sha256)")


def create_schema(db: sqlite3.Connection) -> None:
    for statement in _SCHEMA:  # one by one: executescript would commit an open transaction
        db.execute(statement)
