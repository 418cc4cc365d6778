"""A searchable photo index: BLIP-2 image embeddings in SQLite, text search by ITC with an optional ITM rerank.

    mlx-blip2 index ~/Pictures --recursive --db library.sqlite [--model Salesforce/blip2-itm-vit-g]
    mlx-blip2 search "a dog on a beach" --db library.sqlite [-k 10] [--rerank] [--json]
    mlx-blip2 search --db library.sqlite        # queries from stdin, model and embeddings loaded once

Each image is stored as its normalised projected query outputs (num_query_tokens x embed_dim float16, 16 KiB for
blip2-itm-vit-g) with its path, size and mtime. Re-indexing is incremental: a file whose size and mtime are
unchanged is skipped, a changed one is re-embedded, one that disappeared is dropped. A file that cannot be decoded
is recorded with the reason (and retried once it changes), never fatal.

Writes go in one transaction per batch in WAL mode, so a killed run keeps every finished batch and a search can
run while indexing. Search scores all stored images at once: one float32 matrix-vector product over a cached
(images x queries, embed_dim) matrix, the max over each image's queries, then a partial sort for the top k.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .library import Progress

SCHEMA_VERSION = 1
# What Pillow decodes out of the box; anything else in a folder is not an image and is left alone.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
    ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".jpx",
})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id         INTEGER PRIMARY KEY,
    path       TEXT NOT NULL UNIQUE,  -- absolute
    size       INTEGER NOT NULL,      -- bytes, from stat() when the file was read
    mtime_ns   INTEGER NOT NULL,
    embedding  BLOB,                  -- float16 (num_query_tokens, embed_dim), C order; NULL if the file is bad
    error      TEXT,                  -- why the file could not be indexed (NULL when it was)
    indexed_at REAL NOT NULL
);
"""


_CHUNK_ROWS = 64  # embeddings read and converted at a time: 1 MiB of float16 for blip2-itm-vit-g, cache-sized
_HALF_SCALE = np.float32(2.0 ** 112)  # 2 ** (float32 exponent bias - float16 exponent bias)
_SIGN_AND_MAGNITUDE = np.int32(-0x70000001)  # 0x8FFFFFFF: the sign bit and the 28 bits a shifted half fills


def _half_to_float(halves: np.ndarray, out: np.ndarray) -> None:
    """float16 values (viewed as int16) -> float32 values written into ``out`` (viewed as int32), exactly.

    3-4x faster than numpy's float16 cast, which converts element by element: widened with sign extension and
    shifted left by 13, a half's exponent and mantissa bits sit where float32 keeps them (the copies of the sign
    bit above them are masked off, leaving one in float32's sign position), reading as a float32 2**112 times too
    small, subnormals included; one multiply fixes it. Not valid for inf/NaN, which normalised embeddings never hold.
    """
    np.copyto(out, halves)
    out <<= 13
    out &= _SIGN_AND_MAGNITUDE
    values = out.view(np.float32)
    values *= _HALF_SCALE


class PhotoIndexError(ValueError):
    """A database that cannot be used as a photo index (wrong file, other schema, other model)."""


# --- progress ----------------------------------------------------------------------------------------------------


# --- the store ---------------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    path: str
    score: float
    itc: float
    itm: float | None = None  # ITM match probability, when re-ranked
    itm_logit: float | None = None

    def to_dict(self) -> dict:
        d = {"path": self.path, "score": self.score, "itc": self.itc}
        if self.itm is not None:
            d.update(itm=self.itm, itm_logit=self.itm_logit)
        return d


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run's new failures
    ignored: int = 0  # files that are not images, by extension

    def summary(self) -> str:
        return (f"{self.added} added, {self.updated} updated, {self.unchanged} unchanged, {self.removed} removed, "
                f"{len(self.failed)} unreadable, {self.ignored} non-image files ignored")


@dataclass
class _Matrix:
    generation: int
    ids: np.ndarray  # (N,) row ids
    paths: list[str]
    vectors: np.ndarray  # (N * Q, D) float32
    num_queries: int


