"""What a new user meets running the README's commands on a messy library (tiny checkpoints): a translation-only XMP
sidecar, a missing file among good ones, and the tool's own sidecars in a folder being indexed."""

from conftest import FIXTURES
from PIL import Image

from mlx_blip2.cli import main
from mlx_blip2.library.xmp import xmp_description

TINY = FIXTURES / "tiny-blip2-opt"
TINY_ITM = FIXTURES / "tiny-blip2-itm"
FAST = ["--model", str(TINY), "--max-new-tokens", "3", "--num-beams", "1"]
GERMAN_ONLY = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               '<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:description><rdf:Alt>'
               '<rdf:li xml:lang="de-DE">Ein Hund am Strand</rdf:li></rdf:Alt></dc:description></rdf:Description>'
               '</rdf:RDF></x:xmpmeta>')


def photo(path, colour=(200, 40, 40)):
    Image.new("RGB", (48, 40), colour).save(path)
    return path


def test_a_translation_only_xmp_sidecar_is_not_a_caption(tmp_path, capsys):
    image = photo(tmp_path / "beach.jpg")
    sidecar = tmp_path / "beach.jpg.xmp"
    sidecar.write_text(GERMAN_ONLY)
    assert xmp_description(sidecar.read_bytes()) == "Ein Hund am Strand"  # still read as a caption
    assert xmp_description(sidecar.read_bytes(), default_only=True) is None
    assert main(["caption", str(image), "--format", "xmp", *FAST]) == 0
    data = sidecar.read_bytes()
    assert b'xml:lang="x-default"' in data and b"Ein Hund am Strand" in data
    caption = xmp_description(data, default_only=True)
    assert caption and caption != "Ein Hund am Strand"
    # Now it has one: the next run skips it.
    assert main(["caption", str(image), "--format", "xmp", *FAST]) == 0
    assert sidecar.read_bytes() == data


def test_a_missing_file_among_good_ones_fails_alone(tmp_path, capsys):
    good = photo(tmp_path / "good.png")
    out = tmp_path / "captions.jsonl"
    assert main(["caption", str(good), str(tmp_path / "missing.jpg"), "-o", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "captioned 1" in err and "failed 1" in err
    assert f"cannot read '{tmp_path / 'missing.jpg'}': no such file" in err
    import json

    records = {json.loads(line)["path"]: json.loads(line) for line in out.read_text().splitlines()}
    assert records[str(good)]["caption"] and "no such file" in records[str(tmp_path / "missing.jpg")]["error"]
    # Printing instead of writing: the same.
    assert main(["caption", str(good), str(tmp_path / "missing.jpg"), *FAST]) == 1
    assert "no such file" in capsys.readouterr().err


def test_the_tools_own_sidecars_are_not_ignored_files(tmp_path):
    from mlx_blip2.files import find_images

    lib = tmp_path / "photos"
    lib.mkdir()
    for name in ("a.jpg", "b.png", "c.heic"):
        photo(lib / name) if not name.endswith(".heic") else (lib / name).write_bytes(b"x")
    for name in ("a.txt", "a.jpg.xmp", "b.xmp", "c.txt", "notes.txt", "orphan.xmp", "readme.md"):
        (lib / name).write_text("x")
    found = find_images([lib])
    assert len(found.files) == 3 and found.ignored == 3  # notes.txt, orphan.xmp, readme.md
    # What `mlx-blip2 index` reports after a captioning run left its sidecars.
    from mlx_blip2.photo_index import PhotoIndex, index_paths

    (lib / "c.heic").unlink()
    with PhotoIndex(tmp_path / "lib.sqlite") as db:
        report = index_paths(db, [lib], model=str(TINY_ITM), progress=False)
    assert report.ignored == 4 and "4 non-image files ignored" in report.summary()  # c.txt lost its image


def test_a_relative_model_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    import csv
    import json

    image = photo(tmp_path / "a.png")
    monkeypatch.chdir(TINY.parent.parent)
    relative = ["--model", f"fixtures/{TINY.name}", "--max-new-tokens", "3", "--num-beams", "1", "-q"]
    assert main(["caption", str(image), "-o", str(tmp_path / "c.jsonl"), *relative]) == 0
    assert main(["caption", str(image), "-o", str(tmp_path / "c.csv"), *relative]) == 0
    record = json.loads((tmp_path / "c.jsonl").read_text().splitlines()[0])
    row = next(csv.DictReader(open(tmp_path / "c.csv", newline="")))
    assert record["model"] == row["model"] == str(TINY.resolve())
