"""Captioning under mlx.launch (several ranks, one output), part files, manifests and Parquet shards."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

from mlx_blip2.cli import main
from mlx_blip2.library import RecordWriter, caption_paths, part_path, read_manifest
from mlx_blip2.library.parts import leftover_parts, read_part

TINY = FIXTURES / "tiny-blip2-opt"
GEN = ["--max-new-tokens", "4", "--num-beams", "1"]
LAUNCH = Path(sys.executable).parent / "mlx.launch"
needs_launch = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed")


def make_library(root: Path, n: int, bad: int = 0) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        path = root / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    for i in range(bad):
        (root / f"bad{i}.jpg").write_bytes(b"" if i % 2 else b"not a jpeg")
    return paths


def read_jsonl(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "no broken last line"
    return [json.loads(line) for line in data.split(b"\n") if line]


def outcome(records: list[dict]) -> dict:
    """path -> caption or error kind: what must not depend on the number of ranks."""
    return {r["path"]: r.get("caption", "error" if r.get("error") else None) for r in records}


def launch(n: int, *args, timeout=240, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    """``mlx.launch -n N -- python -m mlx_blip2 caption ...`` on loopback, on a port no other run uses."""
    port = str(random.randrange(20000, 60000, 16))
    cmd = [str(LAUNCH), "-n", str(n), "--starting-port", port, "--", sys.executable, "-m", "mlx_blip2", "caption",
           *map(str, args), "--model", str(TINY)]
    if not kwargs.pop("verbose", False):
        cmd.append("--quiet")
    if kwargs.pop("background", False):
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """12 images and 3 bad files, with the single-process outcome to compare with."""
    root = tmp_path_factory.mktemp("dist")
    make_library(root / "lib", 12, bad=3)
    one = root / "one.jsonl"
    assert main(["caption", str(root / "lib"), "-o", str(one), "--model", str(TINY), *GEN, "-q"]) == 1
    return root, outcome(read_jsonl(one))


# --- under mlx.launch ----------------------------------------------------------------------------------------------


@needs_launch
def test_two_ranks_give_the_records_of_one_process(library):
    root, expected = library
    out = root / "two.jsonl"
    proc = launch(2, root / "lib", "-o", out, *GEN, verbose=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log  # mlx.launch exits 0 whatever the ranks do
    records = read_jsonl(out)
    assert len(records) == 15 and outcome(records) == expected
    assert "captioned 12, skipped 0, failed 3 of 15 images" in log  # rank 0's summary of the whole job
    for i in range(3):
        assert f"failed: {root / 'lib'}/bad{i}.jpg" in log or f"bad{i}.jpg" in log
    assert not leftover_parts(out)
    # Rerun: nothing left to do but the bad files (retried, as in one process).
    proc = launch(2, root / "lib", "-o", out, *GEN, verbose=True)
    assert "captioned 0, skipped 12, failed 3 of 15 images" in proc.stdout + proc.stderr
    assert outcome(read_jsonl(out)) == expected and len(read_jsonl(out)) == 15


@needs_launch
def test_each_rank_writes_the_sidecars_of_its_images(library):
    root, expected = library
    lib = root / "side"
    make_library(lib, 12)
    proc = launch(2, lib, "--format", "txt", *GEN)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for image in sorted(lib.glob("*.png")):
        caption = image.with_suffix(".txt").read_text().strip()
        assert caption == expected[str(root / "lib" / image.name)]


@needs_launch
def test_killed_launch_resumes_with_another_number_of_ranks(tmp_path):
    lib = tmp_path / "lib"
    make_library(lib, 40, bad=1)
    out = tmp_path / "c.jsonl"
    proc = launch(2, lib, "-o", out, "--batch-size", "1", "--max-new-tokens", "30", background=True)
    deadline = time.time() + 120
    parts = [part_path(out, r) for r in range(2)]
    while time.time() < deadline and proc.poll() is None:
        if sum(Path(p).read_bytes().count(b"\n") for p in parts if os.path.exists(p)) >= 4:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, mid-run
    proc.wait()
    assert leftover_parts(out), "the kill left part files"
    with open(parts[0], "ab") as f:  # and, to be sure, a torn last line
        f.write(b'{"path": "' + str(lib / "img039.png").encode() + b'", "capt')
    proc = launch(3, lib, "-o", out, *GEN, verbose=True)
    log = proc.stdout + proc.stderr
    assert "merged" in log and "failed 1 of 41 images" in log, log
    records = read_jsonl(out)
    paths = [r["path"] for r in records]
    assert sorted(paths) == sorted(str(p) for p in lib.iterdir())  # each image exactly once
    assert sum("caption" in r for r in records) == 40 and not leftover_parts(out)


@needs_launch
def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    make_library(tmp_path / "lib", 2)
    out = tmp_path / "c.jsonl"
    held = RecordWriter("jsonl", path=out)  # another run holds the output
    try:
        proc = launch(2, tmp_path / "lib", "-o", out, *GEN)
    finally:
        held.close()
    assert "another run is writing" in proc.stdout + proc.stderr
    assert out.read_bytes() == b"" and not leftover_parts(out)


@needs_launch
def test_manifest_to_parquet_shards_under_launch(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    paths = make_library(tmp_path / "lib", 7)
    manifest = tmp_path / "paths.txt"
    manifest.write_text("\n".join(f"lib/{p.name}" for p in paths) + "\nlib/missing.png\n")
    shards = tmp_path / "shards"
    proc = launch(2, "--manifest", manifest, "--format", "parquet", "-o", shards, "--shard-size", "3", *GEN)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in shards.iterdir()) == sorted(n for k in range(3)
                                                              for n in (f"{k:05d}.parquet", f"_{k:05d}_stats.json"))
    rows = [r for k in range(3) for r in pq.read_table(shards / f"{k:05d}.parquet").to_pylist()]
    assert [r["path"] for r in rows] == [str(p) for p in paths] + [str(tmp_path / "lib" / "missing.png")]
    assert all(r["caption"] for r in rows[:7]) and rows[7]["error"] and rows[7]["caption"] is None
    stamps = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    # A finished shard is never redone (in one process here).
    assert main(["caption", "--manifest", str(manifest), "--format", "parquet", "-o", str(shards), "--shard-size",
                 "3", "--model", str(TINY), *GEN, "-q"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir()} == stamps


# --- in one process ------------------------------------------------------------------------------------------------


def no_model():
    raise AssertionError("nothing needs captioning")


def test_leftover_parts_are_merged_by_a_plain_run(tmp_path):
    paths = make_library(tmp_path / "lib", 4)
    out = tmp_path / "c.jsonl"
    for rank, chunk in enumerate((paths[:2], paths[2:])):
        lines = [json.dumps({"path": str(p), "caption": f"c{p.name}", "model": None, "size": p.stat().st_size,
                             "mtime": p.stat().st_mtime}) for p in chunk]
        Path(part_path(out, rank + 3)).write_text("\n".join(lines) + "\n" + '{"path": "x", "cap')
    assert len(read_part(part_path(out, 3))[0]) == 2
    summary, notes = caption_paths(no_model, [tmp_path / "lib"], output=out)
    assert summary.skipped == 4 and any("merged 4 record(s) from 2 part file(s)" in n for n in notes)
    assert [r["caption"] for r in read_jsonl(out)] == [f"c{p.name}" for p in paths] and not leftover_parts(out)


def test_manifests(tmp_path):
    paths = make_library(tmp_path / "lib", 3)
    (tmp_path / "m.txt").write_text(f"# images\nlib/{paths[0].name}\n\n{paths[1]}\nlib/{paths[0].name}\n")
    assert [f.path for f in read_manifest(tmp_path / "m.txt")] == [str(paths[0]), str(paths[1])]
    (tmp_path / "m.csv").write_text("id,path\n1,lib/img002.png\n2,lib/img000.png\n")
    assert [f.display for f in read_manifest(tmp_path / "m.csv")] == ["lib/img002.png", "lib/img000.png"]
    (tmp_path / "nopath.csv").write_text("file\nx.png\n")
    assert main(["caption", "--manifest", str(tmp_path / "nopath.csv"), "--model", str(TINY)]) == 2
    assert main(["caption", "--model", str(TINY)]) == 2  # neither images nor a manifest
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": [str(paths[2])]}), tmp_path / "m.parquet")
    assert [f.path for f in read_manifest(tmp_path / "m.parquet")] == [str(paths[2])]
    out = tmp_path / "c.jsonl"
    assert main(["caption", "--manifest", str(tmp_path / "m.txt"), "-o", str(out), "--model", str(TINY), *GEN,
                 "-q"]) == 0
    assert [r["path"] for r in read_jsonl(out)] == [str(paths[0]), str(paths[1])]


def test_parquet_shard_is_redone_only_without_its_marker(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    make_library(tmp_path / "lib", 5)
    shards = tmp_path / "shards"
    args = ["caption", str(tmp_path / "lib"), "--format", "parquet", "-o", str(shards), "--shard-size", "2",
            "--model", str(TINY), *GEN, "-q"]
    assert main(args) == 0
    assert [json.loads((shards / f"_{k:05d}_stats.json").read_text())["count"] for k in range(3)] == [2, 2, 1]
    before = pq.read_table(shards / "00001.parquet").to_pylist()
    (shards / "_00001_stats.json").unlink()  # as a kill before the marker leaves it
    stamps = {k: (shards / f"{k:05d}.parquet").stat().st_mtime_ns for k in (0, 2)}
    assert main(args) == 0
    assert {k: (shards / f"{k:05d}.parquet").stat().st_mtime_ns for k in (0, 2)} == stamps
    assert pq.read_table(shards / "00001.parquet").to_pylist() == before
    assert main(args[:2] + ["--format", "parquet", "--model", str(TINY)]) == 2  # no folder given


@needs_launch
def test_index_under_launch_holds_every_image(tmp_path):
    from mlx_blip2.photo_index import PhotoIndex

    paths = make_library(tmp_path / "lib", 9, bad=1)
    db = tmp_path / "idx.sqlite"
    itm = FIXTURES / "tiny-blip2-itm"
    port = str(random.randrange(20000, 60000, 16))
    cmd = [str(LAUNCH), "-n", "2", "--starting-port", port, "--", sys.executable, "-m", "mlx_blip2", "index",
           str(tmp_path / "lib"), "--db", str(db), "--model", str(itm)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=240)
    log = proc.stdout + proc.stderr
    assert "9 images searchable" in log and "unreadable: " in log and "bad0.jpg" in log, log
    one = tmp_path / "one.sqlite"
    assert main(["index", str(tmp_path / "lib"), "--db", str(one), "--model", str(itm)]) == 1
    with PhotoIndex(db, create=False) as a, PhotoIndex(one, create=False) as b:
        assert a.files().keys() == b.files().keys() and a.count() == 9
        for p in paths:
            np.testing.assert_allclose(a.embedding(str(p)), b.embedding(str(p)), atol=2e-3)
    assert not [n for n in os.listdir(tmp_path) if ".part-" in n]
    assert main(["search", "a photo", "--db", str(db), "--model", str(itm), "-k", "20", "--json"]) == 0


def test_launch_lock_and_part_files(tmp_path):
    from mlx_blip2.library.launch import leftover_parts as parts_of, open_lock_file
    from mlx_blip2.library.launch import part_path as part_of
    from mlx_blip2.photo_index.distributed import leftover_indexes, part_index

    db = tmp_path / "idx.sqlite"
    first = open_lock_file(db, RuntimeError("busy"))
    with pytest.raises(RuntimeError, match="busy"):  # a second run on the same output
        open_lock_file(db, RuntimeError("busy"))
    first.close()
    open_lock_file(db, RuntimeError("busy")).close()  # free again once the first run ends
    for rank in (10, 2):
        Path(part_of(db, rank, ".sqlite")).touch()
        Path(part_path(tmp_path / "c.jsonl", rank)).touch()
    assert leftover_indexes(str(db)) == [part_index(str(db), 2), part_index(str(db), 10)]  # by rank, not by name
    assert leftover_parts(tmp_path / "c.jsonl") == parts_of(tmp_path / "c.jsonl", ".jsonl")
    assert [Path(p).name for p in leftover_parts(tmp_path / "c.jsonl")] == [".c.jsonl.part-2.jsonl",
                                                                            ".c.jsonl.part-10.jsonl"]


def test_caption_job_is_checked_before_anything_is_read(tmp_path):
    from mlx_blip2.library import CaptionJob, UsageError, caption

    job = CaptionJob([tmp_path / "nothing-here"], output=tmp_path / "c.csv", generate_kwargs={"num_beams": 1})
    assert job.output_format() == "csv" and job.inputs == (tmp_path / "nothing-here",)
    with pytest.raises(TypeError):
        job.generate_kwargs["num_beams"] = 2  # a job is built once and only read below the command line
    for bad, message in ((dict(format="xmp", output=tmp_path / "c.jsonl"), "--output is for jsonl and csv"),
                         (dict(format="parquet"), "give it with -o"), (dict(batch_size=0), "--batch-size"),
                         (dict(xmp_name="x.xmp"), "--xmp-name")):
        with pytest.raises(UsageError, match=message):
            caption(no_model, CaptionJob([tmp_path / "nothing-here"], **bad), group=None)
