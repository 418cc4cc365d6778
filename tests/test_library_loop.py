"""The library loop's index side: captions in the photo index (sidecars, caption runs, migration), hybrid search
(reciprocal rank fusion of ITC and FTS5 caption matches) and the search filters, on the tiny retrieval checkpoint
and on synthetic embeddings."""

import json
import os
import sqlite3
import time

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image
from reference_cases import make_images

from mlx_blip2.cli import main
from mlx_blip2.photo_index import SCHEMA_VERSION, PhotoIndex, index_paths, search, top_k
from mlx_blip2.photo_index.captions import (
    caption_row,
    fts_query,
    image_ids,
    import_captions,
    set_caption,
)
from mlx_blip2.photo_index.filters import Filters
from mlx_blip2.photo_index.fusion import RRF_K, fuse, image_ranks
from mlx_blip2.pipelines.retrieval import load_retrieval

TINY = FIXTURES / "tiny-blip2-itm"
XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       '<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:description><rdf:Alt>'
       '<rdf:li xml:lang="de">Ein Hund</rdf:li><rdf:li xml:lang="x-default">{}</rdf:li></rdf:Alt></dc:description>'
       '</rdf:Description></rdf:RDF></x:xmpmeta>')


@pytest.fixture(scope="module")
def pipe():
    return load_retrieval(TINY)


def exif_bytes(when: str) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[36867] = when  # DateTimeOriginal
    return exif.tobytes()


@pytest.fixture
def photos(tmp_path):
    """Six photos in two folders: one with a .txt caption, one with an XMP caption, two with EXIF dates."""
    lib = tmp_path / "photos"
    (lib / "2019").mkdir(parents=True)
    images = make_images()
    paths = {}
    for i in range(6):
        folder = lib / "2019" if i >= 4 else lib
        path = folder / f"p{i}.jpg"
        img = images[i % len(images)].rotate(40 * i)
        if i in (1, 4):
            img.save(path, quality=92, exif=exif_bytes("2019:07:14 10:20:30" if i == 4 else "2021:01:02 03:04:05"))
        else:
            img.save(path, quality=92)
        paths[f"p{i}"] = str(path)
    (lib / "p2.txt").write_text("Rex asleep on the sofa\n")
    with open(paths["p3"] + ".xmp", "w") as f:
        f.write(XMP.format("a lighthouse at dusk"))
    return lib, paths


def build(lib, db_path):
    with PhotoIndex(db_path) as db:
        index_paths(db, [lib], model=str(TINY), recursive=True, progress=False)


def test_sidecar_captions_reach_the_index_and_a_caption_word_finds_its_photo(photos, tmp_path, pipe):
    lib, paths = photos
    db_path = tmp_path / "lib.sqlite"
    build(lib, db_path)
    with PhotoIndex(db_path, create=False) as db:
        ids = image_ids(db, paths.values())
        assert caption_row(db, ids[paths["p2"]])[:3] == ("Rex asleep on the sofa", "txt", False)
        assert caption_row(db, ids[paths["p3"]])[:3] == ("a lighthouse at dusk", "xmp", False)
        assert caption_row(db, ids[paths["p0"]]) is None
        for mode in ("hybrid", "text"):
            results = search(db, "rex", k=6, pipeline=pipe, mode=mode)
            assert results[0].path == paths["p2"] and results[0].text is not None, mode
        assert [r.path for r in search(db, "rex", k=6, mode="text")] == [paths["p2"]]  # no model needed
        # "lighthouse" is in the XMP's x-default only; the German entry is not the caption
        assert search(db, "lighthouse", k=3, pipeline=pipe)[0].path == paths["p3"]
        assert search(db, "Hund", k=3, mode="text") == []
        # The image ranking alone does not know the word.
        image = search(db, "rex", k=6, pipeline=pipe, mode="image")
        assert all(r.text is None for r in image)
    # The CLI: --mode text answers without a model.
    assert main(["search", "sofa", "--db", str(db_path), "--mode", "text", "--json"]) == 0


