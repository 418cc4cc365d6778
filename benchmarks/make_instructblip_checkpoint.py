"""Build (once) a checkpoint with the real instructblip-vicuna-7b architecture and random weights, in the Hub
layout, and measure what its 4-bit conversion needs in memory.

No download: transformers builds it from ``InstructBlipConfig`` (its vision and Q-Former defaults are the Hub
checkpoint's; the Q-Former vocabulary has LAVIS's extra ``[DEC]`` token) and Vicuna-7B's LLaMA text config, directly
in float16 (~16 GB on disk and in memory while saving). The tokenizer, Q-Former tokenizer and processor files come
from the tiny test checkpoint: sizes and speed are what matter here, not the text.

    python benchmarks/make_instructblip_checkpoint.py [--out DIR] [--text-layers 32] [--measure]

``--measure`` converts it with ``mlx-blip2-convert -q`` (4-bit, group size 64) and reports, in a fresh process,
the loaded model's MLX peak memory and the process's peak RSS after one ``describe`` call. ``--text-layers 2``
makes a small smoke-test build (same widths).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_checkpoint import save_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "cache" / "instructblip-vicuna-7b-random"
TINY = ROOT / "tests" / "fixtures" / "tiny-instructblip-vicuna"
VICUNA_7B = dict(
    model_type="llama", vocab_size=32002, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, hidden_act="silu",
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def build(out: Path = DEFAULT_OUT, text_layers: int = 32) -> Path:
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    tic = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)  # build directly in float16: half the memory of float32
    # transformers initialises the ViT with std 1e-10 (its weights would round to 0 in float16); use 0.02.
    # The borrowed tiny tokenizer's <image> id is 223 (any id < vocab_size works).
    config = InstructBlipConfig(vision_config={"initializer_range": 0.02}, qformer_config={"vocab_size": 30523},
                                text_config={**VICUNA_7B, "num_hidden_layers": text_layers}, num_query_tokens=32,
                                image_token_index=223)
    with torch.no_grad():
        model = InstructBlipForConditionalGeneration(config).eval()
    torch.set_default_dtype(torch.float32)
    return save_checkpoint(model, out, TINY, tic)


MEASURE = """
import resource, sys, time
from mlx_blip2 import load  # first: it loads the optimised BLAS before mlx.core
import mlx.core as mx
tic = time.perf_counter()
pipe = load(sys.argv[1], dtype=mx.float16)  # the GPU default: what a Mac holds
load_s = time.perf_counter() - tic
loaded = mx.get_peak_memory() / 1e9
print(f"loaded in {load_s:.1f} s (float16 compute): MLX peak after loading {loaded:.2f} GB, "
      f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB", flush=True)
mx.reset_peak_memory()
tic = time.perf_counter()
text = pipe.describe(sys.argv[2], "Describe the image.", num_beams=1, max_new_tokens=8, min_new_tokens=8)
print(f"describe (greedy, 8 new tokens) {time.perf_counter() - tic:.1f} s; MLX peak while generating "
      f"{mx.get_peak_memory() / 1e9:.2f} GB; process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
"""


def measure(source: Path) -> None:
    target = source.with_name(source.name + "-4bit")
    if not (target / "config.json").exists():
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-m", "convert.convert", "--hf-path", str(source), "--mlx-path", str(target),
                        "-q", "--q-bits", "4", "--q-group-size", "64"], cwd=ROOT, check=True)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
        print(f"converted in {time.perf_counter() - tic:.0f} s (converter peak RSS {usage:.2f} GB)")
    image = ROOT / "examples" / "images" / "gradient.png"
    subprocess.run([sys.executable, "-c", MEASURE, str(target), str(image)], cwd=ROOT, check=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--text-layers", type=int, default=32, help="LLaMA layers (32 for the real 7B)")
    parser.add_argument("--measure", action="store_true", help="convert to 4-bit and measure the loaded peak")
    args = parser.parse_args()
    built = build(args.out, args.text_layers)
    if args.measure:
        measure(built)
