"""``mlx-blip2 search [QUERY] --db library.sqlite``: rank indexed photos by a text.

One query: a table, or with ``--json`` one JSON array of results. Without QUERY, queries are read from stdin one
per line with the model and the embeddings loaded once: each table is headed by its query, and ``--json`` prints
JSON Lines, one ``{"query": ..., "results": [...]}`` object per query.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Sequence

from ..files import display_path
from .common import add_model_args, model_dtype
from .serve import add_web_args, run_web


def add_parser(sub):
    p = sub.add_parser("search", help="find indexed photos matching a text",
                       description="Rank the images of an index by ITC similarity to a text, optionally re-scoring "
                                   "the best ones with the ITM head.")
    p.add_argument("query", nargs="?", default=None, help="what to look for, e.g. 'a dog on a beach'; without it, "
                   "queries are read from stdin one per line, with the model and embeddings loaded once")
    p.add_argument("--db", required=True, help="the index file (created by 'index')")
    p.add_argument("-k", type=int, default=10, help="number of results (default: 10)")
    p.add_argument("--rerank", action="store_true", help="re-score the top candidates with ITM (reads those images "
                   "again and runs the full model)")
    p.add_argument("--candidates", type=int, default=None, help="how many ITC results --rerank re-scores "
                   "(default: k)")
    p.add_argument("--mode", choices=["image", "text", "hybrid"], default=None,
                   help="rank by the images (ITC), by the captions the index holds (no model loaded), or both fused "
                        "by reciprocal rank (default: hybrid; image with --rerank)")
    p.add_argument("--json", action="store_true", help="print JSON (JSON Lines, one object per query, for queries "
                   "from stdin) instead of tables")
    add_model_args(p, default_hint="the one the index was built with")
    add_web_args(p)
    return p


def format_table(results: Sequence) -> str:
    reranked = any(r.itm is not None for r in results)
    head = f"{'rank':>4}  {'score':>8}  " + (f"{'itc':>7}  {'itm':>6}  " if reranked else "") + "path"
    lines = [head]
    for i, r in enumerate(results, 1):
        extra = f"{r.itc:7.4f}  {r.itm:6.3f}  " if reranked else ""
        lines.append(f"{i:>4}  {r.score:8.4f}  {extra}{display_path(r.path)}")
    return "\n".join(lines)


def _as_json(results: Sequence) -> list[dict]:
    return [{"rank": i, **r.to_dict()} for i, r in enumerate(results, 1)]


def _queries(interactive: bool):
    if interactive:
        print("one query per line; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("search> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return
        query = line.strip()
        if query:
            yield query
        elif interactive:
            return


def _pipeline(args, db):
    """The retrieval pipeline (text half, or the full model for --rerank), its kind checked before any weight."""
    from ..photo_index import PhotoIndexError, check_retrieval_checkpoint, model_id
    from ..pipelines.retrieval import Blip2RetrievalPipeline

    model = model_id(args.model) if args.model else db.model
    if model is None:
        raise PhotoIndexError(f"'{args.db}' does not say which model built it; pass --model")
    if db.model and model != db.model:
        print(f"warning: '{args.db}' was built with {db.model}; searching with {model}", file=sys.stderr)
    directory = check_retrieval_checkpoint(model, "search")
    return Blip2RetrievalPipeline.from_pretrained(directory, dtype=model_dtype(args),
                                                  part="full" if args.rerank else "text")


def run(args) -> int:
    if args.web:
        return run_web(args)
    from ..photo_index import PhotoIndex, PhotoIndexError, search

    if args.k <= 0:
        raise ValueError("-k must be positive")
    if args.candidates is not None and args.candidates <= 0:
        raise ValueError("--candidates must be positive")
    if args.query is not None and not args.query.strip():
        raise ValueError("the search text is empty")
    try:
        with PhotoIndex(args.db, create=False) as db:
            pipeline = None
            searchable = db.count() > 0
            if not searchable:
                print(f"'{args.db}' holds no searchable images", file=sys.stderr)
            elif args.mode != "text":
                pipeline = _pipeline(args, db)

            def answer(query: str):
                if not searchable:
                    return []
                return search(db, query, k=args.k, rerank=args.rerank, candidates=args.candidates,
                              pipeline=pipeline, mode=args.mode)

            if args.query is not None:
                results = answer(args.query)
                if args.json:
                    print(json.dumps(_as_json(results), indent=2, ensure_ascii=False), flush=True)
                elif results:
                    print(format_table(results), flush=True)
                return 0
            interactive = sys.stdin.isatty()
            for n, query in enumerate(_queries(interactive)):
                t = time.perf_counter()
                results = answer(query)
                if args.json:
                    print(json.dumps({"query": query, "results": _as_json(results)}, ensure_ascii=False), flush=True)
                else:
                    print(("\n" if n else "") + f"query: {query}", flush=True)
                    print(format_table(results) if results else "(no results)", flush=True)
                if interactive:
                    print(f"({time.perf_counter() - t:.2f} s)", file=sys.stderr)
    except sqlite3.Error as e:
        raise PhotoIndexError(f"'{args.db}': {e}") from None
    return 0
