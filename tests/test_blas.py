"""The optimised-BLAS preload: on by default where a library is found, switchable, and diagnosed."""

import subprocess
import sys

REPORT = "import mlx_blip2, mlx_blip2._blas as b; print(repr(b.status))"


def run(code: str, **env) -> str:
    import os

    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=full_env).stdout.strip()


def test_default_loads_openblas_when_present():
    library, reason = eval(run(REPORT, MLX_BLIP2_BLAS=""))
    if sys.platform == "darwin":
        assert library is None and "Accelerate" in reason
    elif library is None:
        assert "no optimised BLAS found" in reason and "libopenblas0-pthread" in reason
    else:
        assert "blas" in library.lower() and reason == "loaded before mlx.core"
        # The library really is in the process, ahead of MLX's own sgemm.
        maps = run("import mlx_blip2, mlx.core; print(open('/proc/self/maps').read())", MLX_BLIP2_BLAS="")
        assert "blas" in maps.lower()


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
