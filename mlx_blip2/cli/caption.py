"""``mlx-blip2 caption IMAGES... [-r] [-o captions.jsonl | --format txt|xmp]``: caption images, folders and libraries.

Exit status: 0 every image captioned (or skipped), 1 some failed (listed at the end) or the output could not be
written, 2 usage error (bad flags, a missing input, a checkpoint of the wrong kind), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from ..files import IMAGE_EXTENSIONS
from ..library import DEFAULT_BATCH_SIZE, XMP_NAMES, parse_shard
from ..library.job import ALL_FORMATS, CaptionJob, caption
from ..library.launch import current_group, is_follower
from ..library.parquet import DEFAULT_SHARD_SIZE
from .common import (
    add_adapter_arg,
    add_generation_args,
    add_model_args,
    generation_kwargs,
    load_pipeline,
)
from .onepass import add_index_args, run_one_pass

EPILOG = """\
examples:
  mlx-blip2 caption photo.jpg                              print a caption
  mlx-blip2 caption ~/Pictures -r -o captions.jsonl         a whole library; rerun to resume
  mlx-blip2 caption ~/Pictures -r --format xmp              dc:description in photo.jpg.xmp (digiKam, darktable)
  mlx-blip2 caption ~/Pictures -r --format xmp --xmp-name photo.xmp   (Lightroom)
  mlx-blip2 caption dataset/ --format txt                   dataset/img1.txt next to dataset/img1.png
  mlx-blip2 caption /photos -r -o part2.jsonl --shard 2/3   the second third, on a second machine
  mlx.launch -n 2 -- mlx-blip2 caption /photos -r -o captions.jsonl   two processes (or --hosts: machines), one file
  mlx-blip2 caption --manifest paths.txt --format parquet -o shards/   a dataset: Parquet shards with done markers

records name each image by "path" (valid UTF-8); a file name that is not valid UTF-8 also gets "path_b64", the
base64 of its exact bytes.

exit status: 0 every image captioned (or skipped), 1 some failed (listed at the end), 2 usage error.
"""
MAX_LISTED = 50  # failures listed on stderr; every one is in the output file


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "caption", help="caption images, folders and photo libraries",
        description="Caption images: print them, write a jsonl/csv file, or write .txt/XMP sidecars. Images are "
                    "recognised by extension (" + " ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS)) + "); "
                    "other files are ignored. Image files are never modified.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", help="image files and folders (or --manifest)")
    p.add_argument("--manifest", default=None, metavar="FILE",
                   help="caption the images this file lists instead: a text file of paths (one a line), or a CSV or "
                        "Parquet file with a 'path' column; relative paths are relative to its folder; no walk")
    p.add_argument("-r", "--recursive", action="store_true", help="include images in subfolders")
    p.add_argument("-o", "--output", default=None,
                   help="write records to this file (jsonl, or csv when it ends in .csv); rerunning resumes")
    p.add_argument("--format", choices=ALL_FORMATS, default=None,
                   help="jsonl/csv records (to --output, or stdout), txt/xmp sidecars next to each image, or "
                        "parquet shards in the --output folder, each with a done marker (needs pyarrow) "
                        "(default: print 'path: caption', or jsonl with --output)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"images per Parquet shard (default: {DEFAULT_SHARD_SIZE})")
    p.add_argument("--xmp-name", choices=XMP_NAMES, default=XMP_NAMES[0],
                   help="XMP sidecar naming: photo.jpg.xmp (digiKam, darktable; default) or photo.xmp (Lightroom)")
    p.add_argument("--existing", choices=("skip", "overwrite"), default="skip",
                   help="skip images already captioned in the output or with a caption sidecar (default), or "
                        "caption them again")
    p.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                   help="caption only the I-th of N deterministic parts (1 <= I <= N), to share a library between "
                        "machines that share no storage; give each its own --output. Under mlx.launch the ranks "
                        "share the work (and one output) by themselves; --shard then picks the launch's part")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per model call (default: {DEFAULT_BATCH_SIZE})")
    p.add_argument("--workers", type=int, default=None,
                   help="image decoding threads (default: number of CPUs, at most 8)")
    p.add_argument("--prompt", default=None, help="text the caption continues, e.g. 'a photo of'")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar or summary line (failures are still listed)")
    add_model_args(p)
    add_adapter_arg(p)
    add_generation_args(p)
    add_index_args(p)
    return p


def _report(args, summary, notes, err) -> None:
    if not args.quiet:
        for note in notes:
            print(f"note: {note}", file=err)
        if summary.total == 0:
            hint = "" if args.recursive or args.manifest else " (use -r to look in subfolders)"
            print(f"no images found{hint}", file=err)
        else:
            print(summary.line(), file=err)
    for error in summary.errors:  # a launched job: a rank that stopped early (its images are retried next time)
        print(f"error: {error}", file=err)
    for display, error in summary.failed[:MAX_LISTED]:
        print(f"failed: {display}: {error}", file=err)
    if len(summary.failed) > MAX_LISTED:
        more = f"; every failure is in '{args.output}'" if args.output else ""
        print(f"failed: ... and {len(summary.failed) - MAX_LISTED} more{more}", file=err)


def caption_job(args) -> CaptionJob:
    """The job the command line describes."""
    from ..photo_index import model_id
    from ..pipelines import DEFAULT_MODEL

    if not args.images and args.manifest is None:
        raise ValueError("give image files or folders, or --manifest FILE")
    return CaptionJob(
        inputs=args.images, manifest=args.manifest, recursive=args.recursive, output=args.output, format=args.format,
        xmp_name=args.xmp_name, existing=args.existing, shard=args.shard, shard_size=args.shard_size,
        model_name=model_id(args.model or DEFAULT_MODEL), prompt=args.prompt, batch_size=args.batch_size,
        workers=args.workers, generate_kwargs=generation_kwargs(args), progress=False if args.quiet else None)


def run(args) -> int:
    err = sys.stderr
    try:
        job = caption_job(args)
        if args.index is not None:  # caption and index in one pass
            return run_one_pass(args, job, lambda: load_pipeline(args, "captioning", "caption"),
                                lambda summary, notes: _report(args, summary, notes, err), err)
        # The model is loaded only when something needs a caption; under mlx.launch this is one rank of the job.
        summary, notes = caption(lambda: load_pipeline(args, "captioning", "caption"), job, group=current_group())
    except (ValueError, FileNotFoundError, NotImplementedError) as e:  # usage, options, checkpoint kind
        return _error(e, 2, err)
    except OSError as e:  # the output could not be written (disk full, permissions)
        return _error(e, 1, err)
    if summary.rank:  # another rank of a launched job: rank 0 reports the whole job; exit 0 (see below)
        return 0
    _report(args, summary, notes, err)
    return summary.exit_code


def _error(e: Exception, code: int, err) -> int:
    """Print the error (rank 0 only, under mlx.launch) and return the exit status. The other ranks exit 0: mlx.launch
    stops every rank as soon as one exits non-zero, which would cut rank 0 short."""
    if is_follower():
        return 0
    print(f"error: {e}", file=err)
    return code
