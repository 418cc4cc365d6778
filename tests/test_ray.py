"""mlx_blip2.ray: the Ray Data adapters called directly (on a local Ray, and the Parquet that Ray writes from them:
test_parquet_readers.py)."""

import subprocess
import sys

import numpy as np
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
    import pyarrow as pa

    from mlx_blip2.ray import Captioner, ImageEmbedder

    paths, bad = pictures(tmp_path)
    cap = Captioner(str(TINY), column="path", **FAST)
    out = cap({"path": np.array(paths + [bad], dtype=object), "id": np.arange(4)})
    assert list(out["id"]) == [0, 1, 2, 3] and out["error"][3].as_py() and out["caption"][3].as_py() is None
    expected = load(TINY).caption(paths, **FAST)
    assert out["caption"].to_pylist()[:3] == expected and out["error"].to_pylist()[:3] == [None] * 3
    arrays = np.stack([np.asarray(Image.open(p)) for p in paths])  # as ray.data.read_images gives them
    good = Captioner(str(TINY), **FAST)({"image": arrays})
    assert good["caption"].to_pylist() == expected and good["error"].type == pa.string()  # typed though all null

    embedder = ImageEmbedder(str(ITM), column="path")
    emb = embedder({"path": np.array([paths[0], bad], dtype=object)})
    config = load(ITM).model.config
    assert embedder.schema.field("embedding").type == emb["embedding"].type == \
        pa.list_(pa.list_(pa.float32(), config.image_text_hidden_size), config.num_query_tokens)
    np.testing.assert_allclose(np.array(emb["embedding"][0].as_py()), load(ITM).embed_images([paths[0]])[0],
                               atol=1e-5)
    assert emb["embedding"][1].as_py() is None and emb["error"][1].as_py()
    pooled = ImageEmbedder(str(ITM), column="path", pooled=True)({"path": np.array(paths[:1], dtype=object)})
    assert pooled["embedding"].type == pa.list_(pa.float32(), config.image_text_hidden_size)
    assert abs(np.linalg.norm(pooled["embedding"][0].as_py()) - 1) < 1e-5
