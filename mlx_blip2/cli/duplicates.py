"""``mlx-blip2 duplicates --db library.sqlite [--threshold T] [--json]``: groups of near-duplicate photos.

Works on the stored embeddings alone: no model is loaded and no image is read.
"""

from __future__ import annotations

import json
import sqlite3


def add_parser(sub):
    p = sub.add_parser("duplicates", help="list groups of near-duplicate photos in an index",
                       description="Group the images of an index whose embeddings are nearly the same (cosine "
                                   "similarity of their mean query embeddings at least --threshold): copies, "
                                   "re-encoded, resized or lightly edited versions of one photo.")
    p.add_argument("--db", required=True, help="the index file (created by 'index')")
    p.add_argument("--threshold", "-t", type=float, default=0.95, help="similarity from which two images are "
                   "near-duplicates, in (0, 1] (default: 0.95; 1 finds identical embeddings only)")
    p.add_argument("--json", action="store_true", help="print one JSON array of groups instead of text")
    return p


def run(args) -> int:
    from ..photo_index import PhotoIndex, PhotoIndexError
    from ..photo_index.duplicates import find_duplicates
    from ..files import display_path, path_fields

    try:
        with PhotoIndex(args.db, create=False) as db:
            groups = find_duplicates(db, args.threshold)
    except sqlite3.Error as e:
        raise PhotoIndexError(f"'{args.db}': {e}") from None
    if args.json:
        print(json.dumps([{"similarity": {"min": g.min_similarity, "max": g.max_similarity},
                           "images": [path_fields(p) for p in g.paths]} for g in groups], indent=2,
                         ensure_ascii=False))
        return 0
    for n, g in enumerate(groups, 1):
        print(f"{'' if n == 1 else chr(10)}group {n}: {len(g.paths)} images, similarity {g.min_similarity:.4f}"
              f"–{g.max_similarity:.4f}")
        for p in g.paths:
            print(f"  {display_path(p)}")
    if not groups:
        print("no near-duplicates found")
    return 0
