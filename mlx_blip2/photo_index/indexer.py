"""Indexing: bring the store up to date with folders of photos.

``find_images`` lists the files (the same rules as ``caption``: HEIC/HEIF/AVIF included, hidden and AppleDouble
files skipped, symlink loops cut, names that are not UTF-8 kept exactly). Unchanged files (same size and mtime) are
skipped; a new file with the size and content hash of one that disappeared is a move or rename: its entry follows
it, nothing is re-embedded. Everything else is decoded on background threads
(:meth:`Blip2RetrievalPipeline.preprocess`) while the model embeds the previous batch
(:meth:`Blip2RetrievalPipeline.embed_images`), and each batch is one transaction. Files that cannot be decoded
are recorded with the reason (retried once they change), never fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..files import find_images, utf8_text
from .captions import refresh_from_sidecars
from .store import Entry, Move, PhotoIndex, PhotoIndexError


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    moved: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run's new failures
    still_failed: list[tuple[str, str]] = field(default_factory=list)  # unchanged files recorded as unreadable
    ignored: int = 0  # files that are not images, by extension
    errors: list[str] = field(default_factory=list)  # ranks of a launched job that stopped early
    searchable: int = 0  # images in the index with an embedding, once the job is done

    def summary(self) -> str:
        return (f"{self.added} added, {self.updated} updated, {self.unchanged} unchanged, {self.moved} moved, "
                f"{self.removed} removed, {len(self.failed)} unreadable"
                + (f" ({len(self.still_failed)} more unreadable on record)" if self.still_failed else "")
                + f", {self.ignored} non-image files ignored")


def model_id(path_or_repo_id: str | os.PathLike) -> str:
    """How a model is named in the index: a local directory by its absolute path, otherwise the Hub repo id."""
    path = Path(path_or_repo_id).expanduser()
    return str(path.resolve()) if path.is_dir() else str(path_or_repo_id)


def check_retrieval_checkpoint(model: str, command: str = "index") -> Path:
    """The checkpoint directory, after checking (from its config, before any weight is read) that it is a
    retrieval checkpoint; a ValueError naming the kind ``command`` needs otherwise."""
    from ..models.loading import resolve_checkpoint
    from ..models.registry import RETRIEVAL, require_kind

    directory = resolve_checkpoint(model)
    require_kind(directory, RETRIEVAL, command)
    return directory


def load_embedder(model: str, dtype=None):
    """The vision half of a retrieval checkpoint (no text weights read): ``preprocess`` and ``embed_images``."""
    from ..pipelines.retrieval import Blip2RetrievalPipeline

    return Blip2RetrievalPipeline.from_pretrained(check_retrieval_checkpoint(model), dtype=dtype, part="vision")


def file_hash(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def _load_one(embedder, path: str):
    """(pixels, sha256, error): error is FileNotFoundError for a file that vanished, else a reason or None."""
    try:
        return embedder.preprocess(path), file_hash(path), None
    except FileNotFoundError:
        return None, None, FileNotFoundError
    except Exception as e:  # noqa: BLE001  any decoder failure makes the file "bad", never the run
        return None, None, utf8_text(str(e) or type(e).__name__)


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # vanished or unreadable metadata: treated as absent
    return st.st_size, st.st_mtime_ns


def _find_moves(db: PhotoIndex, removed: list[str], todo: list) -> list[Move]:
    """New files whose size and content hash are those of a removed entry: moves (taken out of ``todo``)."""
    stored = db.hashes(removed)
    by_key = {v: p for p, v in stored.items()}
    sizes = {size for size, _ in stored.values()}
    moves, keep = [], []
    for item in todo:
        path, size, mtime, existed = item
        if not existed and size in sizes:
            try:
                old = by_key.pop((size, file_hash(path)), None)
            except OSError:
                old = None
            if old is not None:
                moves.append(Move(old, path, size, mtime))
                continue
        keep.append(item)
    todo[:] = keep
    return moves


def index_paths(db: PhotoIndex, paths: Sequence[str | os.PathLike], model: str | None = None,
                recursive: bool = False, batch_size: int = 8, dtype=None, progress: bool | None = None,
                embedder_factory: Callable[[str], object] | None = None) -> IndexReport:
    """Bring the index up to date with ``paths``: embed new and changed images, move moved ones, drop deleted ones.

    ``model`` defaults to the one the index was built with (or Salesforce/blip2-itm-vit-g for a new index). The
    model is only loaded (``embedder_factory(model)``, default :func:`load_embedder`) when some file needs embedding.
    ``progress`` None means a bar on stderr if it is a terminal.
    """
    from ..models.retrieval import DEFAULT_RETRIEVAL_MODEL

    model = model_id(model) if model is not None else (db.model or DEFAULT_RETRIEVAL_MODEL)
    if db.model is not None and db.model != model:
        raise PhotoIndexError(f"'{db.path}' holds embeddings from {db.model}, not {model}; index with "
                              f"--model {db.model} or use another --db")
    report = IndexReport()
    found = find_images(paths, recursive)
    report.ignored = found.ignored
    current = {f.path: st for f in found.files if (st := _stat(f.path)) is not None}
    stored = db.files()
    removed = [p for p in stored if p not in current and found.in_scope(p)]
    todo = []
    for path, (size, mtime) in current.items():
        old = stored.get(path)
        if old is not None and old[:2] == (size, mtime):
            report.unchanged += 1
            if not old[2]:
                report.still_failed.append((path, None))
        else:
            todo.append((path, size, mtime, old is not None))
    if report.still_failed:
        reasons = dict(db.errors())
        report.still_failed = [(p, reasons.get(p) or "unreadable") for p, _ in report.still_failed]
    moves = _find_moves(db, removed, todo) if removed else []
    removed = sorted(set(removed) - {m.old_path for m in moves})
    if removed or moves:
        db.write_batch(removed=removed, moved=moves)
        report.removed, report.moved = len(removed), len(moves)
    if todo:
        embedder = (embedder_factory or (lambda m: load_embedder(m, dtype=dtype)))(model)
        config = embedder.model.config
        db.bind_model(model, config.num_query_tokens, config.image_text_hidden_size)
        _embed_all(db, embedder, todo, batch_size, report, progress)
    refresh_from_sidecars(db, current)  # captions of photo.txt / XMP sidecars that changed, into the caption index
    _record_roots(db, found)
    db.compact()
    return report


def _record_roots(db: PhotoIndex, found) -> None:
    """The folders the library was indexed from: the search page serves only files below them."""
    old = json.loads(db.get_meta("roots") or "[]")
    roots = sorted(set(old) | set(found.roots) | {os.path.dirname(p) for p in found.named})
    if roots != old:
        db.begin()
        db.set_meta("roots", json.dumps(roots))
        db.commit()


def _embed_all(db: PhotoIndex, embedder, todo: list, batch_size: int, report: IndexReport,
               progress: bool | None) -> None:
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(todo), unit="image", disable=not enabled, file=sys.stderr, dynamic_ncols=True)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool, bar:
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
                pixels, digest, error = future.result()
                if error is FileNotFoundError:
                    if existed:
                        gone.append(path)  # deleted since the scan
                elif error is not None:
                    bad.append((path, size, mtime, error))
                    report.failed.append((path, error))
                else:
                    good.append((path, size, mtime, existed, pixels, digest))
            entries = []
            if good:
                embeds = embedder.embed_images([g[4] for g in good], preprocessed=True)
                entries = [Entry(p, s, m, e, h) for (p, s, m, _, _, h), e in zip(good, embeds)]
                report.updated += sum(1 for g in good if g[3])
                report.added += sum(1 for g in good if not g[3])
            db.write_batch(entries, bad, gone)
            report.removed += len(gone)
            bar.update(len(batch))
