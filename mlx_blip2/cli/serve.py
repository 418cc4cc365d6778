"""``mlx-blip2 serve``: the HTTP server (the ``server`` extra), on this machine only (127.0.0.1) by default."""

from __future__ import annotations

import argparse
import os
import sys

from ..server import INSTALL_HINT, missing_server_packages
from .common import add_adapter_arg, add_model_args, model_dtype, precision_at_load

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve captioning, VQA and retrieval over HTTP (needs the server extra)",
                       description="A local HTTP server: /v1/caption, /v1/ask, /v1/chat/completions (OpenAI), "
                                   "/v1/match, /v1/embeddings, /v1/models, /health; OpenAPI docs at /docs.")
    add_model_args(p)
    add_adapter_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--max-batch", type=int, default=8, help="most images x questions in one model call (default: 8)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="most time to wait for requests still being read, to batch them together (default: 10 ms)")
    p.add_argument("--api-key", default=os.environ.get("MLX_BLIP2_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $MLX_BLIP2_API_KEY)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image accepted, MB (default: 20)")
    p.add_argument("--max-pixels", type=float, default=50e6, help="largest image accepted, pixels (default: 50e6)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a request may take, queueing included, before it is cancelled (default: 120)")
    p.add_argument("--max-queue", type=int, default=256, help="queued requests beyond this get 503 (default: 256)")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="largest max_new_tokens a request may ask for (default: 512)")
    p.add_argument("--allow-url-fetch", action="store_true",
                   help="let requests name http(s) image URLs for the server to fetch (off by default)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: info)")
    add_door_args(p)
    add_page_args(p)
    return p


def add_door_args(p: argparse.ArgumentParser) -> None:
    """Who may reach the server besides this machine's own pages (mlx_blip2/server/door.py)."""
    g = p.add_argument_group("who may connect (the server answers only 127.0.0.1, localhost, [::1] and the address "
                             "a connection arrived on, and refuses other sites' pages)")
    g.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests addressed to NAME (e.g. the machine's name on the LAN, or a reverse "
                        "proxy's); repeatable; '*' answers any name (not recommended)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let a web app at ORIGIN (e.g. http://localhost:3000) call the API and load the photos "
                        "from its pages; repeatable")


def add_page_args(p: argparse.ArgumentParser, index_flag: bool = True) -> None:
    """The search page's options (``serve --index``; ``search --web`` takes its index from ``--db``)."""
    g = p.add_argument_group("photo search page")
    if index_flag:
        g.add_argument("--index", default=None, metavar="DB",
                       help="a photo index (from 'mlx-blip2 index ... --db DB'): serve a search page at / (needs a "
                            "retrieval checkpoint; --model defaults to the one the index was built with)")
    g.add_argument("--captions", action="append", default=[], metavar="FILE",
                   help="a caption run's output (.jsonl or .csv) whose captions the page shows; repeatable "
                        "(otherwise photo.txt / XMP sidecars, when present)")
    add_edit_args(g)


def add_edit_args(g) -> None:
    """Corrections on the search page (off by default: they write into the library)."""
    g.add_argument("--allow-edits", action="store_true",
                   help="let the page correct captions: a correction rewrites the photo's sidecars, updates the "
                        "index and is appended to DB.corrections.jsonl (training data for 'finetune')")
    g.add_argument("--edit-sidecar", choices=["xmp", "txt"], default="xmp",
                   help="with --allow-edits, the sidecar made for a photo that has none: photo.jpg.xmp (default) "
                        "or photo.txt; existing sidecars are always the ones rewritten")


def server_settings(args) -> dict:
    """The ``create_app`` settings of the command line (ValueError for limits that are not positive)."""
    from ..server.door import check_origin_list

    if args.max_batch < 1 or args.max_upload_mb <= 0 or args.max_pixels < 1 or args.timeout <= 0:
        raise ValueError("--max-batch, --max-upload-mb, --max-pixels and --timeout must be positive")
    return {"max_batch": args.max_batch, "batch_window": args.batch_window_ms / 1000,
            "api_key": args.api_key or None, "max_upload_bytes": int(args.max_upload_mb * 1024 * 1024),
            "max_pixels": int(args.max_pixels), "timeout": args.timeout, "max_queue": args.max_queue,
            "max_new_tokens": args.max_new_tokens, "allow_url_fetch": args.allow_url_fetch,
            "allowed_hosts": tuple(args.allowed_host), "cors_origins": check_origin_list(args.cors_origin)}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def add_web_args(p: argparse.ArgumentParser) -> None:
    """``search --web``: the search page for ``--db`` instead of a table (the rest of ``serve``'s options default)."""
    g = p.add_argument_group("web page (--web)")
    g.add_argument("--web", action="store_true",
                   help="serve the photo search page for --db at http://127.0.0.1:8080/ (as 'serve --index DB' does, "
                        "with the text half of the model only)")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    g.add_argument("--api-key", default=os.environ.get("MLX_BLIP2_API_KEY"),
                   help="require the key (a browser: open /?key=KEY once, or log in) (default: $MLX_BLIP2_API_KEY)")
    g.add_argument("--captions", action="append", default=[], metavar="FILE",
                   help="a caption run's output (.jsonl or .csv) whose captions the page shows; repeatable")
    add_edit_args(g)
    add_door_args(p)


