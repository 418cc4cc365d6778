"""One pass (``caption DIR --index DB``) against ``caption`` then ``index``, on the real architectures: the random
blip2-opt-2.7b checkpoint of make_checkpoint.py and a random blip2-itm-vit-g checkpoint given the same vision tensors
(built once by this script), so that the one pass shares its ViT as it does with Salesforce's checkpoints.

    flock /tmp/bench.lock python benchmarks/onepass.py [--ckpt /tmp/bench-ckpt] [--itm /tmp/bench-itm-shared]
        [--images 8] [--batch-size 8] [--max-new-tokens 30] [--rounds 1] [--out benchmarks/results-onepass]

Each step runs in its own process (one big model in memory at a time), the steps interleaved round by round:
``caption`` (load the captioning model, caption the folder to a jsonl), ``index`` (load the retrieval model, index
the folder), ``onepass`` (both). Load times are measured apart from the work; images/min is over the work alone, the
one pass's vision-weight hashing included; the CPU time of each step (all its threads) is reported too, the steadier
figure when other work shares the machine. Goal: one pass <= 0.8 x (caption + index).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
TINY_ITM = ROOT / "tests" / "fixtures" / "tiny-blip2-itm"


def build_itm(captioner: Path, out: Path) -> Path:
    """A random Blip2ForImageTextRetrieval of blip2-itm-vit-g's sizes with the captioner's vision tensors."""
    if (out / "config.json").exists():
        return out
    import torch
    from make_checkpoint import save_checkpoint
    from safetensors import safe_open
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    tic = time.perf_counter()
    torch.manual_seed(1)
    vision = json.loads((captioner / "config.json").read_text())["vision_config"]
    config = Blip2Config(vision_config=vision, qformer_config={"use_qformer_text_input": True, "vocab_size": 30523},
                         num_query_tokens=32, image_text_hidden_size=256, image_token_index=161)
    config.architectures = ["Blip2ForImageTextRetrieval"]
    state = {}
    for shard in sorted(captioner.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key.startswith("vision_model."):
                    state[key[len("vision_model."):]] = f.get_tensor(key)
    torch.set_default_dtype(next(iter(state.values())).dtype)  # the captioner's (bfloat16 for make_checkpoint's)
    with torch.no_grad():
        model = Blip2ForImageTextRetrieval(config).eval()
        model.vision_model.load_state_dict(state, strict=True)
    torch.set_default_dtype(torch.float32)
    save_checkpoint(model, out, TINY_ITM, tic)
    processor = json.loads((out / "processor_config.json").read_text())  # the captioner's image size
    processor["image_processor"]["size"] = {"height": vision["image_size"], "width": vision["image_size"]}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return out


def make_images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((640, 480), Image.BICUBIC)
        img.save(folder / f"photo{i:03d}.jpg", quality=90)


def child(step: str, args) -> dict:
    """One step in this process: {"load_s", "work_s", "hash_s", "peak_gb"}."""
    import mlx_blip2.photo_index.indexer as indexer
    import mlx_blip2.photo_index.vision_share as vision_share
    from mlx_blip2.library.job import CaptionJob, caption
    from mlx_blip2.photo_index import PhotoIndex, index_paths
    from mlx_blip2.photo_index.job import IndexJob
    from mlx_blip2.photo_index.onepass import caption_and_index
    from mlx_blip2.pipelines import load

    spent = {"load": 0.0, "hash": 0.0, "load_cpu": 0.0}

    def timed(kind, fn):
        def run(*a, **k):
            tic, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[kind] += time.perf_counter() - tic
                if kind == "load":
                    spent["load_cpu"] += time.process_time() - cpu
        return run

    work = Path(args.work)
    options = {"max_new_tokens": args.max_new_tokens, "num_beams": 1} if args.max_new_tokens else {}
    cjob = CaptionJob([str(work / "photos")], output=str(work / f"{step}.jsonl"), batch_size=args.batch_size,
                      generate_kwargs=options)
    tic, cpu = time.perf_counter(), time.process_time()
    if step == "caption":
        summary, _ = caption(timed("load", lambda: load(args.ckpt)), cjob, group=None)
        assert summary.captioned == args.images, summary.line()
    elif step == "index":
        engine = timed("load", indexer.load_embedder)(args.itm)
        with PhotoIndex(work / "index.sqlite") as db:
            report = index_paths(db, [str(work / "photos")], model=args.itm, batch_size=args.batch_size,
                                 progress=False, embedder_factory=lambda m: engine)
        assert report.added == args.images, report.summary()
    else:
        indexer.load_embedder = timed("load", indexer.load_embedder)
        vision_share.vision_digest = timed("hash", vision_share.vision_digest)
        ijob = IndexJob([str(work / "photos")], db=str(work / "onepass.sqlite"), model=args.itm,
                        batch_size=args.batch_size)
        result = caption_and_index(timed("load", lambda: load(args.ckpt)), cjob, ijob, group=None)
        assert result.share.shared and result.embedded_in_pass == args.images, result
    total, total_cpu = time.perf_counter() - tic, time.process_time() - cpu
    return {"step": step, "load_s": spent["load"], "work_s": total - spent["load"], "hash_s": spent["hash"],
            "work_cpu_s": total_cpu - spent["load_cpu"],
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def wait_for_memory(gb: float, timeout: float = 900) -> None:
    """Start a step only when the machine has ``gb`` GB available (other jobs share it; the kernel kills the
    largest process when memory runs out)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        if int(info["MemAvailable"].split()[0]) / 2 ** 20 >= gb:
            return
        time.sleep(5)


