"""How long ``mlx-blip2 --help`` and each subcommand's ``--help`` take, and what they import.

    python benchmarks/cli_startup.py [--runs 7]

Each command runs in a fresh interpreter ``--runs`` times; the table gives the fastest and the median wall time, the
modules imported (beyond a bare ``python -c pass``) and whether MLX, the web stack, PIL/numpy or torch were among
them. The first row is the interpreter alone, for scale (the machine's load shows there too). The goal: 0.25 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PROBE = ("import sys, io, contextlib\nbefore = set(sys.modules)\nfrom mlx_blip2.cli import main\n"
         "try:\n    with contextlib.redirect_stdout(io.StringIO()):\n        main(sys.argv[1:])\n"
         "except SystemExit:\n    pass\nimport json\nprint(json.dumps(sorted(set(sys.modules) - before)))")
WATCH = {"mlx": "mlx.core", "web": "fastapi", "PIL": "PIL.Image", "numpy": "numpy", "torch": "torch"}


def timed(argv: list[str], runs: int) -> tuple[list[float], list[str]]:
    times, modules = [], []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {out.stderr.strip()[-300:]}")
        if out.stdout.strip().startswith("["):
            modules = json.loads(out.stdout.strip().splitlines()[-1])
    return times, modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    from mlx_blip2.cli import COMMANDS

    rows = [("python -c pass", [sys.executable, "-c", "pass"])]
    rows.append(("mlx-blip2 --help", [sys.executable, "-c", PROBE, "--help"]))
    rows += [(f"mlx-blip2 {name} --help", [sys.executable, "-c", PROBE, name, "--help"]) for name in COMMANDS]
    print(f"{'command':32} {'best s':>7} {'median s':>9} {'modules':>8}  heavy imports")
    for label, argv in rows:
        times, modules = timed(argv, args.runs)
        heavy = [name for name, module in WATCH.items() if module in modules]
        print(f"{label:32} {min(times):7.3f} {statistics.median(times):9.3f} {len(modules):8d}  "
              f"{', '.join(heavy) or '-'}")


if __name__ == "__main__":
    main()
