"""The optimised-BLAS preload: on by default where a library is found, switchable, and diagnosed."""

import subprocess
import sys

REPORT = "import mlx_blip2, mlx_blip2._blas as b; print(repr(b.status))"


def run(code: str, **env) -> str:
    import os

    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=full_env).stdout.strip()


def test_default_loads_an_optimised_blas_when_present():
    library, reason = eval(run(REPORT, MLX_BLIP2_BLAS=""))
    if sys.platform == "darwin":
        assert library is None and "Accelerate" in reason
    elif library is None:
        assert "no optimised BLAS found" in reason and "libblis4-pthread" in reason
    else:
        assert "blas" in library.lower() or "blis" in library.lower()
        assert reason.startswith("loaded before mlx.core")
        # The library really is in the process, ahead of MLX's own sgemm.
        maps = run("import mlx_blip2, mlx.core; print(open('/proc/self/maps').read())", MLX_BLIP2_BLAS="")
        assert "blas" in maps.lower() or "blis" in maps.lower()


def test_can_be_disabled_or_pointed_elsewhere():
    assert "disabled" in eval(run(REPORT, MLX_BLIP2_BLAS="off"))[1]
    if sys.platform != "darwin":
        library, reason = eval(run(REPORT, MLX_BLIP2_BLAS="/nonexistent/libfoo.so"))
        assert library is None and "/nonexistent/libfoo.so could not be loaded" in reason


def test_importing_mlx_first_is_diagnosed():
    library, reason = eval(run("import mlx.core; " + REPORT, MLX_BLIP2_BLAS=""))
    if sys.platform != "darwin":
        assert library is None and "import mlx_blip2 first" in reason


def test_doctor_reports_the_blas():
    out = run("from mlx_blip2.cli import main; main(['doctor'])", MLX_BLIP2_BLAS="off")
    assert "BLAS: reference (slow) (disabled by MLX_BLIP2_BLAS)" in out or sys.platform == "darwin"


BLIS_REPORT = """
import os, numpy as np, mlx_blip2, mlx_blip2._blas as b
import mlx.core as mx
rng = np.random.default_rng(0)
worst = 0.0
for m in (1, 5, 8, 9, 10, 257):  # either side of the small-matrix threshold
    x, w = rng.normal(size=(m, 300)).astype(np.float32), rng.normal(size=(700, 300)).astype(np.float32)
    got = np.array(mx.array(x) @ mx.array(w).T, dtype=np.float64)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    worst = max(worst, float(np.abs(got - exact).max() / np.abs(exact).max()))
print(repr((b.status, os.environ.get("BLIS_NUM_THREADS"), worst)))
"""


def test_blis_is_tuned_and_correct_on_both_kernel_families():
    if sys.platform == "darwin":
        return
    import ctypes

    try:
        ctypes.CDLL("libblis.so.4")
    except OSError:
        library = "libblis.so.4"
        reason = eval(run(REPORT, MLX_BLIP2_BLAS=library))[1]
        assert reason == f"MLX_BLIP2_BLAS={library} could not be loaded"
        return
    (library, reason), threads, worst = eval(run(BLIS_REPORT, MLX_BLIP2_BLAS="libblis.so.4", BLIS_NUM_THREADS=""))
    assert library == "libblis.so.4" and "small-matrix kernels below 9 rows" in reason
    assert threads == str(__import__("os").cpu_count()) and f"{threads} threads" in reason
    assert worst < 1e-5
    # A thread count the user chose is kept.
    (_, reason), threads, _ = eval(run(BLIS_REPORT, MLX_BLIP2_BLAS="libblis.so.4", BLIS_NUM_THREADS="1"))
    assert threads == "1" and "threads" not in reason
