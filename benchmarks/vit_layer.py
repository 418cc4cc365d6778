"""One ViT-g encoder layer, ours versus transformers (torch), side by side and broken into its parts.

    python benchmarks/vit_layer.py [--rounds 5] [--reps 5] [--threads 2] [--baseline HEAD] [--tokens 257]

Hidden 1408, 16 heads, MLP 6144, 257 tokens (224 px), float32, batch 1, random weights shared by both. Every part is
timed in turn for each implementation, round after round (this machine's speed drifts by tens of percent within
minutes, so only figures from one interleaved run compare), and each keeps its best. ``--baseline REV`` adds the
layer as the models' code was at git revision REV (read with ``git show``), for before/after figures.
Parts: the two layer norms, the four GEMMs (qkv, output projection, fc1, fc2), the attention core (from the qkv
projection's output to the output projection's input: head split, scores, softmax, weighted sum, head merge) and
the exact GELU. The residual adds are in the whole-layer rows only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx_blip2  # noqa: E402,F401  (loads the optimised BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

PARTS = ("layer_norm1", "qkv GEMM", "attention core", "projection GEMM", "layer_norm2", "fc1 GEMM", "GELU",
         "fc2 GEMM", "whole layer")


def baseline_models(rev: str):
    """The models package's vision/base/cpu_math files at ``rev``, importable as a separate package."""
    folder = Path(tempfile.mkdtemp()) / "_baseline_models"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for name in ("vision.py", "base.py", "cpu_math.py"):
        text = subprocess.run(["git", "show", f"{rev}:mlx_blip2/models/{name}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        (folder / name).write_text(text)
    sys.path.insert(0, str(folder.parent))
    import _baseline_models.vision as vision

    return vision


def mlx_parts(vision, state: dict, x_np: np.ndarray) -> dict:
    from mlx_blip2.models.base import ACT

    layer = vision.Blip2EncoderLayer(vision.Blip2VisionConfig())
    layer.load_weights([(k, mx.array(v)) for k, v in state.items()])
    mx.eval(layer.parameters())
    att, mlp = layer.self_attn, layer.mlp
    B, L, D = x_np.shape
    x = mx.array(x_np)
    h = mlp.fc1(x)
    mx.eval(x, h)
    gelu = getattr(vision, "ACT", ACT)["gelu"]
    if hasattr(att, "qkv_t"):  # the transposed CPU path
        def qkv():
            return att.qkv_t(x)

        qkv_out = qkv()
        mx.eval(qkv_out)
        core_out = att.attention_t(qkv_out)
        mx.eval(core_out)

        def core():
            return att.attention_t(qkv_out)

        def proj():
            return att.projection(core_out.swapaxes(-1, -2))
    else:
        H = att.num_heads
        scale = att.scale
        sdpa = vision.scaled_dot_product_attention
        qkv_out = att.qkv(x)
        mx.eval(qkv_out)

        def qkv():
            return att.qkv(x)

        def core():
            t = qkv_out.reshape(B, L, 3, H, -1).transpose(2, 0, 3, 1, 4)
            return sdpa(t[0], t[1], t[2], scale=scale).transpose(0, 2, 1, 3).reshape(B, L, D)

        def proj():
            return att.projection(x)
    return {
        "layer_norm1": lambda: layer.layer_norm1(x),
        "qkv GEMM": qkv,
        "attention core": core,
        "projection GEMM": proj,
        "layer_norm2": lambda: layer.layer_norm2(x),
        "fc1 GEMM": lambda: mlp.fc1(x),
        "GELU": lambda: gelu(h),
        "fc2 GEMM": lambda: mlp.fc2(h),
        "whole layer": lambda: layer(x),
    }, layer, x


def torch_parts(layer, x_np: np.ndarray) -> dict:
    import torch
    import torch.nn.functional as F

    att, mlp = layer.self_attn, layer.mlp
    B, L, D = x_np.shape
    H = att.num_heads
    x = torch.from_numpy(x_np)
    with torch.no_grad():
        qkv_out, h = att.qkv(x), mlp.fc1(x)

    def core():  # as transformers' Blip2Attention with the "sdpa" attention implementation
        t = qkv_out.reshape(B, L, 3, H, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(t[0], t[1], t[2], scale=att.scale)
        return out.transpose(1, 2).reshape(B, L, D).contiguous()

    return {
        "layer_norm1": lambda: layer.layer_norm1(x),
        "qkv GEMM": lambda: att.qkv(x),
        "attention core": core,
        "projection GEMM": lambda: att.projection(x),
        "layer_norm2": lambda: layer.layer_norm2(x),
        "fc1 GEMM": lambda: mlp.fc1(x),
        "GELU": lambda: mlp.activation_fn(h),
        "fc2 GEMM": lambda: mlp.fc2(h),
        "whole layer": lambda: layer(x),
    }


def best_ms(fn, reps: int) -> float:
    fn()  # warm-up (compilation, allocation)
    best = float("inf")
    for _ in range(reps):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (MLX's BLAS: see doctor)")
    p.add_argument("--tokens", type=int, default=257)
    p.add_argument("--baseline", help="also time the models' code at this git revision (e.g. HEAD)")
    args = p.parse_args(argv)

    import torch
    from transformers import Blip2VisionConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2EncoderLayer

    from mlx_blip2.models import vision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Blip2VisionConfig()
    config._attn_implementation = "sdpa"
    t_layer = Blip2EncoderLayer(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a wrong one shows
        for name, param in t_layer.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    state = {k: v.detach().numpy() for k, v in t_layer.state_dict().items()}
    x_np = np.random.default_rng(0).normal(size=(1, args.tokens, config.hidden_size)).astype(np.float32)

    impls = {}
    ours, our_layer, x = mlx_parts(vision, state, x_np)
    impls["ours"] = ("mlx", ours)
    if args.baseline:
        impls[f"ours@{args.baseline}"] = ("mlx", mlx_parts(baseline_models(args.baseline), state, x_np)[0])
    impls["torch"] = ("torch", torch_parts(t_layer, x_np))

    with torch.no_grad():
        exact = t_layer.double()(torch.from_numpy(x_np).double()).numpy()
        t_layer.float()
        got_torch = t_layer(torch.from_numpy(x_np)).numpy()
    got = np.array(our_layer(x))
    scale = np.abs(exact).max()
    print(f"max |error| / max |out| against float64: ours {np.abs(got - exact).max() / scale:.2e}, "
          f"torch float32 {np.abs(got_torch - exact).max() / scale:.2e}")

    times = {(impl, part): float("inf") for impl in impls for part in PARTS}
    with torch.no_grad():
        for _ in range(args.rounds):
            for part in PARTS:
                for impl, (kind, parts) in impls.items():
                    fn = parts[part]
                    run = (lambda fn=fn: mx.eval(fn())) if kind == "mlx" else fn
                    times[impl, part] = min(times[impl, part], best_ms(run, args.reps))

    import mlx_blip2._blas as blas

    print(f"BLAS: {blas.status[0]} ({blas.status[1]}); torch {torch.__version__}, {args.threads} threads; "
          f"{args.tokens} tokens; best of {args.rounds} rounds x {args.reps} reps, interleaved")
    names = list(impls)
    print("| part | " + " | ".join(f"{n} ms" for n in names) + " | ours / torch |")
    print("|---" * (len(names) + 2) + "|")
    for part in PARTS:
        cells = " | ".join(f"{times[n, part]:.2f}" for n in names)
        print(f"| {part} | {cells} | {times['ours', part] / times['torch', part]:.2f} |")
    sums = {n: sum(times[n, p] for p in PARTS[:-1]) for n in names}
    print("| sum of parts | " + " | ".join(f"{sums[n]:.2f}" for n in names)
          + f" | {sums['ours'] / sums['torch']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
