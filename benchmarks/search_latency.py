"""Photo-index search latency over many stored images (synthetic embeddings, no model needed).

    python benchmarks/search_latency.py [--n 100000] [--queries 32] [--dim 256] [-k 10] [--db PATH]

Fills a temporary SQLite index with ``n`` entries shaped like Salesforce/blip2-itm-vit-g's (32 query embeddings
of 256 float16 values each, 16 KiB per image), then times a search of one text embedding:

- cold: a fresh ``PhotoIndex`` (nothing cached): read every blob from SQLite, float16 -> float32 matrix, score, top-k.
  The database file itself is in the OS page cache (it was just written); a first search after a reboot also pays
  for reading it from disk.
- warm: the same ``PhotoIndex`` again: the cached matrix is scored (one matrix-vector product, max over queries)
  and partially sorted. This is the latency of every search after the first in a long-running process.

Encoding the query text (one Q-Former pass over a few tokens) comes on top of both and is not measured here.
The cold figure also includes faulting in the (n * queries, dim) float32 matrix (3.3 GB for 100,000 images); on
virtual machines that hand freed memory back to the host, first-touch memory is slow and can dominate it.
Prints one Markdown table row.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlx_blip2.photo_index import PhotoIndex  # noqa: E402


def normalized(rng, shape) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def fill(db_path: Path, n: int, q: int, d: int, seed: int = 0, chunk: int = 5000) -> None:
    rng = np.random.default_rng(seed)
    with PhotoIndex(db_path) as db:
        db.bind_model("synthetic", q, d)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            embeds = normalized(rng, (m, q, d)).astype(np.float16)
            rows = [(f"/photos/{start + i:07d}.jpg", 1_000_000 + i, 1_700_000_000_000_000_000 + i, embeds[i])
                    for i in range(m)]
            db.write_batch(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="stored images (default: 100000)")
    ap.add_argument("--queries", type=int, default=32, help="query embeddings per image (default: 32)")
    ap.add_argument("--dim", type=int, default=256, help="embedding size (default: 256)")
    ap.add_argument("-k", type=int, default=10, help="results per search (default: 10)")
    ap.add_argument("--repeat", type=int, default=5, help="warm searches to time (default: 5)")
    ap.add_argument("--cold-repeat", type=int, default=3, help="cold searches to time (default: 3)")
    ap.add_argument("--db", type=Path, default=None, help="index file to use (default: a temporary one)")
    args = ap.parse_args()

    tmp = None
    if args.db is None:
        tmp = tempfile.TemporaryDirectory()
        args.db = Path(tmp.name) / "bench.sqlite"
    try:
        if not args.db.exists():
            t = time.perf_counter()
            fill(args.db, args.n, args.queries, args.dim)
            print(f"filled {args.n:,} entries in {time.perf_counter() - t:.1f} s "
                  f"({args.db.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr, flush=True)
        query = normalized(np.random.default_rng(1), (args.dim,))

        colds, loads = [], []
        for _ in range(args.cold_repeat):
            if colds:
                db.close()
            db = PhotoIndex(args.db, create=False)
            t0 = time.perf_counter()
            m = db.matrix()
            t1 = time.perf_counter()
            cold = db.top_k(query, args.k)
            t2 = time.perf_counter()
            loads.append(t1 - t0)
            colds.append(t2 - t0)
        load_s, cold_s = statistics.median(loads), statistics.median(colds)

        warm = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            result = db.top_k(query, args.k)
            warm.append(time.perf_counter() - t)
        assert [r.path for r in result] == [r.path for r in cold]

        # The same ranking the long way, as a check on the fast path.
        scores = (m.vectors.reshape(len(m.paths), args.queries, args.dim) @ query).max(axis=1)
        best = np.argsort(-scores, kind="stable")[: args.k]
        assert [m.paths[i] for i in best] == [r.path for r in cold]
        db.close()

        n = len(m.paths)
        warm_s = statistics.median(warm)
        cpu = f"{os.cpu_count()} CPU cores, {platform.machine()}"
        print("| images | embeddings per image | cold search (load + score + top-k) | warm search | machine |")
        print("| --- | --- | --- | --- | --- |")
        print(f"| {n:,} | {args.queries} x {args.dim} float16 | {cold_s:.2f} s (load {load_s:.2f} s; median of "
              f"{args.cold_repeat}) | {warm_s * 1000:.0f} ms (median of {args.repeat}) | {cpu}, "
              f"numpy {np.__version__} |")
        print(f"load average during the run: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