def serve_defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    add_parser(parser.add_subparsers())
    return parser.parse_args(["serve"])


def run_web(args) -> int:
    """``mlx-blip2 search --web --db DB [QUERY]``: the search page, with the text half of the index's model."""
    missing = missing_server_packages()
    if missing:
        print(f"error: `mlx-blip2 search --web` needs {', '.join(missing)}: {INSTALL_HINT}", file=sys.stderr)
        return 2
    for key, value in vars(serve_defaults()).items():
        if not hasattr(args, key):
            setattr(args, key, value)
    from ..photo_index import check_retrieval_checkpoint, model_id
    from ..pipelines.retrieval import Blip2RetrievalPipeline

    name = model_id(args.model) if args.model else index_model(args.db)
    if name is None:
        raise ValueError(f"'{args.db}' does not say which model built it; pass --model")
    directory = check_retrieval_checkpoint(name, "search --web")
    print(f"loading {name} (text half)...", file=sys.stderr)
    with precision_at_load(args):
        pipeline = Blip2RetrievalPipeline.from_pretrained(directory, dtype=model_dtype(args), part="text")
    return serve_app(args, pipeline, name, args.db, query=args.query)


def index_model(db: str) -> str | None:
    """The checkpoint a photo index was built with (read without writing to it); FileNotFoundError if none."""
    import sqlite3
    import urllib.parse

    if not os.path.isfile(db):
        raise FileNotFoundError(f"no photo index at '{db}'; build one with: mlx-blip2 index DIR --db {db}")
    uri = "file:" + urllib.parse.quote(os.path.abspath(db)) + "?mode=ro"
    try:
        with sqlite3.connect(uri, uri=True) as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
    except sqlite3.Error as e:
        raise ValueError(f"'{db}' is not a photo index: {e}") from None
    return None if row is None else row[0]


def serve_app(args, pipeline, name: str, index: str | None = None, query: str | None = None) -> int:
    """Run the server on ``pipeline`` (with the search page for ``index``) until interrupted."""
    import uvicorn

    from ..server import create_app

    settings = server_settings(args)
    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this address can use the "
              "model" + (" and see the indexed photos" if index else ""), file=sys.stderr)
    app = create_app(pipeline, index=index, captions=args.captions, model_name=str(name),
                     allow_edits=bool(index) and args.allow_edits, new_sidecar=args.edit_sidecar, **settings)
    if index is not None:
        host = f"[{args.host}]" if ":" in args.host else args.host
        url = f"http://{host}:{args.port}/"
        if query:
            from urllib.parse import urlencode

            url += "?" + urlencode({"q": query})
        print(f"photo search: {url}" + ("  (open it once with ?key=KEY, or log in)" if args.api_key else ""),
              file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5)
    return 0


def run(args) -> int:
    missing = missing_server_packages()
    if missing:
        print(f"error: `mlx-blip2 serve` needs {', '.join(missing)}: {INSTALL_HINT}", file=sys.stderr)
        return 2
    server_settings(args)  # checked before anything loads
    from ..photo_index import check_retrieval_checkpoint, model_id
    from ..pipelines import DEFAULT_MODEL, load

    # A local checkpoint by its absolute path: /v1/models and every reply name it the same from any folder.
    name = model_id(args.model or (index_model(args.index) if args.index else None) or DEFAULT_MODEL)
    if args.index:
        check_retrieval_checkpoint(name, "serve --index")
    print(f"loading {name}...", file=sys.stderr)
    with precision_at_load(args):
        pipeline = load(name, dtype=model_dtype(args), adapter_path=args.adapter)
    return serve_app(args, pipeline, name, args.index)
