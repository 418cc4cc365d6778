"""mlx_blip2.ray: the Ray Data adapters, called directly and on a local Ray (ray.init(num_cpus=2))."""

import importlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

from mlx_blip2.pipelines import load

TINY = FIXTURES / "tiny-blip2-opt"
ITM = FIXTURES / "tiny-blip2-itm"
FAST = {"max_new_tokens": 4, "num_beams": 1}


def pictures(tmp_path, n=3):
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        paths.append(str(tmp_path / f"p{i}.png"))
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(paths[-1])
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    return paths, str(tmp_path / "bad.jpg")


def test_module_imports_without_ray():
    code = "import sys; sys.modules['ray'] = None; import mlx_blip2.ray as r; print(r.Captioner.__name__)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False).stdout.strip() == "Captioner"


def test_captioner_and_embedder_called_directly(tmp_path):
    from mlx_blip2.ray import Captioner, ImageEmbedder

    paths, bad = pictures(tmp_path)
    cap = Captioner(str(TINY), column="path", **FAST)
    out = cap({"path": np.array(paths + [bad], dtype=object), "id": np.arange(4)})
    assert list(out["id"]) == [0, 1, 2, 3] and out["error"][3] and out["caption"][3] is None
    expected = load(TINY).caption(paths, **FAST)
    assert list(out["caption"][:3]) == expected and list(out["error"][:3]) == [None] * 3
    arrays = np.stack([np.asarray(Image.open(p)) for p in paths])  # as ray.data.read_images gives them
    assert list(Captioner(str(TINY), **FAST)({"image": arrays})["caption"]) == expected
    emb = ImageEmbedder(str(ITM), column="path")({"path": np.array([paths[0], bad], dtype=object)})
    assert emb["embedding"][0].ndim == 2 and emb["embedding"][1] is None and emb["error"][1]
    pooled = ImageEmbedder(str(ITM), column="path", pooled=True)({"path": np.array(paths[:1], dtype=object)})
    assert pooled["embedding"][0].ndim == 1 and abs(np.linalg.norm(pooled["embedding"][0]) - 1) < 1e-5


def test_map_batches_on_a_local_ray(tmp_path):
    ray = pytest.importorskip("ray")
    importlib.import_module("ray.data")
    from mlx_blip2.ray import Captioner

    paths, bad = pictures(tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_items([{"path": p} for p in paths + [bad]])
        ds = ds.map_batches(Captioner, fn_constructor_kwargs={"model": str(TINY), "column": "path", **FAST},
                            batch_size=2, concurrency=1, num_cpus=1)
        rows = sorted(ds.take_all(), key=lambda r: r["path"])
    finally:
        ray.shutdown()
    assert [r["path"] for r in rows] == sorted(paths + [bad])
    by_path = {r["path"]: r for r in rows}
    assert by_path[bad]["error"] and by_path[bad]["caption"] is None
    assert [by_path[p]["caption"] for p in paths] == load(TINY).caption(paths, **FAST)
