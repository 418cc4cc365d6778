"""The SQLite schema of the photo index (version 3: exact byte paths, embeddings in the matrix file, the date each
photo was taken, and captions with a full-text index)."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 3

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
    indexed_at REAL NOT NULL,
    taken      TEXT                   -- when the photo was taken, 'YYYY-MM-DDTHH:MM:SS' wall clock (EXIF
                                      -- DateTimeOriginal, else the file's mtime in local time); NULL: not read yet
)""", "CREATE INDEX IF NOT EXISTS images_by_hash ON images(size, sha256)",
    "CREATE INDEX IF NOT EXISTS images_by_taken ON images(taken)", """
CREATE TABLE IF NOT EXISTS captions (
    image_id   INTEGER PRIMARY KEY,   -- images.id (dropped with it)
    caption    TEXT NOT NULL,
    source     TEXT NOT NULL,         -- 'run' (a caption run's output), 'txt' / 'xmp' (a sidecar), 'correction'
    corrected  INTEGER NOT NULL DEFAULT 0,  -- 1 while the caption is a person's correction
    sidecars   TEXT,                  -- size:mtime of the photo's sidecars when last read (re-read when they change)
    updated_at REAL NOT NULL
)""", """
CREATE VIRTUAL TABLE IF NOT EXISTS captions_fts USING fts5(
    caption, content='captions', content_rowid='image_id', tokenize='unicode61 remove_diacritics 2'
)""", """
CREATE TRIGGER IF NOT EXISTS captions_ai AFTER INSERT ON captions BEGIN
    INSERT INTO captions_fts(rowid, caption) VALUES (new.image_id, new.caption);
END""", """
CREATE TRIGGER IF NOT EXISTS captions_ad AFTER DELETE ON captions BEGIN
    INSERT INTO captions_fts(captions_fts, rowid, caption) VALUES ('delete', old.image_id, old.caption);
END""", """
CREATE TRIGGER IF NOT EXISTS captions_au AFTER UPDATE OF caption ON captions BEGIN
    INSERT INTO captions_fts(captions_fts, rowid, caption) VALUES ('delete', old.image_id, old.caption);
    INSERT INTO captions_fts(rowid, caption) VALUES (new.image_id, new.caption);
END""", """
CREATE TRIGGER IF NOT EXISTS images_ad AFTER DELETE ON images BEGIN
    DELETE FROM captions WHERE image_id = old.id;
END""")


def create_schema(db: sqlite3.Connection) -> None:
    for statement in _SCHEMA:  # one by one: executescript would commit an open transaction
        db.execute(statement)
