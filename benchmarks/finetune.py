"""Fine-tuning step time and peak memory: mlx-blip2 against transformers float32 (+ peft for LoRA), side by side.

The real blip2-opt-2.7b architecture with random weights (benchmarks/make_checkpoint.py), batch 4 at 224 px, one
caption per image. Rows: ``qformer`` (query tokens, Q-Former, projection), ``lora`` (rank 16, alpha 32, dropout
0.05 on the OPT q/v projections, PEFT's BLIP-2 recipe) and ``qlora`` (the same LoRA on a 4-bit language model;
transformers' QLoRA needs bitsandbytes and a GPU, so its comparison is its float32 LoRA row). Each framework and row
runs in its own process, one after the other (never two 15 GB models at once), on the same token batch: the first
MLX child writes it with the training collator, the others read it. The QLoRA row trains on a 4-bit conversion
(``mlx-blip2-convert -q --dtype float32``: language model, Q-Former and projection in 4 bits, the ViT in float32),
made once beside the checkpoint, as a user with 16 GB would (quantizing in memory would first load the float
model). Run it under the shared lock:

    flock /tmp/bench.lock python benchmarks/finetune.py --checkpoint /tmp/bench-ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = Path("/tmp/bench-ckpt")
CAPTIONS = ["a dog sitting on a red couch in a bright living room", "two people riding bicycles along a beach",
            "a plate of pasta with tomatoes and basil on a wooden table", "a snowy mountain above a blue lake"]
RUNS = [("mlx", "qformer"), ("transformers", "qformer"), ("mlx", "lora"), ("transformers", "lora"),
        ("mlx", "qlora")]
LORA = dict(rank=16, alpha=32.0, dropout=0.05)
GOALS_GB = {"qformer": 20.0, "qlora": 8.0}


def rss_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def write_images(directory: Path) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(len(CAPTIONS)):
        path = directory / f"image{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(240, 320, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def timed_steps(step, steps: int) -> list[float]:
    """Seconds of each step after one warm-up step."""
    times = []
    for i in range(steps + 1):
        tic = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - tic)
    return times


# --- children: one framework and row per process ---------------------------------------------------------------


def quantized_checkpoint(checkpoint: Path) -> Path:
    """The 4-bit conversion, made once (in its own process: the converter loads the float32 model)."""
    out = checkpoint.with_name(checkpoint.name + "-4bit-f32")
    if not (out / "config.json").exists():
        print(f"converting {checkpoint} to 4 bits ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "mlx_blip2.convert", "--hf-path", str(checkpoint), "--mlx-path",
                        str(out), "-q", "--dtype", "float32"], check=True)
    return out


def child_mlx(checkpoint: Path, row: str, steps: int, work: Path) -> dict:
    import mlx_blip2  # noqa: F401  (loads the optimised BLAS before mlx.core)
    import mlx.core as mx

    from mlx_blip2 import load
    from mlx_blip2.training.datasets import Example
    from mlx_blip2.training.options import TrainOptions
    from mlx_blip2.training.trainable import LoraOptions
    from mlx_blip2.training.trainer import Trainer

    tic = time.perf_counter()
    pipe = load(checkpoint, dtype=mx.float32)
    load_s = time.perf_counter() - tic
    examples = [Example(p, c) for p, c in zip(write_images(work), CAPTIONS)]
    options = TrainOptions(train="qformer" if row == "qformer" else "lora", batch_size=len(examples),
                           steps=steps + 1, lora=LoraOptions(**LORA), progress=False)
    trainer = Trainer(pipe, examples, [], options, work / f"mlx-{row}", log=lambda line: print(line, file=sys.stderr))
    batch_file = work / "batch.npz"
    if not batch_file.exists():
        np.savez(batch_file, **trainer.collator(examples))
    losses = []
    times = timed_steps(lambda: losses.append(trainer.train_step()[0]), steps)
    return dict(load_s=load_s, step_s=float(np.median(times)), steps=times, loss=losses[-1],
                peak_gb=mx.get_peak_memory() / 1e9, rss_gb=rss_peak_gb(), cpu=mlx_blip2._blas.cpu_model(),
                blas=f"{mlx_blip2._blas.status[0]}", mlx=mx.__version__)


def child_torch(checkpoint: Path, row: str, steps: int, work: Path) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    tic = time.perf_counter()
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    load_s = time.perf_counter() - tic
    model.requires_grad_(False)
    if row == "qformer":
        for module in (model.qformer, model.language_projection):
            module.requires_grad_(True)
        model.query_tokens.requires_grad_(True)
    else:
        import peft

        config = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=r".*language_model.*\.(q_proj|v_proj)$")
        model = peft.inject_adapter_in_model(config, model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = 1e-5 if row == "qformer" else 1e-4
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    batch = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "i" else v)
             for k, v in np.load(work / "batch.npz").items()}
    losses = []

    def step():
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    times = timed_steps(step, steps)
    return dict(load_s=load_s, step_s=float(np.median(times)), steps=times, loss=losses[-1], rss_gb=rss_peak_gb(),
                peak_gb=rss_peak_gb(), torch=torch.__version__, transformers=transformers.__version__)


def rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1e6
    except (OSError, StopIteration):
        return 0.0


def run_child(framework: str, row: str, args, work: Path) -> dict:
    """One framework and row in a fresh process; killed if its memory passes --max-rss-gb (a shared machine)."""
    checkpoint = quantized_checkpoint(args.checkpoint) if row == "qlora" else args.checkpoint
    cmd = [sys.executable, __file__, "--child", framework, row, "--checkpoint", str(checkpoint), "--steps",
           str(args.steps), "--work", str(work)]
    print(f"{framework} {row} ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    highest = 0.0
    while proc.poll() is None:
        highest = max(highest, rss_gb(proc.pid))
        if highest > args.max_rss_gb:
            proc.kill()
            proc.wait()
            return {"error": f"stopped at {highest:.1f} GB resident (over --max-rss-gb {args.max_rss_gb})"}
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
    return json.loads(out.strip().splitlines()[-1])


# --- the report ------------------------------------------------------------------------------------------------


def fmt(x, unit="") -> str:
    return "-" if x is None or x != x else f"{x:.1f}{unit}"


def table(results: dict) -> str:
    lines = ["| row | mlx step (s) | transformers float32 step (s) | speed-up | mlx peak RSS (GB) | "
             "mlx peak MLX (GB) | transformers peak RSS (GB) | memory goal |",
             "|---|---|---|---|---|---|---|---|"]
    for row in ("qformer", "lora", "qlora"):
        ours = results.get(f"mlx-{row}", {})
        theirs = results.get(f"transformers-{'lora' if row == 'qlora' else row}", {})
        speed = theirs.get("step_s", float("nan")) / ours.get("step_s", float("nan")) \
            if "step_s" in ours and "step_s" in theirs else float("nan")
        goal = GOALS_GB.get(row)
        met = "-" if goal is None or "rss_gb" not in ours else \
            (f"<= {goal:.0f} GB: {'met' if ours['rss_gb'] <= goal else 'not met'}")
        lines.append(f"| {row} | {fmt(ours.get('step_s'))} | {fmt(theirs.get('step_s'))} | {fmt(speed, 'x')} | "
                     f"{fmt(ours.get('rss_gb'))} | {fmt(ours.get('peak_gb'))} | {fmt(theirs.get('rss_gb'))} | {met} |")
    errors = [f"- {name}: {r['error']}" for name, r in results.items() if "error" in r]
    return "\n".join(lines + ([""] + errors if errors else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    p.add_argument("--rows", default="qformer,lora,qlora")
    p.add_argument("--max-rss-gb", type=float, default=20.0, help="stop a run whose memory passes this")
    p.add_argument("--out", type=Path, default=ROOT / "results-finetune.json")
    p.add_argument("--child", nargs=2, metavar=("FRAMEWORK", "ROW"), help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        framework, row = args.child
        child = child_mlx if framework == "mlx" else child_torch
        print(json.dumps(child(args.checkpoint, row, args.steps, args.work)))
        return
    rows = args.rows.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for framework, row in RUNS:
            if row in rows and (framework == "mlx" or row != "qlora"):
                results[f"{framework}-{row}"] = run_child(framework, row, args, Path(work))
                print(json.dumps(results[f"{framework}-{row}"]), file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    report = table(results)
    args.out.with_suffix(".md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
