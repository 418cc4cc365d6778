"""The photo index and its CLI (``mlx-blip2 index`` / ``search`` / ``duplicates``), end to end on the tiny
retrieval checkpoint, and the store (matrix file, crash safety, compaction, migration) on synthetic embeddings."""

import base64
import io
import json
import os
import sqlite3
import sys

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image
from reference_cases import make_images

from mlx_blip2.cli import main
from mlx_blip2.pipelines.retrieval import Blip2RetrievalPipeline
from mlx_blip2.photo_index import (
    SCHEMA_VERSION,
    PhotoIndex,
    PhotoIndexError,
    half_to_float,
    index_paths,
    itc_scores,
    load_embedder,
    search,
    top_k,
)
from mlx_blip2.photo_index.vectors import HEADER_BYTES
from mlx_blip2.pipelines.retrieval import load_retrieval

TINY = FIXTURES / "tiny-blip2-itm"
QUERY = "a photo of a cat"
UTF8_FS = sys.platform != "win32"


@pytest.fixture(scope="module")
def pipe():
    return load_retrieval(TINY)


@pytest.fixture
def library(tmp_path):
    """A folder with three images, a corrupt .jpg, a text file, a hidden file and a subfolder with one image."""
    lib = tmp_path / "photos"
    (lib / "sub").mkdir(parents=True)
    images = make_images()
    images[0].save(lib / "a.png")
    images[1].save(lib / "b.png")
    images[2].save(lib / "c.jpg", quality=95)
    Image.fromarray(np.asarray(images[0])[::-1].copy()).save(lib / "sub" / "d.png")
    (lib / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (lib / "notes.txt").write_text("not an image")
    images[1].save(lib / ".hidden.png")
    return lib


def rows(db_path):
    with sqlite3.connect(db_path) as c:
        return {os.path.basename(os.fsdecode(p)): (r is not None, err) for p, r, err in
                c.execute("SELECT path, row, error FROM images")}


def run_index(lib, db, *extra):
    return main(["index", str(lib), "--model", str(TINY), "--db", str(db), *extra])


def brute_force(pipe, paths, query):
    """ITC of every path, the slow way: the pipeline's own embeddings."""
    sims = pipe.similarity([str(p) for p in paths], [query])[:, 0]
    return sorted(zip([str(p) for p in paths], sims), key=lambda x: -x[1])


def normalized(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- end to end -----------------------------------------------------------------------------------------------------


def test_index_search_end_to_end(library, tmp_path, capsys, pipe):
    db = tmp_path / "library.sqlite"
    assert run_index(library, db) == 1  # one file is unreadable: exit status 1, the file listed
    out, err = capsys.readouterr()
    assert "3 added" in out and "1 unreadable" in out and "1 non-image" in out
    assert "unreadable:" in err and "bad.jpg" in err
    stored = rows(db)
    assert set(stored) == {"a.png", "b.png", "c.jpg", "bad.jpg"}  # no subfolder, no .txt, no hidden file
    assert stored["a.png"] == (True, None)
    assert stored["bad.jpg"][0] is False and "not an image" in stored["bad.jpg"][1]
    assert (tmp_path / "library.sqlite.vectors").stat().st_size == HEADER_BYTES + 3 * 8 * 16 * 2

    # Recursive: the subfolder's image is added, the rest unchanged (and the bad file not retried, still listed).
    assert run_index(library, db, "--recursive") == 1
    out, err = capsys.readouterr()
    assert "1 added" in out and "4 unchanged" in out and "0 unreadable (1 more unreadable on record)" in out
    assert "still unreadable" in err and "bad.jpg" in err
    assert "d.png" in rows(db)
    (library / "bad.jpg").unlink()
    assert run_index(library, db, "--recursive") == 0  # nothing unreadable left
    capsys.readouterr()

    # search: a table, in the order of a brute-force ITC computation.
    assert main(["search", QUERY, "--db", str(db), "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "path"] and len(lines) == 4
    expected = brute_force(pipe, [library / n for n in ["a.png", "b.png", "c.jpg", "sub/d.png"]], QUERY)
    got = [(line.split()[2], float(line.split()[1])) for line in lines[1:]]
    assert [p for p, _ in got] == [p for p, _ in expected[:3]]
    for (_, a), (_, b) in zip(got, expected):
        assert abs(a - b) < 2e-3  # float16 storage, 4 decimals printed

    # --json, all results: one JSON document.
    assert main(["search", QUERY, "--db", str(db), "-k", "10", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    assert [r["path"] for r in results] == [p for p, _ in expected]
    assert all(abs(r["score"] - s) < 2e-3 and r["score"] == r["itc"] for r, (_, s) in zip(results, expected))


def test_incremental_updates(library, tmp_path, pipe):
    db_path = tmp_path / "library.sqlite"
    with PhotoIndex(db_path) as db:
        report = index_paths(db, [library], model=str(TINY), recursive=True, progress=False)
        assert (report.added, report.updated, report.unchanged, report.removed) == (4, 0, 0, 0)
        assert [os.path.basename(p) for p, _ in report.failed] == ["bad.jpg"]

        def embedding(name):
            return db.embedding(str(library / name)).astype(np.float32)

        before_b = embedding("b.png")
        np.testing.assert_allclose(embedding("a.png"), pipe.embed_images(str(library / "a.png")), atol=2e-3)

        # Nothing changed: nothing re-embedded, and the model is not even loaded.
        def no_model(_):
            raise AssertionError("the model must not be loaded when nothing changed")

        report = index_paths(db, [library], recursive=True, progress=False, embedder_factory=no_model)
        assert (report.added, report.updated, report.unchanged, report.removed) == (0, 0, 5, 0)
        assert [os.path.basename(p) for p, _ in report.still_failed] == ["bad.jpg"]

        # Modified content, a touched file (same bytes, new mtime), a deleted file and a repaired bad file.
        make_images()[2].save(library / "b.png")
        st = os.stat(library / "c.jpg")
        os.utime(library / "c.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        (library / "a.png").unlink()
        make_images()[0].save(library / "bad.jpg", format="JPEG")
        report = index_paths(db, [library], recursive=True, progress=False)
        assert (report.added, report.updated, report.unchanged, report.removed) == (0, 3, 1, 1)
        assert report.failed == [] and report.still_failed == []
        stored = rows(db_path)
        assert set(stored) == {"b.png", "c.jpg", "bad.jpg", "d.png"}
        assert all(ok and err is None for ok, err in stored.values())
        assert not np.allclose(embedding("b.png"), before_b)
        np.testing.assert_allclose(embedding("b.png"), pipe.embed_images(str(library / "b.png")), atol=2e-3)

        # Indexing only the top folder (not recursive) leaves the subfolder's images alone...
        report = index_paths(db, [library], progress=False)
        assert report.removed == 0 and "d.png" in rows(db_path)
        # ...and deleting a whole folder drops its images on a recursive run.
        (library / "sub" / "d.png").unlink()
        (library / "sub").rmdir()
        assert index_paths(db, [library], recursive=True, progress=False).removed == 1

        # Searches see the changes (the cached matrix follows the index).
        results = search(db, QUERY, k=10, pipeline=pipe)
        assert sorted(os.path.basename(r.path) for r in results) == ["b.png", "bad.jpg", "c.jpg"]


def test_moves_and_renames_are_not_re_embedded(library, tmp_path):
    db_path = tmp_path / "library.sqlite"
    with PhotoIndex(db_path) as db:
        index_paths(db, [library], model=str(TINY), recursive=True, progress=False)
        before = db.embedding(str(library / "a.png"))
        os.rename(library / "a.png", library / "sub" / "renamed.png")

        def no_model(_):
            raise AssertionError("a moved file must not be re-embedded")

        report = index_paths(db, [library], recursive=True, progress=False, embedder_factory=no_model)
        assert (report.moved, report.added, report.removed, report.unchanged) == (1, 0, 0, 4)
        assert db.embedding(str(library / "a.png")) is None
        np.testing.assert_array_equal(db.embedding(str(library / "sub" / "renamed.png")), before)
        # A copy (the original still there) is a new image; a changed file that moved is re-embedded.
        (library / "copy.png").write_bytes((library / "sub" / "renamed.png").read_bytes())
        report = index_paths(db, [library], recursive=True, progress=False)
        assert (report.moved, report.added) == (0, 1)


def test_the_library_roots_are_recorded(library, tmp_path):
    # The search page serves only files below these folders.
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.png").write_bytes((library / "b.png").read_bytes())
    with PhotoIndex(tmp_path / "library.sqlite") as db:
        index_paths(db, [library], model=str(TINY), recursive=True, progress=False)
        assert json.loads(db.get_meta("roots")) == [str(library)]
        index_paths(db, [other / "x.png"], progress=False)
        assert json.loads(db.get_meta("roots")) == sorted([str(library), str(other)])


@pytest.mark.skipif(not UTF8_FS, reason="needs a file system that takes any bytes in names")
def test_names_that_are_not_utf8_round_trip(tmp_path, capsys):
    """Bug: 'utf-8' codec can't encode character '\\udce9' ... surrogates not allowed, on every rerun."""
    lib = tmp_path / "photos"
    lib.mkdir()
    raw = os.path.join(os.fsencode(lib), b"caf\xe9.png")
    make_images()[0].save(os.fsdecode(raw), format="PNG")
    with open(os.path.join(os.fsencode(lib), b"\xff.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    db = tmp_path / "library.sqlite"
    assert run_index(lib, db) == 1  # the broken one is listed; the run does not stop
    out, err = capsys.readouterr()
    assert "1 added" in out and "1 unreadable" in out and "\ufffd.jpg" in err
    with sqlite3.connect(db) as c:
        assert {bytes(p) for (p,) in c.execute("SELECT path FROM images")} == {
            raw, os.path.join(os.fsencode(lib), b"\xff.jpg")}
    assert run_index(lib, db) == 1  # rerun: unchanged, not re-embedded
    assert "0 added" in capsys.readouterr().out
    assert main(["search", QUERY, "--db", str(db), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["path"].endswith("caf\ufffd.png") and base64.b64decode(result["path_b64"]) == raw
    assert main(["search", QUERY, "--db", str(db)]) == 0
    assert "caf\ufffd.png" in capsys.readouterr().out
    with PhotoIndex(db) as index:
        assert os.fsdecode(raw) in index.files()


def test_heic_and_avif_are_images(tmp_path, capsys):
    """Bug: index had its own extension list and counted HEIC/HEIF/AVIF photos as non-images."""
    from mlx_blip2.images import AVIF_SUPPORTED, HEIF_SUPPORTED

    lib = tmp_path / "photos"
    lib.mkdir()
    image = make_images()[2]
    expected = set()
    if HEIF_SUPPORTED:
        image.save(lib / "iphone.heic", format="HEIF")
        expected.add("iphone.heic")
    else:
        (lib / "iphone.heic").write_bytes(b"heic data this Pillow cannot read")
    if AVIF_SUPPORTED:
        image.save(lib / "photo.avif", format="AVIF")
        expected.add("photo.avif")
    else:
        (lib / "photo.avif").write_bytes(b"avif data this Pillow cannot read")
    db = tmp_path / "library.sqlite"
    rc = run_index(lib, db)
    out = capsys.readouterr().out
    assert "0 non-image files ignored" in out
    stored = rows(db)
    assert set(stored) == {"iphone.heic", "photo.avif"}  # both considered, never ignored
    assert {name for name, (ok, _) in stored.items() if ok} == expected
    assert rc == (0 if len(expected) == 2 else 1)


def test_search_rerank(library, tmp_path, capsys, pipe):
    db = tmp_path / "library.sqlite"
    assert run_index(library, db, "-r") == 1
    capsys.readouterr()
    assert main(["search", QUERY, "--db", str(db), "-k", "2", "--rerank", "--candidates", "4", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2
    assert results[0]["score"] >= results[1]["score"]
    ids, mask = pipe._text_ids([QUERY])
    for r in results:
        logits = np.array(pipe.model.itm_logits(pipe.image_features([r["path"]]), ids, mask))[0]
        assert abs(r["itm_logit"] - logits[1]) < 1e-4
        assert abs(r["score"] - (r["itm_logit"] + r["itc"])) < 1e-5
        assert 0 < r["itm"] < 1
    # The re-ranked order is the order of ITM + ITC over all four candidates.
    paths = [str(library / n) for n in ["a.png", "b.png", "c.jpg", "sub/d.png"]]
    with PhotoIndex(db) as index:
        itc = {r.path: r.itc for r in top_k(index, pipe.embed_texts(QUERY), 4)}
    ranked = pipe.rerank(QUERY, paths, [itc[p] for p in paths])
    assert [r["path"] for r in results] == [paths[x.index] for x in ranked[:2]]
    # Table output has the extra columns.
    assert main(["search", QUERY, "--db", str(db), "-k", "1", "--rerank"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["rank", "score", "itc", "itm", "path"]


def test_search_queries_from_stdin(library, tmp_path, capsys, monkeypatch):
    """Bug: stdin mode printed results that did not say which query they answer; --json gave several arrays."""
    db = tmp_path / "library.sqlite"
    run_index(library, db)
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUERY}\n\ntwo dogs\n"))
    assert main(["search", "--db", str(db), "-k", "1", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    answers = [json.loads(line) for line in lines]  # JSON Lines: one object per line
    assert [a["query"] for a in answers] == [QUERY, "two dogs"]
    assert all(len(a["results"]) == 1 and a["results"][0]["rank"] == 1 for a in answers)
    # Text mode: each table says which query it answers.
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUERY}\ntwo dogs\n"))
    assert main(["search", "--db", str(db), "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("query: ") == 2 and out.index(f"query: {QUERY}") < out.index("query: two dogs")
    assert out.count("rank") == 2


# --- errors ---------------------------------------------------------------------------------------------------------


def test_cli_errors(library, tmp_path, capsys):
    db = tmp_path / "library.sqlite"
    assert main(["search", QUERY, "--db", str(db)]) == 2
    assert "no photo index" in capsys.readouterr().err
    assert not db.exists()  # search never creates a database
    assert main(["index", str(tmp_path / "nope"), "--model", str(TINY), "--db", str(db)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert run_index(library, db) == 1
    capsys.readouterr()
    # Embeddings of two models never mix.
    (library / "new.png").write_bytes((library / "a.png").read_bytes() + b"\0")
    rc = main(["index", str(library), "--model", str(FIXTURES / "tiny-blip2-itm-legacy"), "--db", str(db)])
    assert rc == 2 and "holds embeddings from" in capsys.readouterr().err
    not_a_db = tmp_path / "notes.sqlite"
    not_a_db.write_text("hello " * 1000)
    assert main(["search", QUERY, "--db", str(not_a_db)]) == 2
    assert "not a usable photo index" in capsys.readouterr().err
    assert main(["search", "  ", "--db", str(db)]) == 2
    assert main(["search", QUERY, "--db", str(db), "-k", "0"]) == 2


def test_wrong_checkpoint_kind(library, tmp_path, capsys):
    """Bug: a captioning checkpoint gave 'weights missing for Blip2VisionModelWithProjection'."""
    db = tmp_path / "library.sqlite"
    captioning = str(FIXTURES / "tiny-blip2-opt")
    assert main(["index", str(library), "--model", captioning, "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert "'index' needs a retrieval checkpoint" in err and "captioning checkpoint" in err
    assert "weights missing" not in err and not db.exists()  # checked before the database or any weight
    run_index(library, db)
    capsys.readouterr()
    assert main(["search", QUERY, "--db", str(db), "--model", captioning]) == 2
    assert "'search' needs a retrieval checkpoint" in capsys.readouterr().err


def test_empty_index_search(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    db = tmp_path / "library.sqlite"
    assert main(["index", str(tmp_path / "empty"), "--model", str(TINY), "--db", str(db)]) == 0
    capsys.readouterr()
    assert main(["search", QUERY, "--db", str(db), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [] and "no searchable images" in captured.err
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    assert main(["search", "--db", str(db), "--json"]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == [
        {"query": "one", "results": []}, {"query": "two", "results": []}]


def test_a_killed_run_keeps_finished_batches(library, tmp_path):
    """One transaction per batch: a crash in the middle keeps the batches before it, and a rerun finishes."""
    db_path = tmp_path / "library.sqlite"

    class Crashing(Blip2RetrievalPipeline):
        calls = 0

        def embed_images(self, images, preprocessed=False):
            Crashing.calls += 1
            if Crashing.calls == 2:
                raise KeyboardInterrupt
            return super().embed_images(images, preprocessed)

    def crashing(model):
        engine = load_embedder(model)
        return Crashing(engine.model, engine.processor)

    with PhotoIndex(db_path) as db, pytest.raises(KeyboardInterrupt):
        index_paths(db, [library], model=str(TINY), batch_size=1, progress=False, embedder_factory=crashing)
    with sqlite3.connect(db_path) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        done = c.execute("SELECT COUNT(*) FROM images WHERE row IS NOT NULL").fetchone()[0]
    assert done == 1
    with PhotoIndex(db_path) as db:
        report = index_paths(db, [library], progress=False)  # the model comes from the index
        assert (report.unchanged, report.added, len(report.failed)) == (1, 2, 1)
        assert db.count() == 3


# --- the store on its own -------------------------------------------------------------------------------------------


def fill(db, embeds, start=0):
    db.write_batch([(f"/p/{start + i:04d}.jpg", i, i, e) for i, e in enumerate(embeds)])


def ranking(embeds, text):
    stored = embeds.astype(np.float16).astype(np.float32)
    scores = (stored @ text).max(axis=1)
    return np.argsort(-scores, kind="stable"), scores


def test_vectorised_top_k_equals_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    n, q, d = 300, 4, 8
    embeds = normalized(rng, (n, q, d))
    embeds[7] = embeds[3]  # a tie: broken by index order
    with PhotoIndex(tmp_path / "x.sqlite") as db:
        db.bind_model("synthetic", q, d)
        fill(db, embeds[:100])
        fill(db, embeds[100:], start=100)
        text = normalized(rng, (d,))
        order, scores = ranking(embeds, text)
        assert [r.path for r in top_k(db, text, n)] == [f"/p/{i:04d}.jpg" for i in order]
        assert [r.path for r in top_k(db, text, 5)] == [f"/p/{i:04d}.jpg" for i in order[:5]]
        np.testing.assert_array_equal([r.score for r in top_k(db, text, 5)], scores[order[:5]])
        tie = [r.path for r in top_k(db, embeds[3, 0], n)]
        assert tie.index("/p/0003.jpg") + 1 == tie.index("/p/0007.jpg")
        # The cached matrix is reused until a write, then refreshed.
        m = db.matrix()
        assert db.matrix() is m
        db.write_batch([], removed=["/p/0000.jpg"])
        assert db.matrix() is not m and db.matrix().count == n - 1
        assert "/p/0000.jpg" not in [r.path for r in top_k(db, text, n)]
        with pytest.raises(PhotoIndexError, match="dims"):
            top_k(db, np.ones(d + 1, np.float32), 3)
        with pytest.raises(PhotoIndexError, match="holds embeddings from synthetic"):
            db.bind_model("other", q, d)


def test_chunked_threaded_scores_are_exact():
    """The chunked float16 scoring gives bit for bit what a float32 copy of the matrix gives (max over tokens)."""
    rng = np.random.default_rng(1)
    for n, d in [(1001, 16), (300, 256)]:
        embeds = normalized(rng, (n, 32, d)).astype(np.float16)
        text = normalized(rng, (d,))
        embeds[5, 3, :4] = [6e-8, -6e-8, 3e-5, -1e-5]  # float16 subnormals
        reference = (embeds.astype(np.float32).reshape(-1, d) @ text).reshape(n, 32).max(axis=1)
        for threads in (1, 2, 3):
            np.testing.assert_array_equal(itc_scores(embeds, text, threads=threads), reference)


def test_torn_tail_and_uncommitted_rows_are_ignored(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    q, d = 4, 8
    embeds = normalized(rng, (20, q, d))
    text = normalized(rng, (d,))
    path = tmp_path / "x.sqlite"
    with PhotoIndex(path) as db:
        db.bind_model("synthetic", q, d)
        fill(db, embeds[:10])
        vectors = db.vectors_path()
    with open(vectors, "ab") as f:
        f.write(b"\x7f" * 100)  # a torn half row, as a crash in the middle of a write leaves it

    # A crash after the rows were written but before the transaction that names them committed.
    def crash(self):
        raise KeyboardInterrupt

    with PhotoIndex(path) as db:
        monkeypatch.setattr(PhotoIndex, "commit", crash)
        with pytest.raises(KeyboardInterrupt):
            fill(db, embeds[10:15], start=10)
        monkeypatch.undo()
    assert vectors.stat().st_size > HEADER_BYTES + 10 * q * d * 2
    with PhotoIndex(path) as db:
        order, _ = ranking(embeds[:10], text)
        assert [r.path for r in top_k(db, text, 20)] == [f"/p/{i:04d}.jpg" for i in order]
        fill(db, embeds[10:], start=10)  # the next writer overwrites the unreferenced tail
        assert vectors.stat().st_size == HEADER_BYTES + 20 * q * d * 2
        order, _ = ranking(embeds, text)
        assert [r.path for r in top_k(db, text, 20)] == [f"/p/{i:04d}.jpg" for i in order]


def test_compaction_keeps_the_ranking(tmp_path):
    rng = np.random.default_rng(3)
    q, d, n = 4, 8, 400
    embeds = normalized(rng, (n, q, d))
    text = normalized(rng, (d,))
    with PhotoIndex(tmp_path / "x.sqlite") as db:
        db.bind_model("synthetic", q, d)
        fill(db, embeds)
        reader = PhotoIndex(tmp_path / "x.sqlite", create=False)  # another process searching meanwhile
        before = top_k(reader, text, n)
        gone = [f"/p/{i:04d}.jpg" for i in range(0, n, 2)]
        db.write_batch([], removed=gone)
        old_file = db.vectors_path()
        assert not db.compact(min_dead=1000)
        assert db.compact(min_dead=10)
        assert db.dead_rows() == 0 and db.vector_rows() == n // 2
        assert not old_file.exists() and db.vectors_path().stat().st_size == HEADER_BYTES + n // 2 * q * d * 2
        expected = [r.path for r in before if r.path not in set(gone)]
        assert [r.path for r in top_k(db, text, n)] == expected
        assert [r.path for r in top_k(reader, text, n)] == expected  # the reader follows the new file
        reader.close()
        fill(db, embeds[:3], start=1000)
        assert db.count() == n // 2 + 3


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, embedding BLOB, error TEXT, indexed_at REAL NOT NULL);
"""


def test_version_1_indexes_are_migrated(tmp_path):
    rng = np.random.default_rng(4)
    q, d, n = 4, 8, 50
    embeds = normalized(rng, (n, q, d))
    embeds[30] = embeds[10]  # a tie: still broken by the order of the old ids
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as c:
        c.executescript(V1_SCHEMA)
        c.executemany("INSERT INTO meta VALUES (?, ?)", [("schema_version", "1"), ("model", "synthetic"),
                                                          ("num_query_tokens", str(q)), ("embed_dim", str(d))])
        # Inserted in reverse so that ids, not paths, decide the order.
        c.executemany("INSERT INTO images(id, path, size, mtime_ns, embedding, error, indexed_at) "
                      "VALUES (?, ?, ?, ?, ?, NULL, 0)",
                      [(n - i, f"/p/{i:04d}.jpg", 1, 1, embeds[i].astype(np.float16).tobytes()) for i in range(n)])
        c.execute("INSERT INTO images VALUES (999, '/p/bad.jpg', 1, 1, NULL, 'cannot read', 0)")
    text = embeds[10, 0]
    with PhotoIndex(path) as db:
        assert db.get_meta("schema_version") == str(SCHEMA_VERSION) and db.count() == n
        assert db.errors() == [("/p/bad.jpg", "cannot read")]
        scores = (embeds.astype(np.float16).astype(np.float32) @ text).max(axis=1)
        old_ids = n - np.arange(n)
        order = np.lexsort((old_ids, -scores))
        assert [r.path for r in top_k(db, text, n)] == [f"/p/{i:04d}.jpg" for i in order]
        assert db.files()["/p/0001.jpg"] == (1, 1, True)


def test_schema_version_is_checked(tmp_path):
    path = tmp_path / "x.sqlite"
    with PhotoIndex(path) as db:
        assert db.get_meta("schema_version") == str(SCHEMA_VERSION)
        db.set_meta("schema_version", "999")
    with pytest.raises(PhotoIndexError, match="schema version 999"):
        PhotoIndex(path)


def test_half_to_float_is_exact():
    """Every finite float16 (zeros, subnormals, both signs) converts to the same float32 as numpy's cast."""
    halves = np.arange(65536, dtype=np.uint16).view(np.int16)
    finite = np.isfinite(halves.view(np.float16))
    out = np.empty(65536, np.int32)
    half_to_float(halves, out)
    expected = halves.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out.view(np.float32)[finite].view(np.int32), expected[finite].view(np.int32))


# --- duplicates -----------------------------------------------------------------------------------------------------


def duplicates_cli(argv):
    """``mlx-blip2 duplicates`` through its own parser (the module the CLI registers)."""
    import argparse

    from mlx_blip2.cli import duplicates

    parser = argparse.ArgumentParser()
    duplicates.add_parser(parser.add_subparsers()).set_defaults(func=duplicates.run)
    args = parser.parse_args(["duplicates", *argv])
    return args.func(args)


def test_duplicates(library, tmp_path, capsys):
    (library / "bad.jpg").unlink()
    (library / "c.jpg").unlink()  # the tiny random model finds it as close to a.png as a resized copy is
    (library / "copy of a.png").write_bytes((library / "a.png").read_bytes())
    make_images()[0].resize((50, 40)).save(library / "a small.png")
    db = tmp_path / "library.sqlite"
    assert run_index(library, db, "-r") == 0
    capsys.readouterr()
    assert duplicates_cli(["--db", str(db), "--threshold", "0.99", "--json"]) == 0
    (group,) = json.loads(capsys.readouterr().out)
    assert sorted(os.path.basename(i["path"]) for i in group["images"]) == ["a small.png", "a.png", "copy of a.png"]
    assert 0.99 <= group["similarity"]["min"] <= group["similarity"]["max"] <= 1.0 + 1e-6
    # Only identical embeddings at threshold 1; nothing at all in an index without near-duplicates.
    assert duplicates_cli(["--db", str(db), "--threshold", "1"]) == 0
    out = capsys.readouterr().out
    assert "group 1: 2 images" in out and "copy of a.png" in out and "a small.png" not in out
    with PhotoIndex(db) as index:
        index.write_batch([], removed=[str(library / "copy of a.png"), str(library / "a small.png")])
    assert duplicates_cli(["--db", str(db), "--threshold", "0.99"]) == 0
    assert "no near-duplicates" in capsys.readouterr().out
    assert main(["search", QUERY, "--db", str(db), "-k", "1"]) == 0  # the index is still searchable
    with pytest.raises(ValueError, match="threshold"):
        duplicates_cli(["--db", str(db), "--threshold", "1.5"])
