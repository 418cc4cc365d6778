"""Use an optimised BLAS for MLX's CPU matmuls on Linux, the one that is fastest on this processor.

The Linux ``mlx-cpu`` wheel links a reference ``cblas_sgemm``: a float32 257x1408x6144 matmul takes ~1.3 s with it
and ~25 ms with an optimised library on a 2-core x86 machine. Loading one with ``RTLD_GLOBAL`` before ``mlx.core``
is first imported makes MLX's sgemm resolve to it; loading it later has no effect. macOS (Accelerate) is left alone.

Which library, by processor vendor (``/proc/cpuinfo``'s ``vendor_id``), from measurements (``python -m
mlx_blip2._blas --compare`` repeats them on any machine):

* Intel: MKL (PyPI's ``mkl``, which the ``cpu`` extra installs on Linux x86-64; found in this Python's environment,
  ``sys.prefix/lib``, where pip puts it). On a Xeon with AVX-512 BLIS ran a one-row 2560x10240 product (every
  decoded token) at 12.3 GB/s against MKL's 37.3, and the ViT-g's 257x1408x6144 GEMM at 135 GFLOP/s against 210.
* AMD (and others): BLIS (Debian/Ubuntu ``libblis4-pthread``), then MKL, then OpenBLAS. BLIS runs the one-row
  products at ~22 GB/s where Debian's OpenBLAS 0.3.21 packs the weight first and reaches ~10 (decode 2.0 versus 1.3
  tokens/s on blip2-opt-2.7b); on an AMD EPYC (Zen 4) BLIS is also ahead of MKL (257x1408x6144: 180 versus 139
  GFLOP/s; one-row: 20.1 versus 18.7 GB/s). Under CPU contention BLIS's spinning threads degrade far more than MKL's.

BLIS sends every product with a dimension under a few hundred to its small-matrix ("sup") kernels, which run the
ViT-g's 257-row products at ~95 GFLOP/s against ~160 for its blocked kernels; we lower the row threshold to 9
(measured: blocked is faster from about 9 rows up) so that decoding keeps them. Threads: BLIS is single-threaded
unless told, so ``BLIS_NUM_THREADS`` is set to the CPU count; MKL gets ``MKL_NUM_THREADS`` = the physical cores
(its own default). A thread count the user set (``BLIS_*``, or ``MKL_NUM_THREADS`` / ``OMP_NUM_THREADS``) is kept.

``MLX_BLIP2_BLAS``: ``off`` disables this; ``mkl``, ``blis`` or ``openblas`` picks that library; a path (or a
soname such as ``libopenblas.so.0``) loads that file. ``MLX_BLIP2_CPU_VENDOR`` (``intel``, ``amd``, ...) replaces
the detected vendor; it exists for the tests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import site
import sys
import time
from pathlib import Path

ENV = "MLX_BLIP2_BLAS"
VENDOR_ENV = "MLX_BLIP2_CPU_VENDOR"

# name -> sonames, newest first (libmkl_rt.so.3 is oneMKL 2025+, .so.2 is 2022-2024).
LIBRARIES = {
    "mkl": ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so.1", "libmkl_rt.so"),
    "blis": ("libblis.so.4", "libblis.so.3"),
    "openblas": ("libopenblas.so.0",),
}
LABELS = {"mkl": "MKL", "blis": "BLIS", "openblas": "OpenBLAS"}
# Vendor -> libraries in order of preference, and why.
PREFERENCE = {
    "intel": ("mkl", "blis", "openblas"),
    "amd": ("blis", "mkl", "openblas"),
    "other": ("blis", "openblas", "mkl"),
}
WHY = {
    "intel": "on Intel MKL is ~2x faster than BLIS (Xeon, AVX-512: one-row 2560x10240 product 37.3 vs 12.3 GB/s, "
             "257x1408x6144 GEMM 210 vs 135 GFLOP/s)",
    "amd": "on AMD BLIS measured ahead of MKL (EPYC, Zen 4: 257x1408x6144 GEMM 180 vs 139 GFLOP/s, one-row "
           "2560x10240 product 20.1 vs 18.7 GB/s)",
    "other": "BLIS runs one-row (decoding) products ~2x faster than OpenBLAS",
}
INSTALL_HINT = {
    "mkl": "pip install 'mlx-blip2[cpu]' (Linux x86-64) or pip install mkl",
    "blis": "apt-get install libblis4-pthread (Debian/Ubuntu)",
    "openblas": "apt-get install libopenblas0 (Debian/Ubuntu)",
}
# BLIS uses its small-matrix kernels when rows < MT, columns < NT or depth < KT: up to 8 rows (decoding) keep them,
# and so do small matrices (tiny models, attention heads), where the blocked path's packing and threads cost more.
BLIS_SUP_THRESHOLDS = {"MT": 9, "NT": 200, "KT": 200}
_BLIS_THREAD_VARS = ("BLIS_NUM_THREADS", "BLIS_JC_NT", "BLIS_PC_NT", "BLIS_IC_NT", "BLIS_JR_NT", "BLIS_IR_NT")
_MKL_THREAD_VARS = ("MKL_NUM_THREADS", "OMP_NUM_THREADS")

# What happened, for `mlx-blip2 doctor`: (library path or None, reason).
status: tuple[str | None, str] = (None, "not attempted")
# More of it, for report(): vendor, choice, why, library name, version, threads, what else was found.
info: dict = {}


# ----------------------------------------------------------------------------------------------------------------
# The processor and the libraries present


def vendor_from_cpuinfo(text: str) -> str | None:
    """``intel``, ``amd`` or the raw vendor id, from /proc/cpuinfo's text; None when it names none."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("vendor_id", "vendor"):
            value = value.strip()
            return {"GenuineIntel": "intel", "AuthenticAMD": "amd", "HygonGenuine": "amd"}.get(value, value.lower())
    return None


