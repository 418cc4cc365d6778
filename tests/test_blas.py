"""The optimised-BLAS preload: chosen by processor vendor, switchable, diagnosed, and numerically right."""

import json
import os
import subprocess
import sys

import pytest

import mlx_blip2._blas as blas

REPORT = "import mlx_blip2, mlx_blip2._blas as b; print(repr(b.status))"
linux_only = pytest.mark.skipif(sys.platform == "darwin", reason="macOS uses Accelerate")


def run(code: str, **env) -> str:
    full_env = {**os.environ, **env}
    for name, value in env.items():
        if value is None:
            del full_env[name]
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=full_env).stdout.strip()


# --- the choice, with the vendor and the libraries injected --------------------------------------------------------

BOTH = {"mkl": "/venv/lib/libmkl_rt.so.3", "blis": "/usr/lib/libblis.so.4"}


def test_intel_prefers_mkl_and_amd_prefers_blis():
    name, why = blas.choose("intel", BOTH)
    assert name == "mkl" and why.startswith("intel processor: MKL > BLIS") and "2x faster" in why
    name, why = blas.choose("amd", BOTH)
    assert name == "blis" and why.startswith("amd processor: BLIS > MKL")
    assert blas.choose("other", BOTH)[0] == "blis"
    assert blas.choose("some-new-vendor", {"openblas": "x", "mkl": "y"})[0] == "openblas"


def test_missing_preferred_library_falls_back_and_says_how_to_install_it():
    name, why = blas.choose("intel", {"blis": BOTH["blis"]})
    assert name == "blis" and "not installed: MKL" in why and "mlx-blip2[cpu]" in why
    name, why = blas.choose("amd", {"mkl": BOTH["mkl"]})
    assert name == "mkl" and "libblis4-pthread" in why
    name, why = blas.choose("amd", {})
    assert name is None and "no optimised BLAS found" in why and "libblis4-pthread" in why


def test_vendor_is_read_from_cpuinfo():
    assert blas.vendor_from_cpuinfo("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n") == "intel"
    assert blas.vendor_from_cpuinfo("processor\t: 0\nvendor_id\t: AuthenticAMD\n") == "amd"
    assert blas.vendor_from_cpuinfo("processor\t: 0\nBogoMIPS\t: 50.00\n") is None  # e.g. aarch64
    vendor, source = blas.cpu_vendor()
    assert vendor in blas.PREFERENCE and source


def test_the_vendor_can_be_injected(monkeypatch):
    monkeypatch.setenv(blas.VENDOR_ENV, "intel")
    assert blas.cpu_vendor() == ("intel", f"{blas.VENDOR_ENV}=intel")
    monkeypatch.setenv(blas.VENDOR_ENV, "riscv-co")
    assert blas.cpu_vendor()[0] == "other"


def test_mkl_is_looked_for_in_this_pythons_environment():
    assert any(str(d).startswith(sys.prefix) for d in blas._library_dirs()[:2])
    path = blas.locate("mkl")
    if path is not None and "/" in path:
        assert os.path.basename(path).startswith("libmkl_rt.so")


# --- in a process: what loads, and the products it computes -------------------------------------------------------

def test_default_loads_an_optimised_blas_when_present():
    library, reason = eval(run(REPORT, MLX_BLIP2_BLAS=""))
    if sys.platform == "darwin":
        assert library is None and "Accelerate" in reason
    elif library is None:
        assert "no optimised BLAS found" in reason and "libblis4-pthread" in reason
    else:
        assert any(s in library.lower() for s in ("blas", "blis", "mkl"))
        assert reason.startswith("loaded before mlx.core")
        # The library really is in the process, ahead of MLX's own sgemm.
        maps = run("import mlx_blip2, mlx.core; print(open('/proc/self/maps').read())", MLX_BLIP2_BLAS="")
        assert os.path.basename(library) in maps


@linux_only
def test_can_be_disabled_or_pointed_elsewhere():
    assert "disabled" in eval(run(REPORT, MLX_BLIP2_BLAS="off"))[1]
    library, reason = eval(run(REPORT, MLX_BLIP2_BLAS="/nonexistent/libfoo.so"))
    assert library is None and "/nonexistent/libfoo.so could not be loaded" in reason


@linux_only
def test_importing_mlx_first_is_diagnosed():
    library, reason = eval(run("import mlx.core; " + REPORT, MLX_BLIP2_BLAS=""))
    assert library is None and "import mlx_blip2 first" in reason


def test_report_lines_when_disabled():
    out = run("import mlx_blip2._blas as b; print('\\n'.join(b.report()))", MLX_BLIP2_BLAS="off")
    if sys.platform != "darwin":
        lines = out.splitlines()
        assert lines[0] == "BLAS: reference (slow) (disabled by MLX_BLIP2_BLAS)"
        assert any(line.startswith("CPU: ") and "vendor" in line for line in lines)


# Loads the library the environment picks, multiplies through MLX on both sides of BLIS's small-matrix threshold
# and with transposed operands, and compares with numpy in float64.
PRODUCTS = """
import os, numpy as np, mlx_blip2, mlx_blip2._blas as b
import mlx.core as mx
rng = np.random.default_rng(0)
worst = 0.0
for m in (1, 5, 8, 9, 10, 257):
    x, w = rng.normal(size=(m, 300)).astype(np.float32), rng.normal(size=(700, 300)).astype(np.float32)
    for got in (mx.array(x) @ mx.array(w).T, (mx.array(w) @ mx.array(x).T).T):
        got = np.array(got, dtype=np.float64)
        exact = x.astype(np.float64) @ w.T.astype(np.float64)
        worst = max(worst, float(np.abs(got - exact).max() / np.abs(exact).max()))
maps = open('/proc/self/maps').read()
print(repr((b.status, b.info.get('name'), {v: os.environ.get(v) for v in ('BLIS_NUM_THREADS', 'MKL_NUM_THREADS')},
            worst, b.report(measure_speed=False), 'libmkl_rt' in maps, 'libblis' in maps)))
"""


