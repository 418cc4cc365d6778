"""What conversion buys: disk size, memory when loaded and logits fidelity of float32/float16/8-bit/4-bit conversions.

    python benchmarks/convert_sizes.py                                   # blip2-opt-2.7b architecture, random weights
    python benchmarks/convert_sizes.py --checkpoint tests/fixtures/tiny-blip2-opt --q-group-size 32

Without ``--checkpoint`` it first builds (once) ``benchmarks/cache/blip2-opt-2.7b-random``: the real blip2-opt-2.7b
architecture with random bfloat16 weights, made by transformers (needs torch; ~2 minutes, 7.7 GB; see
``benchmarks/make_checkpoint.py``). Each variant is converted with ``mlx-blip2-convert`` and then loaded in a fresh
subprocess, which reports MLX's peak memory (``mx.get_peak_memory()``) and the peak RSS after loading, then computes
the logits of a fixed input (seeded random pixels, the ``<image>`` tokens and a short prompt). Variants load in
their stored precision (float16 for float16 and the quantized ones, as on a GPU); the logits are then computed with
the weights cast to float32 (float16 matmuls are very slow on MLX's CPU backend), so the cosine to float32 measures
what the stored weights lose; the cosine to float16 isolates what quantization loses. Prints a Markdown table.
Needs memory for the float32 model (~15 GB for 2.7b). On 2 CPU cores the 2.7b run takes ~20 minutes, most of it
in the quantized forward passes (MLX's CPU quantized matmul runs at ~1 GMAC/s).

Caveat for the random 2.7b checkpoint: transformers initialises the ViT with ``initializer_range=1e-10``, so its
weights are ~5e-10 and flush to zero in float16 (LayerNorm makes the float32 ViT depend on them anyway): there the
cosine to float32 measures that artefact (~0.55 for every float16-based variant); read the float16 column.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "cache"
DEFAULT_CHECKPOINT = CACHE / "blip2-opt-2.7b-random"
VARIANTS = {
    "float32": ["--dtype", "float32"],
    "float16": ["--dtype", "float16"],
    "8-bit": ["--dtype", "float16", "-q", "--q-bits", "8"],
    "4-bit": ["--dtype", "float16", "-q", "--q-bits", "4"],
}
LOAD_DTYPE = {"float32": "float32", "float16": "float16", "8-bit": "float16", "4-bit": "float16"}
MiB = 2**20


def build_random_checkpoint(out: Path) -> Path:
    """The blip2-opt-2.7b architecture with random weights (benchmarks/make_checkpoint.py does the work)."""
    if (out / "config.json").exists():
        return out
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from make_checkpoint import build
    except ImportError:
        raise SystemExit("benchmarks/make_checkpoint.py is missing: pass --checkpoint DIR") from None

    print(f"building {out} (random weights, ~2 minutes, 7.7 GB) ...", flush=True)
    return build(out)


# --- the measuring subprocess -----------------------------------------------------------------------------------------

def fixed_inputs(config) -> dict:
    """Seeded pixels and a prompt: the <image> tokens (current layout), BOS and a few text ids."""
    import numpy as np

    rng = np.random.default_rng(0)
    size = config.vision_config.image_size
    ids = [config.text_config.bos_token_id] + [int(i) for i in rng.integers(10, min(400, config.text_config.vocab_size),
                                                                             size=7)]
    if config.image_token_index is not None:
        ids = [config.image_token_index] * config.num_query_tokens + ids
    return {"pixel_values": rng.standard_normal((1, 3, size, size)).astype(np.float32),
            "input_ids": np.array([ids], dtype=np.int32)}


def measure(path: Path, load_dtype: str, logits_out: Path) -> dict:
    import resource

    import mlx_blip2  # noqa: F401  (first: the optimised BLAS)
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_map

    from mlx_blip2 import Blip2ForConditionalGeneration

    mx.reset_peak_memory()
    tic = time.perf_counter()
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=getattr(mx, load_dtype))
    load_s = time.perf_counter() - tic
    result = {"load_s": load_s, "peak_mib": mx.get_peak_memory() / MiB,
              "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    # Compute in float32 from the stored weights (packed quantized weights stay packed).
    model.update(tree_map(lambda x: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x,
                          model.parameters()))
    inputs = fixed_inputs(model.config)
    tic = time.perf_counter()
    logits = model(inputs["pixel_values"], inputs["input_ids"]).logits
    mx.eval(logits)
    result["forward_s"] = time.perf_counter() - tic
    np.save(logits_out, np.array(logits.astype(mx.float32)))
    return result


# --- the driver -------------------------------------------------------------------------------------------------------

def run(cmd: list[str]) -> tuple[float, float, str]:
    """Run a command; its wall time, its peak RSS (MiB) and its stdout."""
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
    return time.perf_counter() - tic, usage.ru_maxrss / 1024, out


def size_of(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


def fmt(mib: float) -> str:
    return f"{mib:.2f}" if mib < 10 else f"{mib:.0f}"


def cosine(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"checkpoint to convert (default: build/reuse {DEFAULT_CHECKPOINT.relative_to(ROOT)})")
    p.add_argument("--q-group-size", type=int, default=64, help="quantization group size (default: 64)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)} (cosines are to float32 and float16)")
    p.add_argument("--work", type=Path, default=None,
                   help="where conversions go (default: benchmarks/cache/convert-sizes/<checkpoint name>)")
    p.add_argument("--keep", action="store_true", help="keep the converted checkpoints")
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: the measuring subprocess
    p.add_argument("--load-dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--logits-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.measure:
        print(json.dumps(measure(args.measure, args.load_dtype, args.logits_out)))
        return

    checkpoint = args.checkpoint or build_random_checkpoint(DEFAULT_CHECKPOINT)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    work = args.work or CACHE / "convert-sizes" / checkpoint.name
    work.mkdir(parents=True, exist_ok=True)
    source_mib = size_of(checkpoint, "*.safetensors") / MiB
    print(f"checkpoint {checkpoint} ({source_mib:.1f} MiB of safetensors); work dir {work}", flush=True)

    rows = {}
    for stale in work.glob("logits-*.npy"):  # from an earlier run
        stale.unlink()
    for name in variants:
        out = work / name
        flags = VARIANTS[name] + (["--q-group-size", str(args.q_group_size)] if "-q" in VARIANTS[name] else [])
        convert_s, convert_rss, _ = run([sys.executable, "-m", "mlx_blip2.convert", "--hf-path", str(checkpoint),
                                         "--mlx-path", str(out), "--force", *flags])
        disk = size_of(out, "*.safetensors") / MiB
        print(f"{name}: converted in {convert_s:.0f} s (peak RSS {convert_rss:.0f} MiB), {disk:.1f} MiB", flush=True)
        logits_path = work / f"logits-{name}.npy"
        measure_s, _, stdout = run([sys.executable, __file__, "--measure", str(out), "--load-dtype",
                                    LOAD_DTYPE[name], "--logits-out", str(logits_path)])
        m = json.loads(stdout.strip().splitlines()[-1])
        print(f"{name}: loaded in {m['load_s']:.1f} s, forward {m['forward_s']:.1f} s "
              f"(measurement {measure_s:.0f} s)", flush=True)
        rows[name] = {"disk": disk, "convert_s": convert_s, "convert_rss": convert_rss, **m}
        if not args.keep:
            shutil.rmtree(out)

    import numpy as np

    refs = {n: np.load(work / f"logits-{n}.npy") for n in ("float32", "float16") if (work / f"logits-{n}.npy").exists()}
    print()
    print(f"Checkpoint: `{checkpoint.name}` ({fmt(source_mib)} MiB of safetensors), group size {args.q_group_size}; "
          "loaded in the stored precision (float16 for the quantized ones); "
          "logits of one fixed input, computed in float32.")
    print()
    print("| variant | disk (MiB) | vs float32 | peak MLX memory loaded (MiB) | peak RSS loaded (MiB) | load (s) "
          "| forward (s) | convert (s) | logits cosine vs float32 | vs float16 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = rows.get("float32", {}).get("disk")
    for name, r in rows.items():
        logits = np.load(work / f"logits-{name}.npy")
        cos = " | ".join(f"{cosine(logits, refs[n]):.6f}" if n in refs else "n/a" for n in ("float32", "float16"))
        ratio = f"{r['disk'] / base:.2f}" if base else "n/a"
        print(f"| {name} | {fmt(r['disk'])} | {ratio} | {fmt(r['peak_mib'])} | {fmt(r['rss_mib'])} | {r['load_s']:.1f} "
              f"| {r['forward_s']:.1f} | {r['convert_s']:.0f} | {cos} |")


if __name__ == "__main__":
    main()
