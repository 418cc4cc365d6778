"""``mlx-blip2 caption IMAGES... [-r] [-o captions.jsonl | --format txt|xmp]``: caption images, folders and libraries.

Exit status: 0 every image captioned (or skipped), 1 some failed (listed at the end) or the output could not be
written, 2 usage error (bad flags, a missing input, a checkpoint of the wrong kind), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from ..images import IMAGE_EXTENSIONS
from ..library import DEFAULT_BATCH_SIZE, FORMATS, XMP_NAMES, caption_paths, parse_shard
from .common import (
    add_generation_args,
    add_model_args,
    generation_kwargs,
    load_pipeline,
)

EPILOG = """\
examples:
  mlx-blip2 caption photo.jpg                              print a caption
  mlx-blip2 caption ~/Pictures -r -o captions.jsonl         a whole library; rerun to resume
  mlx-blip2 caption ~/Pictures -r --format xmp              dc:description in photo.jpg.xmp (digiKam, darktable)
  mlx-blip2 caption ~/Pictures -r --format xmp --xmp-name photo.xmp   (Lightroom)
  mlx-blip2 caption dataset/ --format txt                   dataset/img1.txt next to dataset/img1.png
  mlx-blip2 caption /photos -r -o part2.jsonl --shard 2/3   the second third, on a second machine

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
    p.add_argument("images", nargs="+", help="image files and folders")
    p.add_argument("-r", "--recursive", action="store_true", help="include images in subfolders")
    p.add_argument("-o", "--output", default=None,
                   help="write records to this file (jsonl, or csv when it ends in .csv); rerunning resumes")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="jsonl/csv records (to --output, or stdout), or txt/xmp sidecars next to each image "
                        "(default: print 'path: caption', or jsonl with --output)")
    p.add_argument("--xmp-name", choices=XMP_NAMES, default=XMP_NAMES[0],
                   help="XMP sidecar naming: photo.jpg.xmp (digiKam, darktable; default) or photo.xmp (Lightroom)")
    p.add_argument("--existing", choices=("skip", "overwrite"), default="skip",
                   help="skip images already captioned in the output or with a caption sidecar (default), or "
                        "caption them again")
    p.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                   help="caption only the I-th of N deterministic parts (1 <= I <= N), to share a library between "
                        "machines; give each its own --output")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per model call (default: {DEFAULT_BATCH_SIZE})")
    p.add_argument("--workers", type=int, default=None,
                   help="image decoding threads (default: number of CPUs, at most 8)")
    p.add_argument("--prompt", default=None, help="text the caption continues, e.g. 'a photo of'")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar or summary line (failures are still listed)")
    add_model_args(p)
    add_generation_args(p)
    return p


def _report(args, summary, notes, err) -> None:
    if not args.quiet:
        for note in notes:
            print(f"note: {note}", file=err)
        if summary.total == 0:
            hint = "" if args.recursive else " (use -r to look in subfolders)"
            print(f"no images found{hint}", file=err)
        else:
            print(summary.line(), file=err)
    for display, error in summary.failed[:MAX_LISTED]:
        print(f"failed: {display}: {error}", file=err)
    if len(summary.failed) > MAX_LISTED:
        more = f"; every failure is in '{args.output}'" if args.output else ""
        print(f"failed: ... and {len(summary.failed) - MAX_LISTED} more{more}", file=err)


def run(args) -> int:
    from ..pipelines import DEFAULT_MODEL

    err = sys.stderr
    try:
        summary, notes = caption_paths(
            lambda: load_pipeline(args, "captioning", "caption"),  # loaded only when something needs a caption
            args.images, output=args.output, format=args.format, recursive=args.recursive, xmp_name=args.xmp_name,
            existing=args.existing, shard=args.shard, model_name=args.model or DEFAULT_MODEL, prompt=args.prompt,
            batch_size=args.batch_size, workers=args.workers, generate_kwargs=generation_kwargs(args),
            progress=False if args.quiet else None)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:  # usage, options, checkpoint kind
        print(f"error: {e}", file=err)
        return 2
    except OSError as e:  # the output could not be written (disk full, permissions)
        print(f"error: {e}", file=err)
        return 1
    _report(args, summary, notes, err)
    return summary.exit_code
