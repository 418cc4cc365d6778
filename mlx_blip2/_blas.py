"""Use an optimised BLAS for MLX's CPU matmuls on Linux.

The Linux ``mlx-cpu`` wheel links a reference ``cblas_sgemm``: a float32 257x1408x6144 matmul takes ~1.3 s with it
and ~25 ms with an optimised library on a 2-core x86 machine. Loading one with ``RTLD_GLOBAL`` before ``mlx.core``
is first imported makes MLX's sgemm resolve to it; loading it later has no effect. macOS (Accelerate) is left alone.

BLIS comes first: MLX multiplies even a single row (every decoded token) through sgemm, and BLIS runs those
products at ~22 GB/s where Debian's OpenBLAS 0.3.21 packs the weight first and reaches ~10 (measured: decode 2.0
versus 1.3 tokens/s on blip2-opt-2.7b). BLIS sends every product with a dimension under a few hundred to its
small-matrix ("sup") kernels, which run the ViT-g's 257-row products at ~95 GFLOP/s against ~160 for its blocked
kernels; we lower the row threshold to 9 (measured: blocked is faster from about 9 rows up) so that decoding keeps them.

``MLX_BLIP2_BLAS=off`` disables this; ``MLX_BLIP2_BLAS=/path/to/libblas.so`` (or a name such as
``libopenblas.so.0``) picks another library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

CANDIDATES = (
    "libblis.so.4",
    "libblis.so.3",
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "libmkl_rt.so",
)
# BLIS uses its small-matrix kernels when rows < MT, columns < NT or depth < KT: up to 8 rows (decoding) keep them,
# and so do small matrices (tiny models, attention heads), where the blocked path's packing and threads cost more.
BLIS_SUP_THRESHOLDS = {"MT": 9, "NT": 200, "KT": 200}
_BLIS_THREAD_VARS = ("BLIS_NUM_THREADS", "BLIS_JC_NT", "BLIS_PC_NT", "BLIS_IC_NT", "BLIS_JR_NT", "BLIS_IR_NT")

# What happened, for `mlx-blip2 doctor`: (library path or None, reason).
status: tuple[str | None, str] = (None, "not attempted")


class _Blocksize(ctypes.Structure):  # BLIS's blksz_t: a value and an extension per float type
    _fields_ = [("v", ctypes.c_int64 * 4), ("e", ctypes.c_int64 * 4)]


def _tune_blis(lib: ctypes.CDLL) -> str:
    """Threads, and small-matrix thresholds for BLIS 0.6-0.9 (1.0 changed that API: left at its defaults there)."""
    notes = []
    if not any(os.environ.get(v) for v in _BLIS_THREAD_VARS):
        os.environ["BLIS_NUM_THREADS"] = str(os.cpu_count() or 1)  # BLIS is single-threaded unless told
        notes.append(f"{os.environ['BLIS_NUM_THREADS']} threads")
    lib.bli_info_get_version_str.restype = ctypes.c_char_p
    version = lib.bli_info_get_version_str().decode()
    major, minor = (version.split(".") + ["", ""])[:2]
    if major == "0" and minor.isdigit() and 6 <= int(minor) <= 9:
        lib.bli_gks_query_cntx.restype = ctypes.c_void_p
        context = lib.bli_gks_query_cntx()  # the active architecture's context, which every call reads
        args = []
        for threshold_id, name in enumerate(("MT", "NT", "KT")):  # BLIS_MT, BLIS_NT, BLIS_KT
            n = BLIS_SUP_THRESHOLDS[name]
            size = _Blocksize((ctypes.c_int64 * 4)(n, n, n, n), (ctypes.c_int64 * 4)(n, n, n, n))
            args += [ctypes.c_int(threshold_id), ctypes.byref(size)]
        lib.bli_cntx_set_l3_sup_thresh(ctypes.c_int64(3), *args, ctypes.c_void_p(context))
        notes.append(f"small-matrix kernels below {BLIS_SUP_THRESHOLDS['MT']} rows")
    return ", ".join([f"BLIS {version}", *notes])


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
        candidates = [setting] if setting else [*CANDIDATES, ctypes.util.find_library("openblas") or ""]
        status = (None, f"no optimised BLAS found (tried {', '.join(c for c in candidates if c)}); "
                        "install libblis4-pthread (Debian/Ubuntu) for ~30x faster float32 matmuls on the CPU")
        for path in candidates:
            if not path:
                continue
            try:
                lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            tuning = _tune_blis(lib) if hasattr(lib, "bli_info_get_version_str") else ""
            status = (path, "loaded before mlx.core" + (f"; {tuning}" if tuning else ""))
            break
        if setting and status[0] is None:
            status = (None, f"MLX_BLIP2_BLAS={setting} could not be loaded")
    return status
