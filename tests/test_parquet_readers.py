"""Every Parquet output folder (the CLI's shards, a launched run's, the Ray adapters') reads whole, with one schema,
through pandas, pyarrow, DuckDB and Ray, each image exactly once, whether or not an image failed."""

import json
import os

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
from conftest import FIXTURES
from test_distributed import GEN, launch, make_library, needs_launch

from mlx_blip2.cli import main
from mlx_blip2.library.parquet import schema as shard_schema
from mlx_blip2.pipelines import load
from mlx_blip2.ray import Captioner, ImageEmbedder

TINY = FIXTURES / "tiny-blip2-opt"
ITM = FIXTURES / "tiny-blip2-itm"
FAST = {"max_new_tokens": 4, "num_beams": 1}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def library(root, broken: bool, n: int = 6) -> list[str]:
    """n tiny pictures, and a broken file sorted first, so that one shard (or batch) fails a row and others do not."""
    paths = [str(p) for p in make_library(root, n)]
    if broken:
        (root / "a_broken.jpg").write_bytes(b"not a jpeg")
        paths.insert(0, str(root / "a_broken.jpg"))
    return paths


def readers(out, expected: pa.Schema) -> dict[str, list[str]]:
    """Each reader's ``path`` column for the whole folder, after checking the types it reports."""
    files = sorted(p for p in os.listdir(out) if p.endswith(".parquet"))
    assert len(files) > 1, "several files, so that their schemas must agree"
    for name in files:
        assert pq.read_schema(os.path.join(out, name)).remove_metadata() == expected, name
    dataset = pads.dataset(str(out))
    assert dataset.schema.remove_metadata() == expected
    frame = pd.read_parquet(out)
    assert list(frame.columns) == expected.names
    glob = os.path.join(str(out), "*.parquet")
    types = dict(duckdb.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet('{glob}'))")
                 .fetchall())
    for field in expected:
        assert types[field.name] == duckdb_type(field.type), field
    ray_ds = ray.data.read_parquet(str(out))
    assert ray_ds.schema().base_schema.remove_metadata() == expected
    return {"pandas": list(frame["path"]),
            "pyarrow": dataset.to_table(columns=["path"])["path"].to_pylist(),
            "duckdb": [r[0] for r in duckdb.sql(f"SELECT path FROM read_parquet('{glob}')").fetchall()],
            "ray": [r["path"] for r in ray_ds.select_columns(["path"]).take_all()]}


def duckdb_type(t: pa.DataType) -> str:
    if pa.types.is_fixed_size_list(t):
        return duckdb_type(t.value_type) + "[]"  # DuckDB reads a Parquet list as a list, whatever its size
    return {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.float64(): "DOUBLE", pa.float32(): "FLOAT"}[t]


def assert_each_once(found: dict[str, list[str]], paths: list[str]) -> None:
    for reader, got in found.items():
        assert sorted(got) == sorted(paths), reader


# --- the CLI and mlx.launch: shards -------------------------------------------------------------------------------


@pytest.mark.parametrize("broken", [False, True])
def test_cli_shards_read_whole(tmp_path, local_ray, broken):
    paths = library(tmp_path / "lib", broken)
    out = tmp_path / "out"
    code = main(["caption", str(tmp_path / "lib"), "--format", "parquet", "-o", str(out), "--shard-size", "5",
                 "--model", str(TINY), *GEN, "-q"])
    assert code == (1 if broken else 0)
    assert sorted(os.listdir(out)) == ["00000.parquet", "00001.parquet", "_00000_stats.json", "_00001_stats.json"]
    assert_each_once(readers(out, shard_schema()), paths)
    rows = {r["path"]: r for r in pd.read_parquet(out).to_dict("records")}
    assert all(rows[p]["caption"] and pd.isna(rows[p]["error"]) for p in paths if "broken" not in p)
    if broken:
        assert "broken" in rows[paths[0]]["error"] and pd.isna(rows[paths[0]]["caption"])