class PhotoIndex:
    """The SQLite store. ``PhotoIndex(path)`` opens (and with ``create=True`` creates) a database."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"no photo index at '{self.path}'; build one with: mlx-blip2 index DIR --db "
                                    f"{self.path}")
        try:
            # Autocommit mode: transactions are opened explicitly (one per batch).
            self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
            # 16 KiB pages (only takes effect on a new file) suit the 16 KiB embedding blobs; reading them through
            # mmap instead of read() calls halves the time to load a large index.
            self.db.execute("PRAGMA page_size=16384")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute(f"PRAGMA mmap_size={1 << 36}")
            self.db.executescript(_SCHEMA)
            version = self.get_meta("schema_version")
            if version is None:
                self.set_meta("schema_version", str(SCHEMA_VERSION))
            elif int(version) != SCHEMA_VERSION:
                raise PhotoIndexError(f"'{self.path}' has photo index schema version {version}; this mlx-blip2 "
                                      f"reads version {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise PhotoIndexError(f"'{self.path}' is not a usable photo index database: {e}") from None
        self._matrix: _Matrix | None = None
        self._wrote = False

    def close(self) -> None:
        if self._wrote:
            # Fold the write-ahead log back into the database: later readers then find every page in one place.
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # a concurrent reader holds it; SQLite checkpoints later on its own
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

    def generation(self) -> int:
        """Bumped by every write transaction; the cached search matrix is rebuilt when it changes."""
        return int(self.get_meta("generation") or 0)

    def _begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        self.set_meta("generation", str(self.generation() + 1))
        self.db.execute("COMMIT")
        self._wrote = True

    def bind_model(self, model: str, num_queries: int, embed_dim: int) -> None:
        """Record which model the embeddings come from; refuse to mix embeddings of different models."""
        stored = self.model
        if stored is not None and stored != model:
            raise PhotoIndexError(f"'{self.path}' holds embeddings from {stored}, not {model}; index with "
                                  f"--model {stored} or use another --db")
        shape = (self.get_meta("num_query_tokens"), self.get_meta("embed_dim"))
        if shape != (None, None) and shape != (str(num_queries), str(embed_dim)):
            raise PhotoIndexError(f"'{self.path}' stores {shape[0]}x{shape[1]} embeddings; {model} makes "
                                  f"{num_queries}x{embed_dim}")
        if stored is None:
            self._begin()
            self.set_meta("model", model)
            self.set_meta("num_query_tokens", str(num_queries))
            self.set_meta("embed_dim", str(embed_dim))
            self._commit()

    # --- rows --------------------------------------------------------------------------------------------------

    def files(self) -> dict[str, tuple[int, int, bool]]:
        """path -> (size, mtime_ns, ok) for every stored file."""
        rows = self.db.execute("SELECT path, size, mtime_ns, embedding IS NOT NULL FROM images")
        return {p: (s, m, bool(ok)) for p, s, m, ok in rows}

    def errors(self) -> list[tuple[str, str]]:
        """(path, reason) for the files recorded as unreadable."""
        return self.db.execute("SELECT path, error FROM images WHERE embedding IS NULL ORDER BY path").fetchall()

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images WHERE embedding IS NOT NULL").fetchone()[0]

    def write_batch(self, embedded: Sequence[tuple[str, int, int, np.ndarray]],
                    failed: Sequence[tuple[str, int, int, str]] = (), removed: Iterable[str] = ()) -> None:
        """One transaction: store embeddings (path, size, mtime_ns, (Q, D) array), record failures (path, size,
        mtime_ns, reason) and drop removed paths. Either all of it lands or, if the process dies, none."""
        now = time.time()
        upsert = ("INSERT INTO images(path, size, mtime_ns, embedding, error, indexed_at) VALUES (?, ?, ?, ?, ?, ?) "
                  "ON CONFLICT(path) DO UPDATE SET size=excluded.size, mtime_ns=excluded.mtime_ns, "
                  "embedding=excluded.embedding, error=excluded.error, indexed_at=excluded.indexed_at")
        rows = [(p, s, m, np.ascontiguousarray(e, dtype=np.float16).tobytes(), None, now) for p, s, m, e in embedded]
        rows += [(p, s, m, None, reason, now) for p, s, m, reason in failed]
        self._begin()
        try:
            self.db.executemany(upsert, rows)
            self.db.executemany("DELETE FROM images WHERE path = ?", [(p,) for p in removed])
            self._commit()
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # --- search ------------------------------------------------------------------------------------------------

    def matrix(self) -> _Matrix:
        """All stored embeddings as one float32 (N * Q, D) matrix, cached until the index changes."""
        generation = self.generation()
        if self._matrix is not None and self._matrix.generation == generation:
            return self._matrix
        q = int(self.get_meta("num_query_tokens") or 0)
        d = int(self.get_meta("embed_dim") or 0)
        self.db.execute("BEGIN")  # one snapshot for the count and the rows
        try:
            generation = self.generation()
            n = self.count()
            vectors = np.empty((n * q, d), np.float32)
            ids = np.empty(n, np.int64)
            paths: list[str] = []
            cursor = self.db.execute("SELECT id, path, embedding FROM images WHERE embedding IS NOT NULL ORDER BY id")
            row_bytes, filled = q * d * 2, 0
            flat = vectors.reshape(-1).view(np.int32)
            while True:
                chunk = cursor.fetchmany(_CHUNK_ROWS)
                if not chunk:
                    break
                good = [r for r in chunk if len(r[2]) == row_bytes]  # a damaged blob must not shift the others
                if good:
                    halves = np.frombuffer(b"".join(r[2] for r in good), np.int16)
                    _half_to_float(halves, flat[filled * q * d:(filled + len(good)) * q * d])
                    ids[filled:filled + len(good)] = [r[0] for r in good]
                    paths.extend(r[1] for r in good)
                    filled += len(good)
        finally:
            self.db.execute("COMMIT")
        self._matrix = _Matrix(generation, ids[:filled], paths, vectors[:filled * q], q)
        return self._matrix

    def scores(self, text_embed: np.ndarray, m: _Matrix | None = None) -> np.ndarray:
        """ITC score of every stored image for one normalised text embedding (D,): max over the queries."""
        m = self.matrix() if m is None else m
        if not m.paths:
            return np.empty(0, np.float32)
        t = np.asarray(text_embed, np.float32).reshape(-1)
        if t.shape[0] != m.vectors.shape[1]:
            raise PhotoIndexError(f"text embedding has {t.shape[0]} dims; the index stores {m.vectors.shape[1]}")
        return (m.vectors @ t).reshape(len(m.paths), m.num_queries).max(axis=1)

    def top_k(self, text_embed: np.ndarray, k: int) -> list[SearchResult]:
        """The k best images by ITC, best first (ties in index order)."""
        m = self.matrix()  # one snapshot for the scores and the paths they index
        scores = self.scores(text_embed, m)
        k = min(k, scores.shape[0])
        if k <= 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
        top = top[np.lexsort((top, -scores[top]))]
        return [SearchResult(m.paths[i], float(scores[i]), float(scores[i])) for i in top]


# --- indexing ----------------------------------------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
    # Dot files include macOS "._name.jpg" resource forks, which carry an image extension but are not images.
    return name.startswith(".")


def scan(paths: Sequence[str | os.PathLike], recursive: bool = False):
    """Files to index under ``paths`` (directories, or image files named directly).

    Returns (files: path -> (size, mtime_ns), in_scope: path -> bool saying whether a stored path lies in what
    was scanned, ignored: count of non-image files). Hidden files and folders are skipped.
    """
    files: dict[str, tuple[int, int]] = {}
    roots: list[str] = []
    named: set[str] = set()
    ignored = 0

    def add(path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return  # vanished or unreadable metadata: treated as absent
        files[path] = (st.st_size, st.st_mtime_ns)

    for arg in paths:
        root = os.path.abspath(os.fspath(arg))
        if os.path.isfile(root):
            named.add(root)
            add(root)
            continue
        if not os.path.isdir(root):
            raise FileNotFoundError(f"no such directory or file: '{arg}'")
        roots.append(root)
        walker = os.walk(root) if recursive else [(root, [], [e.name for e in os.scandir(root) if e.is_file()])]
        for dirpath, dirnames, filenames in walker:
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for name in sorted(filenames):
                if _is_hidden(name):
                    continue
                if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                    ignored += 1
                    continue
                add(os.path.join(dirpath, name))

    def in_scope(path: str) -> bool:
        if path in named:
            return True
        parent = os.path.dirname(path)
        return any(parent == r or (recursive and path.startswith(r.rstrip(os.sep) + os.sep)) for r in roots)

    return files, in_scope, ignored


def model_id(path_or_repo_id: str | os.PathLike) -> str:
    """How a model is named in the index: a local directory by its absolute path, otherwise the Hub repo id."""
    path = Path(path_or_repo_id).expanduser()
    return str(path.resolve()) if path.is_dir() else str(path_or_repo_id)


class ImageEmbedder:
    """Image files -> (Q, D) embeddings with the vision half of a retrieval checkpoint (no text weights read)."""

    def __init__(self, model: str, dtype=None, batch_size: int = 8):
        from .pipelines.retrieval import Blip2RetrievalPipeline

        self.pipe = Blip2RetrievalPipeline.from_pretrained(model, dtype=dtype, part="vision", batch_size=batch_size)
        config = self.pipe.model.config
        self.num_queries, self.embed_dim = config.num_query_tokens, config.image_text_hidden_size

    def preprocess(self, path: str) -> np.ndarray:
        """Decode and normalise one file (thread-safe); raises for unreadable files."""
        return self.pipe.processor.image_processor.preprocess(path)

    def embed(self, pixel_values: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        return np.array(self.pipe.model.get_image_embeds(pixel_values).astype(mx.float32))


def _load_one(embedder: ImageEmbedder, path: str):
    try:
        return embedder.preprocess(path), None
    except FileNotFoundError:
        return None, FileNotFoundError
    except Exception as e:  # noqa: BLE001  any decoder failure makes the file "bad", never the run
        return None, f"{type(e).__name__}: {e}"


def index_paths(db: PhotoIndex, paths: Sequence[str | os.PathLike], model: str | None = None,
                recursive: bool = False, batch_size: int = 8, dtype=None, progress: bool | None = None,
                embedder_factory: Callable[[str], ImageEmbedder] | None = None) -> IndexReport:
    """Bring the index up to date with ``paths``: embed new and changed images, drop deleted ones.

    ``model`` defaults to the one the index was built with (or Salesforce/blip2-itm-vit-g for a new index). The
    model is only loaded when some file needs embedding. ``progress`` None means a bar on stderr if it is a tty.
    """
    from .models.retrieval import DEFAULT_RETRIEVAL_MODEL

    model = model_id(model) if model is not None else (db.model or DEFAULT_RETRIEVAL_MODEL)
    if db.model is not None and db.model != model:
        raise PhotoIndexError(f"'{db.path}' holds embeddings from {db.model}, not {model}; index with "
                              f"--model {db.model} or use another --db")
    report = IndexReport()
    found, in_scope, report.ignored = scan(paths, recursive)
    stored = db.files()
    removed = [p for p in stored if p not in found and in_scope(p)]
    todo = []
    for path, (size, mtime) in found.items():
        old = stored.get(path)
        if old is not None and old[:2] == (size, mtime):
            report.unchanged += 1
        else:
            todo.append((path, size, mtime, old is not None))
    if removed:
        db.write_batch([], removed=removed)
        report.removed = len(removed)
    if not todo:
        return report

    embedder = (embedder_factory or (lambda m: ImageEmbedder(m, dtype=dtype, batch_size=batch_size)))(model)
    db.bind_model(model, embedder.num_queries, embedder.embed_dim)
    bar, done = Progress(len(todo), enabled=progress), 0
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # Decode ahead of the model: the next batch's files are read while this batch is embedded.
        pending: deque = deque()
        queue = iter(todo)

        def refill():
            while len(pending) < 2 * batch_size:
                item = next(queue, None)
                if item is None:
                    return
                pending.append((item, pool.submit(_load_one, embedder, item[0])))

        refill()
        while pending:
            batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            refill()
            good, bad, gone = [], [], []
            for (path, size, mtime, existed), future in batch:
                pixels, error = future.result()
                if error is FileNotFoundError:
                    if existed:
                        gone.append(path)  # deleted since the scan
                elif error is not None:
                    bad.append((path, size, mtime, error))
                    report.failed.append((path, error))
                else:
                    good.append((path, size, mtime, existed, pixels))
            embedded = []
            if good:
                embeds = embedder.embed(np.stack([g[4] for g in good]))
                embedded = [(p, s, m, e) for (p, s, m, _, _), e in zip(good, embeds)]
                for g in good:
                    if g[3]:
                        report.updated += 1
                    else:
                        report.added += 1
            db.write_batch(embedded, bad, gone)
            report.removed += len(gone)
            done += len(batch)
            bar.update(done)
    bar.close()
    return report


# --- search ------------------------------------------------------------------------------------------------------


def search(db: PhotoIndex, query: str, k: int = 10, model: str | None = None, rerank: bool = False,
           candidates: int | None = None, dtype=None, pipeline=None) -> list[SearchResult]:
    """The k best stored images for a text query, best first.

    ITC over every stored embedding; with ``rerank`` the best ``candidates`` (default k) whose files can still be
    read are re-scored with ITM (score = ITM match logit + ITC, as LAVIS ranks) — that re-runs the ViT on them.
    ``pipeline`` may be a loaded retrieval pipeline (the full model when re-ranking); otherwise it is loaded from
    ``model`` or the index's model (text half only without ``rerank``).
    """
    if not isinstance(query, str) or not query.strip():
        raise ValueError("the search text is empty")
    if db.count() == 0:
        return []
    if pipeline is None:
        from .pipelines.retrieval import Blip2RetrievalPipeline

        name = model or db.model
        if name is None:
            raise PhotoIndexError(f"'{db.path}' does not say which model built it; pass --model")
        pipeline = Blip2RetrievalPipeline.from_pretrained(name, dtype=dtype, part="full" if rerank else "text")
    results = db.top_k(pipeline.embed_texts(query), max(k, candidates or 0) if rerank else k)
    if not rerank:
        return results
    from .processing import load_image

    images, kept = [], []
    for r in results:
        try:
            images.append(load_image(r.path))
            kept.append(r)
        except (OSError, ValueError) as e:
            print(f"warning: {r.path} left out of the re-ranking: {e}", file=sys.stderr)
    ranked = pipeline.rerank(query, images, [r.itc for r in kept])
    return [SearchResult(kept[x.index].path, x.score, x.itc, x.itm, x.itm_logit) for x in ranked[:k]]


# --- command line ------------------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="the SQLite index file (created by 'index')")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute precision (default: float32 on the CPU, float16 on a GPU)")


def _dtype(args):
    if not args.dtype:
        return None
    import mlx.core as mx

    return getattr(mx, args.dtype)


def cmd_index(args) -> int:
    with PhotoIndex(args.db) as db:
        report = index_paths(db, args.dirs, model=args.model, recursive=args.recursive,
                             batch_size=args.batch_size, dtype=_dtype(args))
        for path, reason in report.failed:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        print(f"{db.path}: {report.summary()}; {db.count()} images searchable, {len(db.errors())} unreadable on "
              "record")
    return 0


def format_table(results: Sequence[SearchResult]) -> str:
    reranked = any(r.itm is not None for r in results)
    head = f"{'rank':>4}  {'score':>8}  " + (f"{'itc':>7}  {'itm':>6}  " if reranked else "") + "path"
    lines = [head]
    for i, r in enumerate(results, 1):
        extra = f"{r.itc:7.4f}  {r.itm:6.3f}  " if reranked else ""
        lines.append(f"{i:>4}  {r.score:8.4f}  {extra}{r.path}")
    return "\n".join(lines)


def _print_results(results: Sequence[SearchResult], as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"rank": i, **r.to_dict()} for i, r in enumerate(results, 1)], indent=2), flush=True)
    elif results:
        print(format_table(results), flush=True)


def cmd_search(args) -> int:
    if args.k <= 0:
        raise ValueError("-k must be positive")
    with PhotoIndex(args.db, create=False) as db:
        model = model_id(args.model) if args.model else None
        if model and db.model and model != db.model:
            print(f"warning: '{args.db}' was built with {db.model}; searching with {model}", file=sys.stderr)
        if db.count() == 0:
            print(f"'{args.db}' holds no searchable images", file=sys.stderr)
            _print_results([], args.json)
            return 0
        from .pipelines.retrieval import Blip2RetrievalPipeline

        pipeline = Blip2RetrievalPipeline.from_pretrained(model or db.model, dtype=_dtype(args),
                                                          part="full" if args.rerank else "text")
        if args.query is not None:
            _print_results(search(db, args.query, k=args.k, rerank=args.rerank, candidates=args.candidates,
                                  pipeline=pipeline), args.json)
            return 0
        # Queries from stdin, one per line: the model and the embedding matrix stay loaded between them.
        interactive = sys.stdin.isatty()
        if interactive:
            print("one query per line; an empty line or Ctrl-D ends", file=sys.stderr)
        for line in iter(lambda: _prompt(interactive), None):
            query = line.strip()
            if not query:
                if interactive:
                    break
                continue
            t = time.perf_counter()
            _print_results(search(db, query, k=args.k, rerank=args.rerank, candidates=args.candidates,
                                  pipeline=pipeline), args.json)
            if interactive:
                print(f"({time.perf_counter() - t:.2f} s)", file=sys.stderr)
    return 0


def _prompt(interactive: bool) -> str | None:
    if interactive:
        sys.stderr.write("search> ")
        sys.stderr.flush()
    line = sys.stdin.readline()
    return line if line else None


def _run(handler):
    def run(args) -> int:
        try:
            return handler(args)
        except (PhotoIndexError, sqlite3.Error) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def add_index_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("index", help="add folders of photos to a searchable index",
                              description="Embed images into an SQLite index for 'mlx-blip2 search'. Incremental: "
                                          "unchanged files are skipped, changed ones re-embedded, deleted ones "
                                          "dropped; unreadable files are recorded and skipped.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders (or single image files) to index")
    p.add_argument("--model", "-m", default=None, help="retrieval checkpoint directory or Hub repo id (default: the "
                   "index's model, or Salesforce/blip2-itm-vit-g for a new index)")
    p.add_argument("--recursive", "-r", action="store_true", help="include subfolders")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call and per transaction (default: 8)")
    _add_common(p)
    p.set_defaults(func=_run(cmd_index))
    return p


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("search", help="find indexed photos matching a text",
                              description="Rank the images of an index by ITC similarity to a text, optionally "
                                          "re-scoring the best ones with the ITM head.")
    p.add_argument("query", nargs="?", default=None, help="what to look for, e.g. 'a dog on a beach'; without it, "
                   "queries are read from stdin one per line, with the model and embeddings loaded once")
    p.add_argument("-k", type=int, default=10, help="number of results (default: 10)")
    p.add_argument("--rerank", action="store_true", help="re-score the top candidates with ITM (reads those images "
                   "again and runs the full model)")
    p.add_argument("--candidates", type=int, default=None, help="how many ITC results --rerank re-scores "
                   "(default: k)")
    p.add_argument("--model", "-m", default=None, help="checkpoint (default: the one the index was built with)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_common(p)
    p.set_defaults(func=_run(cmd_search))
    return p
