"""``mlx-blip2 index PATH... --db library.sqlite``: embed photos into a searchable index (incremental).

Exit status: 0 when every image found is indexed, 1 when some are unreadable (they are listed), 2 for usage errors
(bad paths, a checkpoint of the wrong kind, a database that is not a photo index or holds another model's
embeddings).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..files import display_path
from ..library.launch import is_follower
from .common import add_model_args, model_dtype


def add_parser(sub):
    p = sub.add_parser("index", help="add folders of photos to a searchable index",
                       description="Embed images into an index for 'mlx-blip2 search'. Incremental: unchanged files "
                                   "are skipped, moved or renamed ones followed (by content hash), changed ones "
                                   "re-embedded, deleted ones dropped; unreadable files are recorded and listed "
                                   "(exit status 1).")
    p.add_argument("paths", nargs="+", metavar="PATH", help="folders (or single image files) to index")
    p.add_argument("--db", required=True, help="the index file (SQLite; the embeddings go beside it in "
                   "DB.vectors)")
    p.add_argument("--recursive", "-r", action="store_true", help="include subfolders")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call and per transaction (default: 8)")
    p.add_argument("--captions", action="append", default=[], metavar="FILE",
                   help="a caption run's output (.jsonl or .csv) whose captions go into the index, for 'search' "
                        "to match (repeatable; photo.txt and XMP sidecars are read by every run anyway)")
    add_model_args(p, default_hint="the index's model, or Salesforce/blip2-itm-vit-g for a new index; a retrieval "
                   "checkpoint")
    return p


def index_job(args):
    """The IndexJob the command line describes."""
    from ..photo_index.job import IndexJob

    return IndexJob(paths=args.paths, db=args.db, model=args.model, recursive=args.recursive,
                    batch_size=args.batch_size, dtype=model_dtype(args))


def run(args) -> int:
    from ..photo_index import check_retrieval_checkpoint
    from ..photo_index.job import index

    job = index_job(args)
    job.check()
    for captions in args.captions:
        if not os.path.isfile(captions):
            raise FileNotFoundError(f"no caption file '{display_path(captions)}'")
    if job.model is not None:
        check_retrieval_checkpoint(job.model, "index")  # from config.json, before the database or any weight
    try:
        report = index(job)
    except Exception:
        if is_follower():  # rank 0 reports; mlx.launch would stop rank 0 if another rank exited non-zero
            return 0
        raise
    if report is None:  # another rank of a launched job
        return 0
    for path, reason in report.failed:
        print(f"unreadable: {display_path(path)}: {reason}", file=sys.stderr)
    for path, reason in report.still_failed:
        print(f"still unreadable (unchanged since it failed): {display_path(path)}: {reason}", file=sys.stderr)
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"{display_path(str(Path(job.db)))}: {report.summary()}; {report.searchable} images searchable")
    if args.captions:
        from ..photo_index.captions import import_caption_files

        print(f"{import_caption_files(job.db, args.captions)} captions taken from {', '.join(args.captions)}")
    return 1 if report.failed or report.still_failed or report.errors else 0