def test_without_captions_hybrid_ranks_as_image(photos, tmp_path, pipe):
    lib, paths = photos
    os.unlink(lib / "p2.txt")
    os.unlink(paths["p3"] + ".xmp")
    db_path = tmp_path / "lib.sqlite"
    build(lib, db_path)
    with PhotoIndex(db_path, create=False) as db:
        assert db.db.execute("SELECT COUNT(*) FROM captions").fetchone()[0] == 0
        for query in ("a photo of a cat", "rex"):
            image = search(db, query, k=6, pipeline=pipe, mode="image")
            hybrid = search(db, query, k=6, pipeline=pipe)
            assert [(r.path, r.score) for r in hybrid] == [(r.path, r.score) for r in image]
        # Captions that do not match the query change nothing either.
        db.begin()
        set_caption(db, image_ids(db, [paths["p0"]])[paths["p0"]], "a bowl of fruit", "run")
        db.commit()
        image = search(db, "a photo of a cat", k=6, pipeline=pipe, mode="image")
        assert [r.path for r in search(db, "a photo of a cat", k=6, pipeline=pipe)] == [r.path for r in image]


def test_sidecar_edits_and_caption_runs_update_the_index(photos, tmp_path, pipe):
    lib, paths = photos
    db_path = tmp_path / "lib.sqlite"
    build(lib, db_path)
    time.sleep(0.01)
    (lib / "p2.txt").write_text("Rex on the beach\n")  # edited by hand: read again on the next run
    os.unlink(paths["p3"] + ".xmp")  # removed: its caption goes
    build(lib, db_path)
    with PhotoIndex(db_path, create=False) as db:
        ids = image_ids(db, paths.values())
        assert caption_row(db, ids[paths["p2"]])[0] == "Rex on the beach"
        assert caption_row(db, ids[paths["p3"]]) is None
        assert search(db, "sofa", k=3, mode="text") == []
        # A caption run's captions replace sidecar captions, but not a person's correction.
        db.begin()
        set_caption(db, ids[paths["p0"]], "Granny's garden", "correction", corrected=True)
        db.commit()
        changed = import_captions(db, {paths["p0"]: "a garden", paths["p1"]: "a  red   car ", "/elsewhere.jpg": "x"})
        assert changed == 1
        assert caption_row(db, ids[paths["p0"]])[:3] == ("Granny's garden", "correction", True)
        assert caption_row(db, ids[paths["p1"]])[:3] == ("a red car", "run", False)
    # A re-run with nothing changed leaves the captions as they are.
    build(lib, db_path)
    with PhotoIndex(db_path, create=False) as db:
        assert caption_row(db, ids[paths["p1"]])[:2] == ("a red car", "run")
        # A deleted photo takes its caption with it.
    os.unlink(paths["p1"])
    build(lib, db_path)
    with PhotoIndex(db_path, create=False) as db:
        assert db.db.execute("SELECT COUNT(*) FROM captions WHERE image_id = ?", (ids[paths["p1"]],)).fetchone()[0] == 0
        assert search(db, "car", k=3, mode="text") == []


def test_filters(photos, tmp_path, pipe):
    lib, paths = photos
    db_path = tmp_path / "lib.sqlite"
    build(lib, db_path)
    with PhotoIndex(db_path, create=False) as db:
        taken = {os.fsdecode(p): t for p, t in db.db.execute("SELECT path, taken FROM images")}
        assert taken[paths["p4"]] == "2019-07-14T10:20:30" and taken[paths["p1"]] == "2021-01-02T03:04:05"
        mtime = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.stat(paths["p0"]).st_mtime))
        assert taken[paths["p0"]] == mtime  # no EXIF date: the file's time
        folder = Filters(folder=str(lib / "2019"))
        for mode in ("image", "hybrid"):
            got = {r.path for r in search(db, "a photo", k=6, pipeline=pipe, mode=mode, filters=folder)}
            assert got == {paths["p4"], paths["p5"]}
        dates = Filters(taken_from="2019-01-01", taken_to="2021-01-02")
        assert {r.path for r in search(db, "a photo", k=6, pipeline=pipe, filters=dates)} == {paths["p1"], paths["p4"]}
        assert search(db, "rex", k=6, mode="text", filters=folder) == []
        ids = image_ids(db, paths.values())
        db.begin()
        set_caption(db, ids[paths["p5"]], "Rex in the snow", "correction", corrected=True)
        db.commit()
        assert [r.path for r in search(db, "rex", k=6, mode="text", filters=Filters(corrected=True))] == [paths["p5"]]
        assert [r.path for r in search(db, "rex", k=6, mode="text", filters=Filters(corrected=False))] == [paths["p2"]]
        unfiltered = search(db, "a photo", k=6, pipeline=pipe, mode="image")
        assert len(unfiltered) == 6
    with pytest.raises(ValueError, match="'from' must be a date"):
        Filters(taken_from="July")
    with pytest.raises(ValueError, match="absolute"):
        Filters(folder="photos")


