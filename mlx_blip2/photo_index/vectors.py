"""The embedding matrix file beside the SQLite index: rows of float16 (num_query_tokens, embed_dim), memory-mapped.

Layout: a 64-byte header (magic, format version, num_query_tokens, embed_dim, dtype code), then rows in C order.
The file is append-only: a new or re-embedded image gets a new row at the end; the SQLite row of an image names
its matrix row, and a row no image names (replaced, deleted) is dead until a compaction rewrites the live rows to
a new file. Writers append under the SQLite write lock and fsync before the transaction that references the rows
commits, so a killed run leaves at most an unreferenced tail, which the next writer overwrites or truncates.
Readers only look at the rows the committed ``vectors_rows`` counter covers: rows below it never change.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MLXB2VEC"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIII")  # magic, version, num_query_tokens, embed_dim, dtype code
_DTYPES = {1: np.dtype("<f2")}


class VectorFileError(ValueError):
    """A matrix file that is missing, damaged or of another shape."""


def _header(num_queries: int, embed_dim: int) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, num_queries, embed_dim, 1).ljust(HEADER_BYTES, b"\0")


def read_header(path: Path) -> tuple[int, int]:
    """(num_query_tokens, embed_dim) of a matrix file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise VectorFileError(f"the embedding matrix '{path}' is missing; rebuild the index") from None
    if len(raw) < _HEADER.size:
        raise VectorFileError(f"'{path}' is not an embedding matrix (too short)")
    magic, version, q, d, code = _HEADER.unpack_from(raw)
    if magic != MAGIC or version != FORMAT_VERSION or code not in _DTYPES:
        raise VectorFileError(f"'{path}' is not an embedding matrix of format {FORMAT_VERSION}")
    return q, d


class VectorWriter:
    """Writes rows to a matrix file (created with its header when missing)."""

    def __init__(self, path: Path, num_queries: int, embed_dim: int, reset: bool = False):
        """``reset``: start a new file even if one exists (no committed row refers to it)."""
        self.path, self.shape = Path(path), (num_queries, embed_dim)
        self.row_bytes = num_queries * embed_dim * 2
        if reset or not self.path.exists():
            with open(self.path, "wb") as f:
                f.write(_header(num_queries, embed_dim))
                f.flush()
                os.fsync(f.fileno())
        elif read_header(self.path) != self.shape:
            raise VectorFileError(f"'{self.path}' stores {read_header(self.path)} embeddings, not {self.shape}")

    def append(self, first_row: int, embeddings: np.ndarray) -> None:
        """Write (n, Q, D) embeddings as rows ``first_row``.. and make them durable. Whatever lay at or beyond
        ``first_row`` (an unreferenced tail of a killed run) is replaced and cut off."""
        data = np.ascontiguousarray(embeddings, dtype="<f2")
        if data.shape[1:] != self.shape:
            raise VectorFileError(f"embeddings of shape {data.shape[1:]} do not fit a {self.shape} matrix")
        with open(self.path, "r+b") as f:
            f.seek(HEADER_BYTES + first_row * self.row_bytes)
            f.write(data.tobytes())
            f.truncate()
            f.flush()
            os.fsync(f.fileno())

    def truncate(self, rows: int) -> None:
        """Drop an unreferenced tail (rows at and beyond ``rows``)."""
        end = HEADER_BYTES + rows * self.row_bytes
        if self.path.stat().st_size > end:
            with open(self.path, "r+b") as f:
                f.truncate(end)


def open_matrix(path: Path, rows: int, num_queries: int, embed_dim: int) -> np.ndarray:
    """The first ``rows`` rows of a matrix file, memory-mapped read-only as (rows, Q, D) float16.

    Rows the file does not hold in full (a matrix cut short by a crash of the file system) are left out: the
    caller treats them as dead."""
    if rows == 0:
        return np.empty((0, num_queries, embed_dim), np.float16)
    q, d = read_header(path)
    if (q, d) != (num_queries, embed_dim):
        raise VectorFileError(f"'{path}' stores {q}x{d} embeddings; the index says {num_queries}x{embed_dim}")
    whole = (path.stat().st_size - HEADER_BYTES) // (q * d * 2)
    rows = min(rows, whole)
    if rows <= 0:
        return np.empty((0, q, d), np.float16)
    return np.memmap(path, dtype="<f2", mode="r", offset=HEADER_BYTES, shape=(rows, q, d))
