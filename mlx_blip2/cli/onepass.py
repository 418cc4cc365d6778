"""``mlx-blip2 caption DIR --index DB [--index-model ITM]``: caption a library and index it in one pass
(:mod:`mlx_blip2.photo_index.onepass`). Exit status: that of ``caption``, or 1 when the index recorded unreadable
images and the captions did not."""

from __future__ import annotations

import argparse
import sys


def add_index_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("one pass: caption and index together")
    g.add_argument("--index", default=None, metavar="DB",
                   help="also add the images, and their captions, to this photo index (as 'mlx-blip2 index' does) "
                        "in the same pass: each image decoded once, one ViT pass when the two checkpoints' vision "
                        "weights are equal")
    g.add_argument("--index-model", default=None, metavar="ITM",
                   help="the retrieval checkpoint for --index (default: the index's, or Salesforce/blip2-itm-vit-g)")


def run_one_pass(args, job, load_captioning, report_captions, err=sys.stderr) -> int:
    """The caption job ``job`` and an index job for ``args.index``, together; ``report_captions(summary, notes)``
    prints the caption side as ``caption`` does."""
    from ..files import display_path
    from ..library.launch import current_group
    from ..photo_index import check_retrieval_checkpoint
    from ..photo_index.job import IndexJob
    from ..photo_index.onepass import caption_and_index
    from .common import model_dtype

    if args.index_model is not None:
        check_retrieval_checkpoint(args.index_model, "caption --index")  # from config.json, before any weight
    index_job = IndexJob(paths=job.inputs, db=args.index, model=args.index_model, recursive=job.recursive,
                         batch_size=job.batch_size, dtype=model_dtype(args), progress=False if args.quiet else None)
    result = caption_and_index(load_captioning, job, index_job, group=current_group(), log=err)
    if result.index is None:  # another rank of a launched job
        return 0
    report_captions(result.summary, result.notes)
    report = result.index
    for path, reason in report.failed:
        print(f"unreadable: {display_path(path)}: {reason}", file=err)
    if not args.quiet:
        print(f"{display_path(args.index)}: {report.summary()}; {report.searchable} images searchable", file=err)
    code = result.summary.exit_code
    return code if code else (1 if report.failed or report.still_failed else 0)