def test_version_2_indexes_are_migrated(photos, tmp_path, pipe):
    """An index of schema 2 (no captions, no dates) opens as version 3; the next run fills both."""
    lib, paths = photos
    db_path = tmp_path / "lib.sqlite"
    build(lib, db_path)
    with sqlite3.connect(db_path) as c:  # back to version 2's tables
        c.executescript("DROP TRIGGER images_ad; DROP TABLE captions_fts; DROP TABLE captions; "
                        "DROP INDEX images_by_taken; ALTER TABLE images DROP COLUMN taken; "
                        "UPDATE meta SET value = '2' WHERE key = 'schema_version';")
    with PhotoIndex(db_path, create=False) as db:
        before = [(r.path, r.score) for r in top_k(db, pipe.embed_texts("a photo"), 6)]
        assert db.get_meta("schema_version") == str(SCHEMA_VERSION) == "3"
        assert db.db.execute("SELECT COUNT(*) FROM captions").fetchone()[0] == 0
    build(lib, db_path)  # nothing to embed; sidecars and dates are read
    with PhotoIndex(db_path, create=False) as db:
        assert [(r.path, r.score) for r in top_k(db, pipe.embed_texts("a photo"), 6)] == before
        assert search(db, "rex", k=2, mode="text")[0].path == paths["p2"]
        assert db.db.execute("SELECT COUNT(*) FROM images WHERE taken IS NULL").fetchone()[0] == 0


def test_reciprocal_rank_fusion():
    scores = np.array([0.9, 0.1, 0.5, -np.inf, 0.5], np.float32)
    assert image_ranks(scores, [0, 1, 2, 3, 4]) == {0: 1, 2: 2, 4: 3, 1: 4}  # ties by row; -inf has no rank
    ranks = image_ranks(scores, [0, 1, 2, 4])
    fused = fuse([0, 2], ranks, [1, 4])
    expected = {0: 1 / (RRF_K + 1), 2: 1 / (RRF_K + 2), 1: 1 / (RRF_K + 4) + 1 / (RRF_K + 1),
                4: 1 / (RRF_K + 3) + 1 / (RRF_K + 2)}
    assert [key for key, _ in fused] == sorted(expected, key=lambda r: -expected[r])
    assert all(abs(score - expected[key]) < 1e-12 for key, score in fused)
    assert fuse([0, 2], ranks, []) == [(0, 1 / (RRF_K + 1)), (2, 1 / (RRF_K + 2))]


def test_fts_query():
    assert fts_query("a dog on the beach") == '"dog" OR "beach"*'
    assert fts_query("the") == '"the"*'
    assert fts_query("Rex's ball!") == '"rex" OR "s" OR "ball"*'
    assert fts_query("  ,. ") is None
    assert fts_query('x" OR 1') == '"x" OR "1"'  # quotes and operators are words, never syntax


def test_index_takes_a_caption_runs_output(photos, tmp_path, capsys):
    lib, paths = photos
    db = tmp_path / "lib.sqlite"
    runs = tmp_path / "captions.jsonl"
    runs.write_text(json.dumps({"path": paths["p0"], "caption": "a kayak on Lake Bled"}) + "\n"
                    + json.dumps({"path": paths["p1"], "error": "cannot read"}) + "\n")
    csv_run = tmp_path / "later.csv"
    csv_run.write_text(f"path,caption\n{paths['p0']},a kayak on Lake Bled at dawn\n")
    argv = ["index", str(lib), "-r", "--db", str(db), "--model", str(TINY), "--captions", str(runs),
            "--captions", str(csv_run)]
    assert main(argv) == 0
    assert "1 captions taken from" in capsys.readouterr().out
    with PhotoIndex(db, create=False) as index:
        assert [r.path for r in search(index, "Bled", k=3, mode="text")] == [paths["p0"]]
        assert caption_row(index, image_ids(index, [paths["p0"]])[paths["p0"]])[:2] == ("a kayak on Lake Bled at dawn",
                                                                                         "run")
    assert main(argv[:-2] + ["--captions", str(tmp_path / "missing.jsonl")]) == 2
    assert "no caption file" in capsys.readouterr().err
