"""Photo-index search latency over many stored images (synthetic embeddings, no model needed).

    python benchmarks/search_latency.py [--n 10000 100000] [--queries 32] [--dim 256] [-k 10] [--dir DIR]

For each size, fills an index with ``n`` entries shaped like Salesforce/blip2-itm-vit-g's (32 query embeddings of
256 float16 values each: 16 KiB per image in ``library.sqlite.vectors``), then, in a NEW Python process per
measurement, times a search of one text embedding:

- cold: the new process imports ``mlx_blip2.photo_index``, opens the index, memory-maps the matrix and scores
  every image (ITC: max over the query tokens, top k). Reported both as the open + first search inside the
  process and as the whole process (interpreter start to exit, as ``mlx-blip2 search`` would pay on top of
  loading its text model). The matrix file is in the OS page cache (it was just written, or searched before);
  a first search after a reboot also reads it from disk.
- warm: further searches in the same process (the mapping and the live-row mask are reused), median of --repeat.
- memory: the process's peak RSS, and how much of it is the mapped matrix (file pages the kernel can drop, shared
  with every other process searching the same index) versus the process's own memory.

Each measured ranking is checked against a plain float32 computation. Encoding the query text (one Q-Former pass)
is not measured here. ``--probe-int8`` also times a scan of int8 codes of the same size, for the 1M-image plan.
Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def normalized(rng, shape) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def fill(db_path: Path, n: int, q: int, d: int, seed: int = 0, chunk: int = 5000) -> None:
    from mlx_blip2.photo_index import PhotoIndex

    rng = np.random.default_rng(seed)
    with PhotoIndex(db_path) as db:
        db.bind_model("synthetic", q, d)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            embeds = normalized(rng, (m, q, d)).astype(np.float16)
            db.write_batch([(f"/photos/{start + i:07d}.jpg", 1_000_000 + i, 1_700_000_000_000_000_000 + i, embeds[i])
                            for i in range(m)])


def memory() -> dict:
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                status[key] = int(value.split()[0]) * 1024
    return status


def child(args) -> None:
    """One new process: open, first search (cold), then warm searches; JSON on stdout."""
    t0 = time.perf_counter()
    from mlx_blip2.photo_index import PhotoIndex, top_k

    t_import = time.perf_counter() - t0
    query = normalized(np.random.default_rng(1), (args.dim,))
    t1, c1 = time.perf_counter(), time.process_time()
    db = PhotoIndex(args.db, create=False)
    cold = top_k(db, query, args.k)
    t_cold, c_cold = time.perf_counter() - t1, time.process_time() - c1
    since_spawn = time.time() - args.spawned  # interpreter start, imports, open and first search
    warm, warm_cpu = [], []
    for _ in range(args.repeat):
        t, c = time.perf_counter(), time.process_time()
        result = top_k(db, query, args.k)
        warm.append(time.perf_counter() - t)
        warm_cpu.append(time.process_time() - c)
    assert [r.path for r in result] == [r.path for r in cold]
    mem = memory()
    # The same ranking the plain way (float32 per chunk, max over queries), as a check on the fast path.
    m = db.matrix()
    scores = np.concatenate([(np.asarray(m.vectors[i:i + 2048], np.float32) @ query).max(axis=1)
                             for i in range(0, m.vectors.shape[0], 2048)])
    best = np.argsort(-scores, kind="stable")[: args.k]
    paths = db.paths_of_rows(best.tolist(), m.generation)
    assert [paths[i] for i in best.tolist()] == [r.path for r in cold], "ranking differs from float32"
    json.dump({"import_s": t_import, "cold_s": t_cold, "cold_cpu_s": c_cold, "process_s": since_spawn,
               "warm_s": warm, "warm_cpu_s": warm_cpu, "n": m.count, **mem}, sys.stdout)


def probe_int8(n: int, q: int, d: int, repeat: int = 3) -> float:
    """Seconds to scan n images stored as int8 codes (per-vector scales), chunked on two threads."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(2)
    block = rng.integers(-127, 128, size=(4096, q, d), dtype=np.int8)  # repeated: the scan reads n rows' worth
    text = normalized(rng, (d,))
    reps = -(-n // block.shape[0])

    def scan(part: int) -> None:
        buf = np.empty((32 * q, d), np.float32)
        out = np.empty(32 * q, np.float32)
        for _ in range(part, reps, 2):
            for lo in range(0, block.shape[0], 32):
                np.copyto(buf, block[lo:lo + 32].reshape(-1, d), casting="unsafe")
                np.matmul(buf, text, out=out)
                out.reshape(32, q).max(axis=1)

    times = []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(repeat):
            t = time.perf_counter()
            list(pool.map(scan, range(2)))
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(db: Path, args) -> dict:
    runs = []
    for _ in range(args.cold_repeat):
        out = subprocess.run([sys.executable, __file__, "--child", "--db", str(db), "--dim", str(args.dim),
                              "-k", str(args.k), "--repeat", str(args.repeat), "--spawned", repr(time.time())],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        runs.append(json.loads(out.stdout))
    median = lambda key: statistics.median(r[key] for r in runs)
    return {"n": runs[0]["n"], "cold_s": median("cold_s"), "cold_cpu_s": median("cold_cpu_s"),
            "process_s": median("process_s"), "import_s": median("import_s"),
            "warm_s": statistics.median(w for r in runs for w in r["warm_s"]),
            "warm_cpu_s": statistics.median(w for r in runs for w in r["warm_cpu_s"]),
            "peak_rss": max(r["VmHWM"] for r in runs), "rss_anon": max(r["RssAnon"] for r in runs),
            "rss_file": max(r["RssFile"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000], help="stored images (default: 10000 "
                    "100000)")
    ap.add_argument("--queries", type=int, default=32, help="query embeddings per image (default: 32)")
    ap.add_argument("--dim", type=int, default=256, help="embedding size (default: 256)")
    ap.add_argument("-k", type=int, default=10, help="results per search (default: 10)")
    ap.add_argument("--repeat", type=int, default=5, help="warm searches per process (default: 5)")
    ap.add_argument("--cold-repeat", type=int, default=3, help="new processes per size (default: 3)")
    ap.add_argument("--dir", type=Path, default=None, help="where the indexes go (default: a temporary folder; "
                    "an existing DIR/index-N.sqlite is reused)")
    ap.add_argument("--probe-int8", action="store_true", help="also time an int8 scan of each size (1M plan)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory()
        args.dir = Path(tmp.name)
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in args.n:
            db = args.dir / f"index-{n}.sqlite"
            if not db.exists():
                t = time.perf_counter()
                fill(db, n, args.queries, args.dim)
                size = sum(p.stat().st_size for p in args.dir.glob(f"index-{n}.sqlite*"))
                print(f"filled {n:,} entries in {time.perf_counter() - t:.1f} s ({size / 2**30:.2f} GiB)",
                      file=sys.stderr, flush=True)
            result = measure(db, args)
            if args.probe_int8:
                result["int8_s"] = probe_int8(n, args.queries, args.dim)
            rows.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    cpu = f"{os.cpu_count()} CPU cores, {platform.machine()}, numpy {np.__version__}"
    int8 = args.probe_int8
    print("| images | cold: open + first search (CPU) | cold: new process to first result | warm search (CPU) | "
          f"peak RSS (of which mapped matrix) |{' int8 scan |' if int8 else ''}")
    print(f"| ---: | ---: | ---: | ---: | ---: |{' ---: |' if int8 else ''}")
    for r in rows:
        print(f"| {r['n']:,} | {r['cold_s']:.3f} s ({r['cold_cpu_s']:.3f} s) | {r['process_s']:.2f} s (imports "
              f"{r['import_s']:.2f} s) | {r['warm_s'] * 1000:.0f} ms ({r['warm_cpu_s'] * 1000:.0f} ms) | "
              f"{r['peak_rss'] / 2**20:,.0f} MiB ({r['rss_file'] / 2**20:,.0f} MiB) |"
              + (f" {r['int8_s'] * 1000:.0f} ms |" if int8 else ""))
    print(f"\n{cpu}; {args.queries} x {args.dim} float16 per image; medians of {args.cold_repeat} new processes and "
          f"{args.repeat} warm searches each; CPU = process CPU time, both threads; load average "
          f"{os.getloadavg()[0]:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
