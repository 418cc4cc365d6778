"""``mlx.launch -n N -- mlx-blip2 index PATH... --db library.sqlite``: several ranks embed, one index results.

Rank 0 takes a lock beside the index (a second launched run is refused), merges the part indexes a killed run left,
and decides which images need embedding (new or changed); every rank embeds every N-th of them into its own part
index (``.library.sqlite.part-R.sqlite``, an ordinary PhotoIndex: one transaction per batch, so a kill loses at most
a batch). At the end rank 0 copies the parts into the index (one write_batch per chunk: an interrupted merge is
redone next time), deletes them, and runs the ordinary incremental pass, which follows moves, drops deleted files and
embeds what a stopped rank left. Only rank 0 writes the index; search reads it unchanged. Moved files found by a
launched run are embedded again rather than followed (the ordinary pass then drops their old path).
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..files import find_images
from ..library.launch import Group, leftover_parts, open_lock_file, part_path
from .indexer import IndexReport, index_paths, model_id
from .store import Entry, PhotoIndex, PhotoIndexError

MERGE_CHUNK = 512
PART_SUFFIX = ".sqlite"


def part_index(db: str, rank: int) -> str:
    return part_path(db, rank, PART_SUFFIX)


def leftover_indexes(db: str) -> list[str]:
    return leftover_parts(db, PART_SUFFIX)


def _remove_index(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal", ".vectors"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


def merge_indexes(main: PhotoIndex, parts: list[str]) -> int:
    """Copy every entry (embeddings, hashes, failures) of the part indexes into ``main``, then delete the parts."""
    merged = 0
    for path in parts:
        with PhotoIndex(path, create=False) as part:
            files = part.files()
            if part.model is not None and files:
                main.bind_model(part.model, *part.shape)
            hashes, errors = part.hashes(files), dict(part.errors())
            items = sorted(files.items())
            for i in range(0, len(items), MERGE_CHUNK):
                chunk = items[i:i + MERGE_CHUNK]
                embedded = [Entry(p, s, m, part.embedding(p), hashes.get(p, (0, None))[1])
                            for p, (s, m, ok) in chunk if ok]
                failed = [(p, s, m, errors.get(p) or "unreadable") for p, (s, m, ok) in chunk if not ok]
                main.write_batch([e for e in embedded if e.embedding is not None], failed)
                merged += len(chunk)
        _remove_index(path)
    return merged


def _plan(db_path: str, files: list, model: str | None) -> tuple[dict, np.ndarray]:
    """Rank 0: merge leftovers, then which files need embedding, and the model to embed with."""
    from ..models.retrieval import DEFAULT_RETRIEVAL_MODEL

    with PhotoIndex(db_path) as db:
        merge_indexes(db, leftover_indexes(db_path))
        model = model_id(model) if model is not None else (db.model or DEFAULT_RETRIEVAL_MODEL)
        if db.model is not None and db.model != model:
            raise PhotoIndexError(f"'{db.path}' holds embeddings from {db.model}, not {model}; index with "
                                  f"--model {db.model} or use another --db")
        stored = db.files()
    mask = np.zeros(len(files), np.uint8)
    for i, f in enumerate(files):
        try:
            st = os.stat(f.path)
        except OSError:
            continue
        old = stored.get(f.path)
        mask[i] = old is None or old[:2] != (st.st_size, st.st_mtime_ns)
    return {"model": model}, mask


def _share(job, group: Group, files: list) -> tuple[str, object, list]:
    """Every rank: rank 0's plan, or its error, sent to all. Returns (the model to embed with, rank 0's lock on the
    index, this rank's share of the files to embed)."""
    header, mask, lock = {"model": None}, np.zeros(len(files), np.uint8), None
    if group.rank == 0:
        try:
            lock = open_lock_file(job.db, PhotoIndexError(f"another launched run is indexing into '{job.db}'"))
            header, mask = _plan(job.db, files, job.model)
        except (PhotoIndexError, OSError) as e:
            header = {"error": str(e)}
            if lock is not None:
                lock.close()
                lock = None
    header = group.broadcast_json(header)
    if "error" in header:
        raise PhotoIndexError(header["error"])
    todo = [f.path for f, m in zip(files, group.broadcast_mask(mask)) if m]
    return header["model"], lock, todo[group.rank::group.size]


def _embed_share(job, group: Group, model: str, share: list) -> dict:
    """Embed this rank's share into its part index; whatever goes wrong is reported (to rank 0), never raised."""
    report, fatal = IndexReport(), None
    if share:
        try:
            with PhotoIndex(part_index(job.db, group.rank)) as part:
                report = index_paths(part, share, model=model, batch_size=job.batch_size, dtype=job.dtype,
                                     progress=False)
        except Exception as e:  # noqa: BLE001 - reported by rank 0; its images are embedded by rank 0's last pass
            fatal = f"{type(e).__name__}: {e}"
    return {"added": report.added, "failed": report.failed, "fatal": fatal}


def run_launched(job, group: Group) -> IndexReport | None:
    """One rank's part of a launched IndexJob. Rank 0 returns the job's report, the other ranks None."""
    files = find_images(job.paths, job.recursive).files
    model, lock, share = _share(job, group, files)
    mine = _embed_share(job, group, model, share)
    reports = [json.loads(b) for b in group.gather(json.dumps(mine).encode("utf-8"))]
    try:
        if group.rank != 0:
            return None
        with PhotoIndex(job.db) as db:
            merge_indexes(db, leftover_indexes(job.db))
            final = index_paths(db, job.paths, model=model, recursive=job.recursive, batch_size=job.batch_size,
                                dtype=job.dtype, progress=job.progress)
        final.added += sum(r["added"] for r in reports)
        final.unchanged -= sum(r["added"] + len(r["failed"]) for r in reports)
        final.failed = [tuple(f) for r in reports for f in r["failed"]] + final.failed
        final.still_failed = [f for f in final.still_failed if f[0] not in {p for p, _ in final.failed}]
        final.errors = [f"rank {i}: {r['fatal']}" for i, r in enumerate(reports) if r["fatal"]]
        return final
    finally:
        group.barrier()  # the merge is done: only now may rank 0 exit non-zero
        if lock is not None:
            lock.close()
