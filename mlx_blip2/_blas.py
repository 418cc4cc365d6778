"""Use an optimised BLAS for MLX's CPU matmuls on Linux.

The Linux ``mlx-cpu`` wheel links a reference ``cblas_sgemm``: a float32 257x1408x6144 matmul takes ~1.3 s with it
and ~35 ms with OpenBLAS on a 2-core x86 machine. Loading OpenBLAS with ``RTLD_GLOBAL`` before ``mlx.core`` is first
imported makes MLX's sgemm resolve to it; loading it later has no effect. macOS (Accelerate) is left alone.

``MLX_BLIP2_BLAS=off`` disables this; ``MLX_BLIP2_BLAS=/path/to/libblas.so`` picks another library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "libblis.so.4",
    "libmkl_rt.so",
)

# What happened, for `mlx-blip2 doctor`: (library path or None, reason).
status: tuple[str | None, str] = (None, "not attempted")


def preload() -> tuple[str | None, str]:
    global status
    setting = os.environ.get("MLX_BLIP2_BLAS", "").strip()
    if sys.platform == "darwin":
        status = (None, "macOS: MLX uses Accelerate")
    elif setting.lower() in ("0", "off", "false", "no", "none"):
        status = (None, "disabled by MLX_BLIP2_BLAS")
    elif "mlx.core" in sys.modules and status[0] is None:
        status = (None, "mlx.core was imported before mlx_blip2; import mlx_blip2 first to use an optimised BLAS")
    elif status[0] is None:
        candidates = [setting] if setting else [ctypes.util.find_library("openblas") or "", *CANDIDATES]
        status = (None, f"no optimised BLAS found (tried {', '.join(c for c in candidates if c)}); "
                        "install libopenblas0-pthread (Debian/Ubuntu) for ~30x faster float32 matmuls on the CPU")
        for path in candidates:
            if not path:
                continue
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            status = (path, "loaded before mlx.core")
            break
        if setting and status[0] is None:
            status = (None, f"MLX_BLIP2_BLAS={setting} could not be loaded")
    return status
