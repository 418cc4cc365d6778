import sys
from pathlib import Path

import mlx_blip2  # noqa: F401  (first, so that the optimised BLAS is loaded before mlx.core)
import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
REFERENCE = FIXTURES / "reference"
sys.path.insert(0, str(TESTS))

OPT_CHECKPOINTS = ["tiny-blip2-opt", "tiny-blip2-opt-legacy"]


def rel_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="session")
def checkpoint_dir():
    return lambda name: FIXTURES / name


@pytest.fixture(scope="session")
def reference():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = dict(np.load(REFERENCE / f"{name}.npz"))
        return cache[name]

    return get