def run_step(step: str, args, work: Path) -> dict:
    wait_for_memory(args.need_gb if step != "index" else args.need_gb / 3)
    cmd = [sys.executable, __file__, "--child", step, "--work", str(work), "--ckpt", args.ckpt, "--itm", args.itm,
           "--images", str(args.images), "--batch-size", str(args.batch_size),
           "--max-new-tokens", str(args.max_new_tokens or 0)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{step} failed (exit status {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="/tmp/bench-ckpt")
    p.add_argument("--itm", default="/tmp/bench-itm-shared")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=30,
                   help="greedy captions of this many new tokens, as benchmarks/results.md (0: the caption recipe's "
                        "beam search, whose batch of 8 x 5 beams needs about 21 GB in float32)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--need-gb", type=float, default=18.0, help="memory available before a captioning step starts")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results-onepass"))
    p.add_argument("--child", default=None)
    p.add_argument("--work", default=None)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    build_itm(Path(args.ckpt), Path(args.itm))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp) / "photos", args.images)
        for r in range(args.rounds):
            for step in ("caption", "index", "onepass"):
                for leftover in Path(tmp).glob(f"{step}*"):
                    leftover.unlink()
                for leftover in Path(tmp).glob("index.sqlite*"):
                    leftover.unlink()
                row = run_step(step, args, Path(tmp))
                row["round"] = r
                rows.append(row)
                print(json.dumps(row), flush=True)
    best = {s: min(x["work_s"] for x in rows if x["step"] == s) for s in ("caption", "index", "onepass")}
    cpu_s = {s: min(x["work_cpu_s"] for x in rows if x["step"] == s) for s in ("caption", "index", "onepass")}
    ratio = best["onepass"] / (best["caption"] + best["index"])
    cpu_ratio = cpu_s["onepass"] / (cpu_s["caption"] + cpu_s["index"])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    per_min = {s: 60 * args.images / best[s] for s in best}
    decoding = f"greedy, {args.max_new_tokens} new tokens" if args.max_new_tokens else "the caption recipe"
    md = [f"# One pass vs caption then index ({args.images} images, batch {args.batch_size}, {decoding}, {cpu}, "
          f"{args.rounds} round(s), best of each)", "",
          "| step | work s (wall) | images/min | work CPU s (all threads) | load s | peak GB |",
          "|---|---|---|---|---|---|"]
    for s in ("caption", "index", "onepass"):
        row = min((x for x in rows if x["step"] == s), key=lambda x: x["work_s"])
        md.append(f"| {s} | {row['work_s']:.1f} | {per_min[s]:.2f} | {cpu_s[s]:.1f} | {row['load_s']:.1f} | "
                  f"{row['peak_gb']:.1f} |")
    summed = best["caption"] + best["index"]
    md += ["", f"caption + index: {summed:.1f} s ({60 * args.images / summed:.2f} images/min); one pass: "
               f"{best['onepass']:.1f} s ({per_min['onepass']:.2f} images/min) = {ratio:.2f}x the summed time "
               f"(goal <= 0.80x); in CPU time {cpu_ratio:.2f}x; vision-weight hashing in the one pass: "
               f"{min(x['hash_s'] for x in rows if x['step'] == 'onepass'):.1f} s"]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"rows": rows, "ratio": ratio, "cpu_ratio": cpu_ratio,
                                                    "cpu": cpu}, indent=2))
    print("\n".join(md))


if __name__ == "__main__":
    main()
