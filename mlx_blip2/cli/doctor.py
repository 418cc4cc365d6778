"""``mlx-blip2 doctor``: the MLX device, and which BLAS the CPU backend uses and why."""

from __future__ import annotations

from .. import _blas  # importing the package already preloaded the BLAS (mlx_blip2/__init__.py)


def add_parser(sub):
    return sub.add_parser("doctor", help="report the MLX device and which BLAS the CPU backend uses")


def run(args) -> int:
    import mlx.core as mx

    print(f"mlx {mx.__version__}, default device: {mx.default_device()}")
    for line in _blas.report():
        print(line)
    return 0
