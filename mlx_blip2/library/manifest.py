"""Manifests: the list of images to caption given as a file, instead of a folder walk (``--manifest FILE``).

A manifest is a text file of paths (one a line; blank lines and lines starting with ``#`` are skipped), or a CSV or
Parquet file with a ``path`` column (Parquet needs pyarrow: ``pip install 'mlx-blip2[parquet]'``). Relative paths are
relative to the manifest's folder. Nothing is walked or filtered: every path is an image to caption, in the
manifest's order (a path given twice counts once); a missing or unreadable file gets an error record. The order is
the contract for Parquet output shards: append to a manifest, never reorder it.
"""

from __future__ import annotations

import csv
import io
import os

from ..files import ImageFile, display_path
from .writer import UsageError


def _text_paths(data: bytes) -> list[str]:
    text = data.decode("utf-8", "surrogateescape")
    return [line.rstrip("\r") for line in text.split("\n") if line.strip() and not line.lstrip().startswith("#")]


def _csv_paths(data: bytes, shown: str) -> list[str]:
    rows = csv.DictReader(io.StringIO(data.decode("utf-8-sig", "surrogateescape"), newline=""))
    if "path" not in (rows.fieldnames or ()):
        raise UsageError(f"manifest '{shown}' has no 'path' column (columns: {rows.fieldnames or []})")
    return [row["path"] for row in rows if row.get("path")]


def _parquet_paths(path: str, shown: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("a Parquet manifest needs pyarrow: pip install 'mlx-blip2[parquet]'") from None
    try:
        table = pq.read_table(path, columns=["path"])
    except (KeyError, ValueError) as e:
        raise UsageError(f"manifest '{shown}' has no 'path' column: {e}") from None
    return [p for p in table.column("path").to_pylist() if p]


def manifest_paths(manifest: str | os.PathLike) -> list[str]:
    """The paths a manifest lists, as written (FileNotFoundError if the manifest itself is missing)."""
    path = os.fspath(manifest)
    shown = display_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such manifest: '{shown}'")
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        return _parquet_paths(path, shown)
    with open(path, "rb") as f:
        data = f.read()
    return _csv_paths(data, shown) if lower.endswith(".csv") else _text_paths(data)


def read_manifest(manifest: str | os.PathLike) -> list[ImageFile]:
    """The images a manifest lists, once each, in its order. ``key`` (for ``--shard``) is the path as written."""
    base = os.path.dirname(os.path.abspath(os.fspath(manifest)))
    seen: dict[str, ImageFile] = {}
    for written in manifest_paths(manifest):
        written = os.fsdecode(written)
        absolute = os.path.normpath(os.path.join(base, os.path.expanduser(written)))
        if absolute not in seen:
            seen[absolute] = ImageFile(absolute, written, written)
    return list(seen.values())
