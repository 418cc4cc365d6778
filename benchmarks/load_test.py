"""Load test for ``mlx-blip2 serve``: requests/s, p50/p99 latency and errors for 1, 4 and 16 concurrent clients.

    python benchmarks/load_test.py [--model tests/fixtures/tiny-blip2-opt] [--clients 1 4 16] [--requests 64]
                                   [--endpoint caption|ask|chat] [--options '{"num_beams": 1}'] [--max-batch 8]
                                   [--compare-unbatched] [--url http://127.0.0.1:8080 --api-key KEY] [--json out.json]

Without ``--url`` it starts the server in-process on a free loopback port with ``--model`` (and, with
``--compare-unbatched``, a second time with ``max_batch=1`` to show what batching buys). Each client is a thread with
one keep-alive connection sending requests back to back; every request must succeed (the exit status is 1 if any
fails). Images are distinct synthetic 320x240 PNGs sent as base64 data URLs.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import platform
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_images(n: int, size=(320, 240)) -> list[str]:
    rng = np.random.default_rng(0)
    urls = []
    for i in range(n):
        w, h = size
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, (i * 37) % 255)], axis=-1)
        pixels = np.clip(base + rng.integers(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def payload(endpoint: str, image: str, i: int, options: dict) -> tuple[str, dict]:
    questions = ["what is in the picture?", "what colour is it?", "how many animals are there?", "where is it?"]
    if endpoint == "caption":
        return "/v1/caption", {"image": image, **options}
    if endpoint == "ask":
        return "/v1/ask", {"image": image, "question": questions[i % len(questions)], **options}
    content = [{"type": "text", "text": questions[i % len(questions)]},
               {"type": "image_url", "image_url": {"url": image}}]
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], **options}


def run_level(url: str, clients: int, total: int, endpoint: str, images: list[str], options: dict,
              api_key: str | None) -> dict:
    parsed = urllib.parse.urlsplit(url)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    bodies = []
    for i in range(total):
        path, body = payload(endpoint, images[i % len(images)], i, options)
        bodies.append((path, json.dumps(body).encode()))
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(total))

    def client():
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            path, body = bodies[i]
            start = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                ok = response.status == 200
                if not ok:
                    message = f"{response.status}: {data[:200]!r}"
            except (OSError, http.client.HTTPException) as e:
                ok, message = False, repr(e)
                conn.close()
                conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)
            elapsed = time.perf_counter() - start
            with lock:
                (latencies if ok else errors).append(elapsed if ok else message)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"clients": clients, "requests": total, "seconds": wall, "requests_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "errors": len(errors), "first_error": errors[0] if errors else None}


def run_all(url, args, images, options, label, stats=None) -> list[dict]:
    rows = []
    for clients in args.clients:
        before = dict(stats) if stats is not None else None
        # One warm-up request per level keeps first-call costs out of the numbers.
        run_level(url, 1, 1, args.endpoint, images, options, args.api_key)
        if stats is not None:
            before = dict(stats)
        row = run_level(url, clients, args.requests, args.endpoint, images, options, args.api_key)
        row["server"] = label
        if stats is not None:
            batches = stats["batches"] - before["batches"]
            row["mean_batch"] = (stats["rows"] - before["rows"]) / batches if batches else None
        rows.append(row)
        extra = f", mean batch {row['mean_batch']:.1f}" if row.get("mean_batch") else ""
        print(f"  [{label}] {clients:>2} clients: {row['requests_per_s']:7.2f} req/s, p50 {row['p50_ms']:8.1f} ms, "
              f"p99 {row['p99_ms']:8.1f} ms, errors {row['errors']}{extra}", file=sys.stderr)
        if row["first_error"]:
            print(f"    first error: {row['first_error']}", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "tiny-blip2-opt"))
    parser.add_argument("--url", help="an already running server (default: start one in-process)")
    parser.add_argument("--api-key")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--endpoint", choices=["caption", "ask", "chat"], default="caption")
    parser.add_argument("--options", default="{}", help="generation options as JSON, e.g. '{\"num_beams\": 1}'")
    parser.add_argument("--images", type=int, default=16, help="distinct images to cycle through")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--compare-unbatched", action="store_true", help="also run the server with max_batch=1")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    options = json.loads(args.options)
    images = make_images(args.images)
    rows = []
    if args.url:
        rows += run_all(args.url.rstrip("/"), args, images, options, "server")
    else:
        from mlx_blip2.pipelines import load
        from mlx_blip2.server import INSTALL_HINT, missing_server_packages

        missing = missing_server_packages()
        if missing:
            print(f"needs {', '.join(missing)}: {INSTALL_HINT}", file=sys.stderr)
            return 2
        from mlx_blip2.server import BackgroundServer, create_app

        pipe = load(args.model)
        settings = [("batched", args.max_batch)] + ([("unbatched", 1)] if args.compare_unbatched else [])
        for label, max_batch in settings:
            app = create_app(pipe, model_name=Path(args.model).name, max_batch=max_batch, api_key=args.api_key)
            with BackgroundServer(app) as server:
                print(f"{label} (max_batch={max_batch}) at {server.url}:", file=sys.stderr)
                rows += run_all(server.url, args, images, options, f"{label}, max_batch={max_batch}",
                                app.state.worker.stats)

    print(f"\n{args.endpoint} on {args.url or Path(args.model).name}, {args.requests} requests per level, options "
          f"{json.dumps(options)} ({platform.machine()}, {platform.system()})\n")
    print("| server | clients | requests/s | p50 ms | p99 ms | errors | mean batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        batch = f"{r['mean_batch']:.1f}" if r.get("mean_batch") else "-"
        print(f"| {r['server']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['errors']} | {batch} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