def products(**env):
    return eval(run(PRODUCTS, **env))


@linux_only
@pytest.mark.parametrize("vendor", ["intel", "amd"])
def test_each_vendor_gets_its_library_and_right_products(vendor):
    found = blas.available()
    expected, _ = blas.choose(vendor, found)
    if expected is None:
        pytest.skip("no optimised BLAS installed")
    (library, reason), name, threads, worst, report, has_mkl, has_blis = products(
        MLX_BLIP2_BLAS="", MLX_BLIP2_CPU_VENDOR=vendor, BLIS_NUM_THREADS=None, MKL_NUM_THREADS=None,
        OMP_NUM_THREADS=None)
    assert name == expected and library == found[expected] and reason.startswith("loaded before mlx.core")
    assert worst < 1e-5
    assert {"mkl": has_mkl, "blis": has_blis}.get(expected, True)
    assert not (has_mkl and has_blis)  # only the chosen one is loaded
    choice = next(line for line in report if line.startswith("BLAS choice: "))
    assert f"{vendor} processor" in choice and blas.LABELS[expected] in choice
    assert any(line.startswith("BLAS version: ") and "threads: " in line for line in report)
    if expected == "mkl":
        assert threads["MKL_NUM_THREADS"] == str(blas.physical_cores()) and "threads" in reason
    if expected == "blis":
        assert threads["BLIS_NUM_THREADS"] == str(os.cpu_count())


@linux_only
def test_mkl_keeps_the_users_thread_count_and_is_right():
    if "mkl" not in blas.available():
        pytest.skip("MKL not installed (pip install 'mlx-blip2[cpu]' on Linux x86-64)")
    (_, reason), name, threads, worst, report, has_mkl, _ = products(
        MLX_BLIP2_BLAS="mkl", MKL_NUM_THREADS="1", MLX_BLIP2_CPU_VENDOR="amd")
    assert name == "mkl" and has_mkl and worst < 1e-5
    assert threads["MKL_NUM_THREADS"] == "1" and "threads" not in reason
    assert any("threads: 1 (mkl_get_max_threads" in line for line in report)
    # OMP_NUM_THREADS is a user's choice too: MKL_NUM_THREADS is then left unset.
    (_, reason), _, threads, _, _, _, _ = products(MLX_BLIP2_BLAS="mkl", MKL_NUM_THREADS=None, OMP_NUM_THREADS="1")
    assert threads["MKL_NUM_THREADS"] is None and "threads" not in reason


@linux_only
def test_blis_is_tuned_and_correct_on_both_kernel_families():
    import ctypes

    try:
        ctypes.CDLL("libblis.so.4")
    except OSError:
        library = "libblis.so.4"
        reason = eval(run(REPORT, MLX_BLIP2_BLAS=library))[1]
        assert reason == f"MLX_BLIP2_BLAS={library} could not be loaded"
        return
    (library, reason), name, threads, worst, _, _, _ = products(MLX_BLIP2_BLAS="libblis.so.4", BLIS_NUM_THREADS="")
    assert library == "libblis.so.4" and name == "blis" and "small-matrix kernels below 9 rows" in reason
    assert threads["BLIS_NUM_THREADS"] == str(os.cpu_count()) and f"{os.cpu_count()} threads" in reason
    assert worst < 1e-5
    # A thread count the user chose is kept.
    (_, reason), _, threads, _, _, _, _ = products(MLX_BLIP2_BLAS="blis", BLIS_NUM_THREADS="1")
    assert threads["BLIS_NUM_THREADS"] == "1" and "threads" not in reason


def test_ranks_of_one_launch_split_the_cores(tmp_path):
    # mlx.launch writes one "ip:port" list per rank; ranks on the same machine share its cores.
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["10.0.0.2:5002"]]))
    code = "import mlx_blip2._blas as b; print(b.local_ranks())"
    assert run(code, MLX_HOSTFILE=str(hostfile), MLX_RANK="0") == "2"
    assert run(code, MLX_HOSTFILE=str(hostfile), MLX_RANK="2") == "1"
    assert run(code, MLX_HOSTFILE=None, MLX_RANK=None) == "1"
    hostfile.write_text("not json")
    assert run(code, MLX_HOSTFILE=str(hostfile), MLX_RANK="0") == "1"
    hostfile.write_text(json.dumps([["127.0.0.1:1"], ["127.0.0.1:2"]]))
    threads = run("import os, mlx_blip2; print(os.environ.get('BLIS_NUM_THREADS'), os.environ.get('MKL_NUM_THREADS'))",
                  MLX_HOSTFILE=str(hostfile), MLX_RANK="1", BLIS_NUM_THREADS=None, MKL_NUM_THREADS=None,
                  OMP_NUM_THREADS=None, MLX_BLIP2_BLAS="")
    assert str(max(1, (os.cpu_count() or 1) // 2)) in threads.split()  # the loaded library's count, halved
