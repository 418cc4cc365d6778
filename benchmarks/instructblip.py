"""Side-by-side speed and memory of mlx-blip2 and transformers on the real instructblip-vicuna-7b architecture.

    python benchmarks/instructblip.py [--variants mlx-4bit,transformers-bfloat16] [--tokens 8] [--rounds 1]

The random-weight checkpoint comes from ``benchmarks/make_instructblip_checkpoint.py`` (float16, ~16 GB) and its
4-bit conversion from our converter. Each variant runs in its own process, one after another: load, image encoding
(ViT-g + instruction-aware Q-Former), prefill, decode tokens/s and peak memory for one 224 px image and one
instruction, greedy. float32 does not fit this 24 GB machine (28 GB of language model); on the CPU backend the 4-bit
model computes in float32 (MLX's float16 CPU matmuls are slower), on a Mac pass ``--mlx-dtype float16``. Results go
to ``benchmarks/results-instructblip.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import best_of, rss_peak_gb, run_child, test_image, timed  # noqa: E402
from make_instructblip_checkpoint import DEFAULT_OUT, build  # noqa: E402

INSTRUCTION = "Describe the image in detail."
VARIANTS = ("mlx-4bit", "mlx-8bit", "transformers-bfloat16", "transformers-float16")


def child_mlx(checkpoint: Path, dtype_name: str, tokens: int) -> dict:
    import mlx_blip2  # noqa: F401  (loads the optimised BLAS before mlx.core)
    import mlx.core as mx

    from mlx_blip2 import load
    from mlx_blip2.generation.generate import prepare_inputs, start_decoding
    from mlx_blip2.generation.options import GenerationOptions

    tic = time.perf_counter()
    pipe = load(checkpoint, dtype=getattr(mx, dtype_name))
    load_s, loaded_gb = time.perf_counter() - tic, mx.get_peak_memory() / 1e9
    model, processor, image = pipe.model, pipe.processor, test_image()
    inputs = processor(images=[image], text=[INSTRUCTION])
    qformer = {k: inputs[k] for k in ("qformer_input_ids", "qformer_attention_mask")}

    def encode():
        out = model.encode_images(inputs["pixel_values"], **qformer)
        mx.eval(out)
        return out

    def prefill(features):
        prepared = prepare_inputs(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  image_features=features)
        runner, _, _ = start_decoding(model, prepared, GenerationOptions())
        mx.eval(runner.first_logits)

    def generate(n):
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, eos_token_id=[])

    generate(2)  # warm-up
    encode_s, features = timed(encode, 2)
    prefill_s, _ = timed(lambda: prefill(features), 2)
    one_s, _ = timed(lambda: generate(1), 1)
    e2e_s, ids = timed(lambda: generate(tokens), 1)
    assert ids.shape == (1, tokens)
    return dict(load_s=load_s, loaded_gb=loaded_gb, encode_s=encode_s, prefill_s=prefill_s,
                decode_tps=(tokens - 1) / (e2e_s - one_s), e2e_s=e2e_s, batch8_images_per_min=float("nan"),
                peak_gb=mx.get_peak_memory() / 1e9, rss_gb=rss_peak_gb(), device=str(mx.default_device()),
                blas=f"{mlx_blip2._blas.status[0]}", cpu=mlx_blip2._blas.cpu_model())


def child_torch(checkpoint: Path, dtype_name: str, tokens: int) -> dict:
    import torch
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    torch.set_num_threads(os.cpu_count())
    dtype = getattr(torch, dtype_name)
    tic = time.perf_counter()
    model = InstructBlipForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).eval()
    load_s = time.perf_counter() - tic
    processor = InstructBlipProcessor.from_pretrained(checkpoint)
    inputs = processor(images=[test_image()], text=[INSTRUCTION], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

    def generate(n):
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)

    with torch.inference_mode():
        generate(2)
        qformer = {k: inputs[k] for k in ("qformer_input_ids", "qformer_attention_mask")}
        encode_s, _ = timed(lambda: model.get_image_features(inputs["pixel_values"], **qformer), 2)
        forward_s, _ = timed(lambda: model(**inputs), 2)
        one_s, _ = timed(lambda: generate(1), 1)
        e2e_s, _ = timed(lambda: generate(tokens), 1)
    return dict(load_s=load_s, loaded_gb=float("nan"), encode_s=encode_s, prefill_s=forward_s - encode_s,
                decode_tps=(tokens - 1) / (e2e_s - one_s), e2e_s=e2e_s, batch8_images_per_min=float("nan"),
                peak_gb=rss_peak_gb(), rss_gb=rss_peak_gb(),
                device=f"torch {torch.__version__} cpu, {torch.get_num_threads()} threads")


def prepare(variant: str, source: Path) -> Path:
    if not variant.startswith("mlx-") or not variant.endswith("bit"):
        return source
    out = source.with_name(f"{source.name}-{variant[4:]}")
    if not (out / "config.json").exists():
        from mlx_blip2.convert.convert import convert

        convert(str(source), str(out), quantize=True, q_bits=int(variant[4]), q_group_size=64, dtype="float16")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="mlx-4bit,transformers-bfloat16")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--mlx-dtype", default="float32")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results-instructblip")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child.startswith("transformers-"):
            result = child_torch(args.checkpoint, args.child.split("-")[1], args.tokens)
        else:
            result = child_mlx(args.checkpoint, os.environ.get("BENCH_MLX_DTYPE", "float32"), args.tokens)
        print(json.dumps(result))
        return
    os.environ["BENCH_MLX_DTYPE"] = args.mlx_dtype
    source = args.checkpoint or build(DEFAULT_OUT)
    variants = args.variants.split(",")
    checkpoints = {v: prepare(v, source) for v in variants}
    rounds: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(args.rounds):
        for v in variants:
            print(f"running {v} (round {i + 1}/{args.rounds}) ...", file=sys.stderr, flush=True)
            rounds[v].append(run_child(v, checkpoints[v], args.tokens, script=__file__))
            print(json.dumps({v: rounds[v][-1]}), file=sys.stderr, flush=True)
    results = {v: best_of(rounds[v]) for v in variants}
    rows = ["| variant | load s | MLX peak after load GB | encode s | prefill s | decode tok/s | "
            f"{args.tokens} tokens s | peak GB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v, r in results.items():
        if "error" in r:
            rows.append(f"| {v} | error: {r['error']} |" + " |" * 6)
            continue
        rows.append(f"| {v} | {r['load_s']:.1f} | {r['loaded_gb']:.2f} | {r['encode_s']:.2f} | {r['prefill_s']:.2f} | "
                    f"{r['decode_tps']:.2f} | {r['e2e_s']:.1f} | {r['peak_gb']:.2f} |")
    cpu = next((r["cpu"] for r in results.values() if r.get("cpu")), platform.processor())
    md = (f"Machine: {cpu}, {os.cpu_count()} cores. Random-weight instructblip-vicuna-7b, one 224 px image, "
          f"instruction {INSTRUCTION!r}, {args.tokens} greedy tokens; MLX computes in {args.mlx_dtype}.\n\n"
          + "\n".join(rows))
    args.out.with_suffix(".md").write_text(md + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(md)


if __name__ == "__main__":
    main()