@needs_launch
@pytest.mark.parametrize("broken", [False, True])
def test_launched_shards_read_whole(tmp_path, local_ray, broken):
    paths = library(tmp_path / "lib", broken)
    out = tmp_path / "out"
    proc = launch(2, tmp_path / "lib", "--format", "parquet", "-o", out, "--shard-size", "5", *GEN)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # mlx.launch's own status, whatever rank 0 says
    assert ("failed: " + paths[0] in proc.stdout + proc.stderr) == broken
    assert_each_once(readers(out, shard_schema()), paths)
    assert sorted(n for n in os.listdir(out) if n.endswith(".json")) == ["_00000_stats.json", "_00001_stats.json"]


def test_folder_with_bare_marker_names_resumes(tmp_path, local_ray):
    paths = library(tmp_path / "lib", broken=False)
    out = tmp_path / "out"
    args = ["caption", str(tmp_path / "lib"), "--format", "parquet", "-o", str(out), "--shard-size", "4",
            "--model", str(TINY), *GEN, "-q"]
    assert main(args) == 0
    for k in (0, 1):  # the names markers had before they started with "_"
        os.replace(out / f"_{k:05d}_stats.json", out / f"{k:05d}_stats.json")
    os.unlink(out / "00001_stats.json")  # shard 1 unfinished: redone, shard 0 kept
    (out / ".00001.parquet.99999.tmp").write_bytes(b"PAR1 cut short")  # as a kill mid-write leaves it
    kept = (out / "00000.parquet").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "00000.parquet").stat().st_mtime_ns == kept
    assert sorted(os.listdir(out)) == [".00001.parquet.99999.tmp", "00000.parquet", "00001.parquet",
                                       "_00000_stats.json", "_00001_stats.json"]
    assert json.loads((out / "_00000_stats.json").read_text())["count"] == 4
    assert_each_once(readers(out, shard_schema()), paths)


# --- Ray Data: the adapters' columns, written by Ray --------------------------------------------------------------


def ray_write(paths: list[str], adapter, kwargs: dict, out) -> None:
    """Two paths a block, a batch each, and a Parquet file each: blocks with and without failures side by side."""
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=(len(paths) + 1) // 2)
    ds = ds.map_batches(adapter, fn_constructor_kwargs={"column": "path", **kwargs}, batch_size=2, num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(size=1))
    ds.write_parquet(str(out))


@pytest.mark.parametrize("broken", [False, True])
def test_ray_captions_read_whole(tmp_path, local_ray, broken):
    paths = library(tmp_path / "lib", broken, n=3)
    out = tmp_path / "out"
    ray_write(paths, Captioner, {"model": str(TINY), **FAST}, out)
    expected = pa.schema([("path", pa.string()), ("caption", pa.string()), ("error", pa.string())])
    assert_each_once(readers(out, expected), paths)
    rows = {r["path"]: r for r in pd.read_parquet(out).to_dict("records")}
    good = [p for p in paths if "broken" not in p]
    assert [rows[p]["caption"] for p in good] == load(TINY).caption(good, **FAST)
    if broken:
        assert rows[paths[0]]["error"] and pd.isna(rows[paths[0]]["caption"])


@pytest.mark.parametrize("broken", [False, True])
def test_ray_embeddings_read_whole(tmp_path, local_ray, broken):
    paths = library(tmp_path / "lib", broken, n=3)
    out = tmp_path / "out"
    ray_write(paths, ImageEmbedder, {"model": str(ITM), "pooled": True}, out)
    config = load(ITM).model.config
    embedding = pa.list_(pa.float32(), config.image_text_hidden_size)
    expected = pa.schema([("path", pa.string()), ("embedding", embedding), ("error", pa.string())])
    assert_each_once(readers(out, expected), paths)
    table = pads.dataset(str(out)).to_table()
    rows = dict(zip(table["path"].to_pylist(), table["embedding"].to_pylist()))
    for p in paths:
        if "broken" in p:
            assert rows[p] is None
        else:
            assert abs(np.linalg.norm(rows[p]) - 1) < 1e-5
