"""The photo index and its CLI (``mlx-blip2 index`` / ``search``), end to end on the tiny retrieval checkpoint."""

import io
import json
import os
import sqlite3

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image
from reference_cases import make_images

from mlx_blip2 import photo_index
from mlx_blip2.cli import main
from mlx_blip2.photo_index import (
    ImageEmbedder,
    PhotoIndex,
    PhotoIndexError,
    Progress,
    _half_to_float,
    index_paths,
    search,
)
from mlx_blip2.pipelines.retrieval import load_retrieval

TINY = FIXTURES / "tiny-blip2-itm"
QUERY = "a photo of a cat"


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
        return {os.path.basename(p): (emb is not None, err) for p, emb, err in
                c.execute("SELECT path, embedding, error FROM images")}


def run_index(lib, db, *extra):
    return main(["index", str(lib), "--model", str(TINY), "--db", str(db), *extra])


def brute_force(pipe, paths, query):
    """ITC of every path, the slow way: the pipeline's own embeddings."""
    sims = pipe.similarity([str(p) for p in paths], [query])[:, 0]
    return sorted(zip([str(p) for p in paths], sims), key=lambda x: -x[1])


# --- end to end -----------------------------------------------------------------------------------------------------


def test_index_search_end_to_end(library, tmp_path, capsys, pipe):
    db = tmp_path / "library.sqlite"
    assert run_index(library, db) == 0
    out, err = capsys.readouterr()
    assert "3 added" in out and "1 unreadable" in out and "1 non-image" in out
    assert "bad.jpg" in err  # reported, not fatal
    stored = rows(db)
    assert set(stored) == {"a.png", "b.png", "c.jpg", "bad.jpg"}  # no subfolder, no .txt, no hidden file
    assert stored["a.png"] == (True, None)
    assert stored["bad.jpg"][0] is False and "cannot read image" in stored["bad.jpg"][1]

    # Recursive: the subfolder's image is added, the rest unchanged (and the bad file not retried).
    assert run_index(library, db, "--recursive") == 0
    out, _ = capsys.readouterr()
    assert "1 added" in out and "4 unchanged" in out and "0 unreadable" in out
    assert "d.png" in rows(db)

    # search: a table, in the order of a brute-force ITC computation.
    assert main(["search", QUERY, "--db", str(db), "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "path"] and len(lines) == 4
    expected = brute_force(pipe, [library / n for n in ["a.png", "b.png", "c.jpg", "sub/d.png"]], QUERY)
    got = [(line.split()[2], float(line.split()[1])) for line in lines[1:]]
    assert [p for p, _ in got] == [p for p, _ in expected[:3]]
    for (_, a), (_, b) in zip(got, expected):
        assert abs(a - b) < 2e-3  # float16 storage, 4 decimals printed

    # --json, all results.
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
            blob = db.db.execute("SELECT embedding FROM images WHERE path = ?",
                                 (str(library / name),)).fetchone()[0]
            return np.frombuffer(blob, np.float16).reshape(8, 16).astype(np.float32)

        before_b = embedding("b.png")
        np.testing.assert_allclose(embedding("a.png"), pipe.embed_images(str(library / "a.png")), atol=2e-3)

        # Nothing changed: nothing re-embedded, and the model is not even loaded.
        def no_model(_):
            raise AssertionError("the model must not be loaded when nothing changed")

        report = index_paths(db, [library], recursive=True, progress=False, embedder_factory=no_model)
        assert (report.added, report.updated, report.unchanged, report.removed) == (0, 0, 5, 0)

        # Modified content, a touched file (same bytes, new mtime), a deleted file and a repaired bad file.
        make_images()[2].save(library / "b.png")
        st = os.stat(library / "c.jpg")
        os.utime(library / "c.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        (library / "a.png").unlink()
        make_images()[0].save(library / "bad.jpg", format="JPEG")
        report = index_paths(db, [library], recursive=True, progress=False)
        assert (report.added, report.updated, report.unchanged, report.removed) == (0, 3, 1, 1)
        assert report.failed == []
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


def test_search_rerank(library, tmp_path, capsys, pipe):
    db = tmp_path / "library.sqlite"
    assert run_index(library, db, "-r") == 0
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
        itc = {r.path: r.itc for r in index.top_k(pipe.embed_texts(QUERY), 4)}
    ranked = pipe.rerank(QUERY, paths, [itc[p] for p in paths])
    assert [r["path"] for r in results] == [paths[x.index] for x in ranked[:2]]
    # Table output has the extra columns.
    assert main(["search", QUERY, "--db", str(db), "-k", "1", "--rerank"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["rank", "score", "itc", "itm", "path"]


def test_search_queries_from_stdin(library, tmp_path, capsys, monkeypatch):
    db = tmp_path / "library.sqlite"
    assert run_index(library, db) == 0
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUERY}\n\ntwo dogs\n"))
    assert main(["search", "--db", str(db), "-k", "1", "--json"]) == 0
    out = capsys.readouterr().out
    decoder, pos, answers = json.JSONDecoder(), 0, []
    while pos < len(out.strip()):
        value, pos = decoder.raw_decode(out, pos)
        answers.append(value)
        while pos < len(out) and out[pos].isspace():
            pos += 1
    assert len(answers) == 2 and all(len(a) == 1 for a in answers)


# --- errors ---------------------------------------------------------------------------------------------------------


def test_cli_errors(library, tmp_path, capsys):
    db = tmp_path / "library.sqlite"
    assert main(["search", QUERY, "--db", str(db)]) == 2
    assert "no photo index" in capsys.readouterr().err
    assert not db.exists()  # search never creates a database
    assert main(["index", str(tmp_path / "nope"), "--model", str(TINY), "--db", str(db)]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert run_index(library, db) == 0
    capsys.readouterr()
    # Embeddings of two models never mix.
    (library / "new.png").write_bytes((library / "a.png").read_bytes())
    rc = main(["index", str(library), "--model", str(FIXTURES / "tiny-blip2-itm-legacy"), "--db", str(db)])
    assert rc == 2 and "holds embeddings from" in capsys.readouterr().err
    not_a_db = tmp_path / "notes.sqlite"
    not_a_db.write_text("hello " * 1000)
    assert main(["search", QUERY, "--db", str(not_a_db)]) == 2
    assert "not a usable photo index" in capsys.readouterr().err
    assert main(["search", "  ", "--db", str(db)]) == 2


def test_empty_index_search(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    db = tmp_path / "library.sqlite"
    assert main(["index", str(tmp_path / "empty"), "--model", str(TINY), "--db", str(db)]) == 0
    capsys.readouterr()
    assert main(["search", QUERY, "--db", str(db), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [] and "no searchable images" in captured.err


def test_a_killed_run_keeps_finished_batches(library, tmp_path):
    """One transaction per batch: a crash in the middle keeps the batches before it, and a rerun finishes."""
    db_path = tmp_path / "library.sqlite"

    class Crashing(ImageEmbedder):
        calls = 0

        def embed(self, pixel_values):
            Crashing.calls += 1
            if Crashing.calls == 2:
                raise KeyboardInterrupt
            return super().embed(pixel_values)

    with PhotoIndex(db_path) as db:
        with pytest.raises(KeyboardInterrupt):
            index_paths(db, [library], model=str(TINY), batch_size=1, progress=False,
                        embedder_factory=lambda m: Crashing(m, batch_size=1))
    with sqlite3.connect(db_path) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        done = c.execute("SELECT COUNT(*) FROM images WHERE embedding IS NOT NULL").fetchone()[0]
    assert done == 1
    with PhotoIndex(db_path) as db:
        report = index_paths(db, [library], progress=False)  # the model comes from the index
        assert (report.unchanged, report.added, len(report.failed)) == (1, 2, 1)
        assert db.count() == 3


# --- the store on its own -------------------------------------------------------------------------------------------


def test_vectorised_top_k_equals_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    n, q, d = 300, 4, 8
    embeds = rng.standard_normal((n, q, d)).astype(np.float32)
    embeds /= np.linalg.norm(embeds, axis=-1, keepdims=True)
    embeds[7] = embeds[3]  # a tie: broken by index order
    with PhotoIndex(tmp_path / "x.sqlite") as db:
        db.bind_model("synthetic", q, d)
        db.write_batch([(f"/p/{i:04d}.jpg", i, i, embeds[i]) for i in range(n)])
        text = rng.standard_normal(d).astype(np.float32)
        text /= np.linalg.norm(text)
        stored = embeds.astype(np.float16).astype(np.float32)
        scores = (stored @ text).max(axis=1)
        order = np.argsort(-scores, kind="stable")
        assert [r.path for r in db.top_k(text, n)] == [f"/p/{i:04d}.jpg" for i in order]
        assert [r.path for r in db.top_k(text, 5)] == [f"/p/{i:04d}.jpg" for i in order[:5]]
        np.testing.assert_allclose([r.score for r in db.top_k(text, 5)], scores[order[:5]], rtol=1e-6)
        tie = [r.path for r in db.top_k(embeds[3, 0], n)]
        assert tie.index("/p/0003.jpg") + 1 == tie.index("/p/0007.jpg")
        # The cached matrix is reused until a write, then rebuilt.
        m = db.matrix()
        assert db.matrix() is m
        db.write_batch([], removed=["/p/0000.jpg"])
        assert db.matrix() is not m and len(db.matrix().paths) == n - 1
        # A damaged blob is skipped, not misread.
        db.db.execute("UPDATE images SET embedding = x'0000' WHERE path = '/p/0001.jpg'")
        db.write_batch([])
        assert "/p/0001.jpg" not in db.matrix().paths and len(db.matrix().paths) == n - 2
        with pytest.raises(PhotoIndexError, match="dims"):
            db.scores(np.ones(d + 1, np.float32))
        with pytest.raises(PhotoIndexError, match="holds embeddings from synthetic"):
            db.bind_model("other", q, d)


def test_schema_version_is_checked(tmp_path):
    path = tmp_path / "x.sqlite"
    with PhotoIndex(path) as db:
        assert db.get_meta("schema_version") == str(photo_index.SCHEMA_VERSION)
        db.set_meta("schema_version", "999")
    with pytest.raises(PhotoIndexError, match="schema version 999"):
        PhotoIndex(path)


def test_half_to_float_is_exact():
    """Every finite float16 (zeros, subnormals, both signs) converts to the same float32 as numpy's cast."""
    halves = np.arange(65536, dtype=np.uint16).view(np.int16)
    finite = np.isfinite(halves.view(np.float16))
    out = np.empty(65536, np.int32)
    _half_to_float(halves, out)
    expected = halves.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out.view(np.float32)[finite].view(np.int32), expected[finite].view(np.int32))


def test_progress_bar_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = Progress(4, stream=stream)
    bar.update(2)
    bar.update(4)
    bar.close()
    assert "4/4" in stream.getvalue() and "images/s" in stream.getvalue() and stream.getvalue().startswith("\r")
    quiet = io.StringIO()
    bar = Progress(4, stream=quiet)
    bar.update(4)
    bar.close()
    assert quiet.getvalue() == ""
