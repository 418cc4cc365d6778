"""``mlx-blip2 doctor``: the MLX device, which BLAS the CPU backend uses and why, and what precision runs fast on
it (``--model``: whether that checkpoint's does)."""

from __future__ import annotations

from .. import _blas  # importing the package already preloaded the BLAS (mlx_blip2/__init__.py)

CPU_PRECISION = ("precision: on the CPU only float32 runs at BLAS speed; quantized (4-/8-bit) and float16/bfloat16 "
                 "models run several times slower (MLX's CPU kernels for them): use float32 checkpoints, or "
                 "--dtype float32, which dequantizes a quantized one once at load")


def add_parser(sub):
    p = sub.add_parser("doctor", help="report the MLX device and which BLAS the CPU backend uses")
    p.add_argument("--model", "-m", default=None,
                   help="also say whether this checkpoint's precision runs fast here (reads its config only)")
    return p


def checkpoint_precision(model: str) -> str:
    """What a checkpoint's config says of its precision (quantized bits, stored dtype), without loading weights."""
    import json

    from ..models.loading import resolve_checkpoint

    directory = resolve_checkpoint(model)
    config = json.loads((directory / "config.json").read_text())
    quantization = config.get("quantization") or config.get("quantization_config")
    if quantization:
        return f"{quantization.get('bits', '?')}-bit quantized"
    return str(config.get("torch_dtype") or "float32")


def run(args) -> int:
    import mlx.core as mx

    print(f"mlx {mx.__version__}, default device: {mx.default_device()}")
    for line in _blas.report():
        print(line)
    on_cpu = mx.default_device() == mx.cpu
    if on_cpu:
        print(CPU_PRECISION)
    if args.model:
        kind = checkpoint_precision(args.model)
        if not on_cpu:
            verdict = "fine here"
        elif kind.endswith("quantized"):
            verdict = "slow on this CPU; load it with --dtype float32 (dequantized once, at load)"
        else:  # stored floats load as float32 on the CPU unless --dtype says otherwise
            verdict = "loads as float32 on this CPU (fast); --dtype float16/bfloat16 would be slow"
        print(f"{args.model}: stored {kind} - {verdict}")
    return 0