def cpu_vendor() -> tuple[str, str]:
    """The processor's vendor as one of PREFERENCE's keys, and where that came from."""
    override = os.environ.get(VENDOR_ENV, "").strip().lower()
    if override:
        return (override if override in PREFERENCE else "other"), f"{VENDOR_ENV}={override}"
    try:
        vendor = vendor_from_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
        source = "/proc/cpuinfo"
    except OSError:
        vendor, source = None, ""
    if vendor is None:  # no /proc: platform's processor string ("Intel64 Family 6 ...", "AMD64 Family 25 ...")
        text = f"{platform.processor()} {platform.machine()}".lower()
        vendor = "intel" if "intel" in text else "amd" if "amd" in text and "amd64" not in text else None
        source = "platform.processor()"
    if vendor is None:
        return "other", f"unknown vendor ({platform.machine()})"
    return (vendor if vendor in PREFERENCE else "other"), f"{source}: {vendor}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _library_dirs() -> list[Path]:
    """Where pip installs shared libraries (``<prefix>/lib``), then LD_LIBRARY_PATH, then the system's."""
    dirs = [Path(sys.prefix) / "lib", Path(site.getuserbase() or "~/.local").expanduser() / "lib"]
    try:
        dirs += [Path(p).parent.parent.parent / "lib" for p in site.getsitepackages()]  # <prefix>/lib/pythonX/site-…
    except AttributeError:  # some virtualenvs' site module
        pass
    dirs += [Path(sys.base_prefix) / "lib"]
    dirs += [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    machine = platform.machine()
    dirs += [Path(p) for p in (f"/usr/lib/{machine}-linux-gnu", f"/lib/{machine}-linux-gnu", "/usr/lib64",
                               "/usr/local/lib", "/usr/lib")]
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def locate(name: str) -> str | None:
    """The file (or, from the linker cache, the soname) of library ``name`` (a LIBRARIES key), or None."""
    for soname in LIBRARIES[name]:
        for folder in _library_dirs():
            if (folder / soname).is_file():
                return str(folder / soname)
    found = ctypes.util.find_library({"mkl": "mkl_rt"}.get(name, name))  # ldconfig's cache
    return found if found and any(found.startswith(s.split(".so")[0]) for s in LIBRARIES[name]) else None


def available() -> dict[str, str]:
    """Every known library present: name -> file."""
    return {name: path for name in LIBRARIES if (path := locate(name))}


def choose(vendor: str, available: dict[str, str]) -> tuple[str | None, str]:
    """The library to load for ``vendor`` given the ``available`` ones (name -> file), and why. Pure."""
    order = PREFERENCE.get(vendor, PREFERENCE["other"])
    for rank, name in enumerate(order):
        if name in available:
            why = f"{vendor} processor: {' > '.join(LABELS[n] for n in order)}, because {WHY.get(vendor, WHY['other'])}"
            if rank:
                missing = order[:rank]
                why += "; not installed: " + ", ".join(f"{LABELS[n]} ({INSTALL_HINT[n]})" for n in missing)
            return name, why
    return None, (f"no optimised BLAS found for this {vendor} processor (float32 matmuls on the CPU are ~30x slower "
                  "without one); install one: " + " or ".join(INSTALL_HINT[n] for n in order[:2]))


# ----------------------------------------------------------------------------------------------------------------
# Loading and tuning


class _Blocksize(ctypes.Structure):  # BLIS's blksz_t: a value and an extension per float type
    _fields_ = [("v", ctypes.c_int64 * 4), ("e", ctypes.c_int64 * 4)]


def physical_cores() -> int:
    """Physical cores this process may run on (MKL's own default thread count), else the CPU count."""
    try:
        allowed = os.sched_getaffinity(0)
        cores, cpu = set(), None
        physical = "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (s.strip() for s in line.partition(":"))
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                physical = value
            elif key == "core id" and cpu in allowed:
                cores.add((physical, value))
        return len(cores) or len(allowed)
    except (OSError, ValueError, AttributeError):
        return os.cpu_count() or 1


def local_ranks() -> int:
    """How many ``mlx.launch`` ranks run on this machine (1 outside a launch): they share its cores, and BLIS's
    spinning threads slow down badly when more threads than cores compete. Read from the launch's hostfile
    (``MLX_HOSTFILE``: one list of "ip:port" per rank); any other layout counts as 1."""
    path, rank = os.environ.get("MLX_HOSTFILE"), os.environ.get("MLX_RANK")
    if not path or rank is None:
        return 1
    try:
        hosts = json.loads(Path(path).read_text())
        ip = [str(entry[0]).rsplit(":", 1)[0] for entry in hosts]
        return max(1, ip.count(ip[int(rank)]))
    except (OSError, ValueError, IndexError, TypeError, KeyError):
        return 1


def _tune_blis(lib: ctypes.CDLL) -> tuple[str, list[str]]:
    """Threads, and small-matrix thresholds for BLIS 0.6-0.9 (1.0 changed that API: left at its defaults there)."""
    notes = []
    if not any(os.environ.get(v) for v in _BLIS_THREAD_VARS):
        # BLIS is single-threaded unless told; ranks of one launch on this machine split its cores.
        os.environ["BLIS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local_ranks()))
        info["threads_set"] = ["BLIS_NUM_THREADS"]
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
    return f"BLIS {version}", notes


def _mkl_threads_env() -> list[str]:
    """MKL_NUM_THREADS = physical cores unless the user chose (MKL_NUM_THREADS or OMP_NUM_THREADS); before loading."""
    if any(os.environ.get(v) for v in _MKL_THREAD_VARS):
        return []
    os.environ["MKL_NUM_THREADS"] = str(max(1, physical_cores() // local_ranks()))
    info["threads_set"] = ["MKL_NUM_THREADS"]
    return [f"{os.environ['MKL_NUM_THREADS']} threads"]


def _describe_mkl(lib: ctypes.CDLL) -> str:
    buf = ctypes.create_string_buffer(256)
    try:
        lib.mkl_get_version_string(buf, ctypes.c_int(len(buf)))
        text = buf.value.decode(errors="replace")
    except AttributeError:
        return "MKL"
    words = text.split()
    version = words[words.index("Version") + 1].split("-")[0] if "Version" in words[:-1] else text
    return f"MKL {version}"


def _threads(name: str | None, lib: ctypes.CDLL | None) -> str:
    """The library's thread count as it reports it (or its environment variable), and where that came from."""
    by = f"; {' and '.join(info['threads_set'])} set by mlx-blip2" if info.get("threads_set") else ""
    try:
        if name == "mkl":
            env = ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in _MKL_THREAD_VARS)
            return f"{lib.mkl_get_max_threads()} (mkl_get_max_threads; {env}{by})"
        if name == "openblas":
            return f"{lib.openblas_get_num_threads()} (openblas_get_num_threads)"
        if name == "blis":
            set_vars = [f"{v}={os.environ[v]}" for v in _BLIS_THREAD_VARS if os.environ.get(v)]
            return f"{os.environ.get('BLIS_NUM_THREADS', '1')} ({', '.join(set_vars) or 'BLIS default'}{by})"
    except AttributeError:
        pass
    return "unknown"


def _identify(lib: ctypes.CDLL, path: str) -> str | None:
    if hasattr(lib, "bli_info_get_version_str"):
        return "blis"
    if hasattr(lib, "mkl_get_version_string"):
        return "mkl"
    if hasattr(lib, "openblas_get_config"):
        return "openblas"
    return None


def _load(path: str, name: str | None) -> tuple[ctypes.CDLL | None, str, list[str]]:
    """dlopen ``path`` globally, tuning it before (environment) and after (BLIS's thresholds) loading."""
    notes = _mkl_threads_env() if name == "mkl" or (name is None and "mkl" in Path(path).name) else []
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return None, str(e), []
    name = _identify(lib, path)
    if name == "blis":
        version, blis_notes = _tune_blis(lib)
        notes = blis_notes
    elif name == "mkl":
        version = _describe_mkl(lib)
    elif name == "openblas":
        lib.openblas_get_config.restype = ctypes.c_char_p
        version = lib.openblas_get_config().decode(errors="replace")
    else:
        version = ""
    info.update(name=name, version=version, lib=lib)
    return lib, version, notes


def preload() -> tuple[str | None, str]:
    global status
    setting = os.environ.get(ENV, "").strip()
    if status[1] != "not attempted":  # once per process: what was loaded (or not) stays
        return status
    info.clear()
    vendor, vendor_source = cpu_vendor()
    info.update(vendor=vendor, vendor_source=vendor_source, setting=setting)
    if sys.platform == "darwin":
        status = (None, "macOS: MLX uses Accelerate")
        return status
    if setting.lower() in ("0", "off", "false", "no", "none"):
        status = (None, f"disabled by {ENV}")
        return status
    if "mlx.core" in sys.modules:
        status = (None, "mlx.core was imported before mlx_blip2; import mlx_blip2 first to use an optimised BLAS")
        return status
    if setting.lower() in LIBRARIES:  # a name: that library, wherever it is
        choice = setting.lower()
        path = locate(choice)
        if path is None:
            status = (None, f"{ENV}={setting} could not be loaded (not found; {INSTALL_HINT[choice]})")
            return status
        candidates = iter([(choice, path, f"{ENV}={setting}")])
    elif setting:  # a path or a soname
        candidates = iter([(None, setting, f"{ENV}={setting}")])
    else:  # the vendor's preferred library, located lazily (each miss costs a linker-cache lookup), then the next
        candidates = ((name, path, choose(vendor, {name: path})[1])
                      for name in PREFERENCE.get(vendor, PREFERENCE["other"]) if (path := locate(name)))
    errors = []
    for choice, path, why in candidates:
        lib, version, notes = _load(path, choice)
        if lib is None:
            errors.append(f"{path}: {version}")
            continue
        info["why"] = why + (f" (failed to load: {'; '.join(errors)})" if errors else "")
        info["path"] = path
        status = (path, "loaded before mlx.core" + (f"; {', '.join([version, *notes])}" if version else ""))
        return status
    if setting:
        status = (None, f"{ENV}={setting} could not be loaded")
    elif errors:
        status = (None, "no optimised BLAS could be loaded: " + "; ".join(errors))
    else:
        status = (None, choose(vendor, {})[1])
        info["why"] = status[1]
    return status


# ----------------------------------------------------------------------------------------------------------------
# Reporting and measuring


SHAPES = (  # (label, rows, depth, columns): the ViT-g's fc1, a Q-Former product, a decoded token through OPT-2.7b's fc1
    ("257x1408x6144 GEMM", 257, 1408, 6144),
    ("32x768x3072 GEMM", 32, 768, 3072),
    ("one-row 2560x10240", 1, 2560, 10240),
)


def measure(repeat: int = 5) -> list[tuple[str, float, str]]:
    """Speed of float32 products through MLX (so through the loaded BLAS): (label, value, unit) per SHAPES entry;
    GFLOP/s for GEMMs, GB/s of weight read for one-row products."""
    import mlx.core as mx

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeat):
            tic = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tic)
        return min(times)

    out = []
    with mx.stream(mx.cpu):
        for label, m, k, n in SHAPES:
            x, w = mx.full((m, k), 0.5), mx.full((n, k), 0.25)
            mx.eval(x, w)
            seconds = best(lambda x=x, w=w: mx.eval(x @ w.T))
            if m == 1:
                out.append((label, w.nbytes / seconds / 1e9, "GB/s"))
            else:
                out.append((label, 2 * m * k * n / seconds / 1e9, "GFLOP/s"))
    return out


def report(measure_speed: bool = True) -> list[str]:
    """Lines for ``mlx-blip2 doctor``: the library, why it was chosen, its threads and version, and its speed."""
    library, reason = status
    if sys.platform == "darwin":
        return [f"BLAS: Accelerate ({reason})"]
    lines = [f"BLAS: {library or 'reference (slow)'} ({reason})"]
    vendor, source = info.get("vendor"), info.get("vendor_source")
    if vendor is None:
        vendor, source = cpu_vendor()
    lines.append(f"CPU: {cpu_model()}; vendor {vendor} ({source}); {os.cpu_count()} logical CPUs, "
                 f"{physical_cores()} physical cores")
    found = available()
    lines.append("BLAS libraries found: " + (", ".join(f"{LABELS[n]} {p}" for n, p in found.items()) or "none"))
    if library is not None:
        name = info.get("name")
        lines.append(f"BLAS choice: {LABELS.get(name, name or 'unknown library')} — {info.get('why', '')}")
        lines.append(f"BLAS version: {info.get('version') or 'unknown'}; threads: {_threads(name, info.get('lib'))}")
        if measure_speed:
            try:
                speeds = ", ".join(f"{label} {value:.1f} {unit}" for label, value, unit in measure())
                lines.append(f"BLAS speed (measured now, float32 through MLX): {speeds}")
            except Exception as e:  # a report must not fail
                lines.append(f"BLAS speed: not measured ({e})")
    elif "why" in info:
        lines.append(f"BLAS choice: none — {info['why']}")
    lines.append("Compare the libraries found on this machine: python -m mlx_blip2._blas --compare")
    return lines


_COMPARE = """
import mlx_blip2, mlx_blip2._blas as b
print(repr((b.status, b.info.get('name'), b.measure())))
"""


def compare(rounds: int = 3) -> dict[str, list[tuple[str, float, str]]]:
    """Every library found, measured in its own process, interleaved round by round; the best of each figure."""
    import subprocess

    best: dict[str, list[tuple[str, float, str]]] = {}
    for _ in range(rounds):
        for name in available():
            env = {**os.environ, ENV: name}
            out = subprocess.run([sys.executable, "-c", _COMPARE], env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                continue
            figures = eval(out.stdout.strip().splitlines()[-1])[2]
            previous = best.get(name, figures)
            best[name] = [max(a, b, key=lambda f: f[1]) for a, b in zip(previous, figures)]
    return best


def main(argv: list[str] | None = None) -> int:
    """``python -m mlx_blip2._blas [--compare]``: the report, and optionally every library found, timed."""
    argv = sys.argv[1:] if argv is None else argv
    from mlx_blip2 import _blas  # the package's instance (under -m this file also runs as __main__), preloaded

    for line in _blas.report():
        print(line)
    if "--compare" in argv:
        vendor = _blas.info.get("vendor") or cpu_vendor()[0]
        print(f"Each library in its own process, best of 3 interleaved rounds ({vendor} processor):")
        for name, figures in _blas.compare().items():
            print(f"  {LABELS[name]:9s}" + "   ".join(f"{label} {value:6.1f} {unit}" for label, value, unit in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
