"""``mlx-blip2 serve``: the HTTP server (the ``server`` extra), on this machine only (127.0.0.1) by default."""

from __future__ import annotations

import argparse
import os
import sys

from ..server import INSTALL_HINT, missing_server_packages
from .common import add_model_args

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve captioning, VQA and retrieval over HTTP (needs the server extra)",
                       description="A local HTTP server: /v1/caption, /v1/ask, /v1/chat/completions (OpenAI), "
                                   "/v1/match, /v1/embeddings, /v1/models, /health; OpenAPI docs at /docs.")
    add_model_args(p)
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
    p.add_argument("--max-new-tokens", type=int, default=512, help="largest max_new_tokens a request may ask for")
    p.add_argument("--allow-url-fetch", action="store_true",
                   help="let requests name http(s) image URLs for the server to fetch (off by default)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def server_settings(args) -> dict:
    """The ``create_app`` settings of the command line (ValueError for limits that are not positive)."""
    if args.max_batch < 1 or args.max_upload_mb <= 0 or args.max_pixels < 1 or args.timeout <= 0:
        raise ValueError("--max-batch, --max-upload-mb, --max-pixels and --timeout must be positive")
    return {"max_batch": args.max_batch, "batch_window": args.batch_window_ms / 1000,
            "api_key": args.api_key or None, "max_upload_bytes": int(args.max_upload_mb * 1024 * 1024),
            "max_pixels": int(args.max_pixels), "timeout": args.timeout, "max_queue": args.max_queue,
            "max_new_tokens": args.max_new_tokens, "allow_url_fetch": args.allow_url_fetch}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def run(args) -> int:
    missing = missing_server_packages()
    if missing:
        print(f"error: `mlx-blip2 serve` needs {', '.join(missing)}: {INSTALL_HINT}", file=sys.stderr)
        return 2
    settings = server_settings(args)
    import mlx.core as mx
    import uvicorn

    from ..pipelines import DEFAULT_MODEL, load
    from ..server import create_app

    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this address can use the "
              "model", file=sys.stderr)
    name = args.model or DEFAULT_MODEL
    print(f"loading {name}...", file=sys.stderr)
    pipeline = load(name, dtype=getattr(mx, args.dtype) if args.dtype else None)
    app = create_app(pipeline, model_name=str(name), **settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5)
    return 0
