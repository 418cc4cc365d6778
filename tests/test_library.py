"""Photo-library captioning (mlx_blip2.library and `mlx-blip2 caption`), end to end on the tiny checkpoint."""

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image, features

from mlx_blip2 import images, library
from mlx_blip2.cli import main
from mlx_blip2.files import ImageFile, display_path, find_images
from mlx_blip2.library import (
    CSV_COLUMNS,
    Progress,
    RecordWriter,
    Summary,
    XmpError,
    caption_files,
    caption_paths,
    parse_shard,
    select_shard,
    shard_index,
    update_xmp,
    xmp_description,
)
from mlx_blip2.pipelines import load

TINY = FIXTURES / "tiny-blip2-opt"
FAST = {"max_new_tokens": 4, "num_beams": 1}  # tiny-model captions are gibberish; keep them short and greedy
RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
DC = "{http://purl.org/dc/elements/1.1/}"


@pytest.fixture(scope="module")
def pipe():
    return load(TINY)


def no_model():
    raise AssertionError("the model must not be loaded when nothing needs captioning")


def picture(w=64, h=48, seed=0) -> np.ndarray:
    """An asymmetric RGB picture: a gradient with noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x * y) % 255], axis=-1)
    return np.clip(base + rng.integers(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def save(path, image=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if image is not None else Image.fromarray(picture())).save(path, **kwargs)
    return path


def make_library(root, n=4):
    return [save(root / f"img{i:02d}.png", Image.fromarray(picture(seed=i))) for i in range(n)]


def read_jsonl(path):
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"", "the file must end with a newline"
    return [json.loads(line) for line in lines[:-1]]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def discover(inputs, recursive=False):
    return find_images(inputs, recursive).files


def decode(path, pipe):
    """The pixels the library gives the model for a file (the engine's preprocessing, run in worker threads)."""
    return pipe.engine.preprocess(path)


def run(pipe, inputs, **kwargs):
    kwargs.setdefault("generate_kwargs", FAST)
    return caption_paths(pipe, [str(p) for p in inputs], **kwargs)


# --- discovery and shards ----------------------------------------------------------------------------------------


def test_discover_recognises_images_by_extension(tmp_path):
    names = ["a.jpg", "b.JPEG", "c.png", "d.webp", "e.gif", "f.bmp", "g.tif", "h.TIFF", "i.heic", "j.HEIF", "k.avif",
             "l.Jpg"]
    for name in names + ["notes.txt", "photo.jpg.xmp", "clip.MOV", "data.json", "noext", ".hidden.jpg",
                         "._resource_fork.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "s.png").write_bytes(b"x")
    (tmp_path / "sub" / "deeper" / "t.jpeg").write_bytes(b"x")
    (tmp_path / ".thumbnails").mkdir()
    (tmp_path / ".thumbnails" / "u.jpg").write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()  # a folder with an image extension is not an image

    flat = discover([tmp_path])
    assert sorted(os.path.basename(f.path) for f in flat) == sorted(names)
    assert all(os.path.isabs(f.path) for f in flat)
    deep = discover([tmp_path], recursive=True)
    assert {f.key for f in deep} - {f.key for f in flat} == {"sub/s.png", "sub/deeper/t.jpeg"}
    # File arguments: images kept in the order given, other files ignored silently, duplicates once.
    files = discover([tmp_path / "c.png", tmp_path / "notes.txt", tmp_path / "a.jpg", tmp_path], recursive=False)
    assert [os.path.basename(f.path) for f in files[:2]] == ["c.png", "a.jpg"] and len(files) == len(names)
    with pytest.raises(FileNotFoundError, match="nope"):
        discover([tmp_path / "nope"])


def test_shards_are_disjoint_complete_and_deterministic(tmp_path):
    keys = [f"{y}/{m:02d}/IMG_{i:04d}.JPG" for y in (2019, 2020) for m in range(1, 13) for i in range(5)]
    files = [ImageFile(f"/mnt/a/{k}", k, k) for k in keys]
    n = 3
    parts = [select_shard(files, (i, n)) for i in range(1, n + 1)]
    paths = [p.path for part in parts for p in part]
    assert sorted(paths) == sorted(f.path for f in files) and len(paths) == len(set(paths))  # complete, disjoint
    assert all(len(part) > len(files) / n / 2 for part in parts)  # roughly balanced
    # The same on another machine, where the library is mounted elsewhere; adding files moves no others.
    moved = [ImageFile(f"/Volumes/photos/{k}", k, k) for k in keys + ["2021/new.jpg"]]
    assert [f.key for f in select_shard(moved, (2, n)) if f.key != "2021/new.jpg"] == [f.key for f in parts[1]]
    assert select_shard(files, None) == files
    assert all(1 <= shard_index(k, 7) <= 7 for k in keys)
    # Real files: the shard key is the path below the folder argument.
    make_library(tmp_path / "lib", 6)
    found = discover([tmp_path / "lib"])
    assert {f.key for f in found} == {f"img{i:02d}.png" for i in range(6)}
    assert parse_shard("2/5") == (2, 5)
    for bad in ("0/3", "4/3", "1", "a/b", "1/0"):
        with pytest.raises(Exception, match="I/N"):
            parse_shard(bad)


def test_shard_runs_share_a_library(pipe, tmp_path):
    make_library(tmp_path / "lib", 7)
    records = []
    for i in (1, 2, 3):
        out = tmp_path / f"part{i}.jsonl"
        summary, _ = run(pipe, [tmp_path / "lib"], output=out, shard=(i, 3))
        assert summary.exit_code == 0
        records += read_jsonl(out)
    paths = [r["path"] for r in records]
    assert sorted(paths) == sorted(str(p) for p in (tmp_path / "lib").glob("*.png")) and len(set(paths)) == 7


# --- decoding: formats, modes, orientation, size -----------------------------------------------------------------


def test_every_format_and_mode_is_captioned(pipe, tmp_path):
    lib = tmp_path / "lib"
    rgb = Image.fromarray(picture())
    save(lib / "photo.jpg", rgb, quality=90)
    save(lib / "UPPER.JPEG", rgb)
    save(lib / "cmyk.jpg", rgb.convert("CMYK"))
    save(lib / "gray.png", rgb.convert("L"))
    save(lib / "bilevel.png", rgb.convert("1"))
    save(lib / "rgba.png", rgb.convert("RGBA"))
    save(lib / "la.png", rgb.convert("LA"))
    save(lib / "palette.png", rgb.convert("P"), transparency=0)
    save(lib / "sixteen.png", Image.fromarray(picture()[..., 0].astype(np.uint16) * 257))
    save(lib / "photo.webp", rgb.convert("RGBA"))
    save(lib / "photo.bmp", rgb)
    save(lib / "photo.tiff", rgb.convert("CMYK"))
    save(lib / "photo.tif", rgb)
    frames = [Image.fromarray(picture(seed=s)).convert("P") for s in (1, 2)]
    frames[0].save(lib / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expected = 14
    if features.check("avif"):
        save(lib / "photo.avif", rgb)
        expected += 1
    out = tmp_path / "captions.jsonl"
    summary, _ = run(pipe, [lib], output=out, batch_size=4, model_name="tiny")
    assert summary.failed == [] and summary.captioned == expected and summary.exit_code == 0
    records = read_jsonl(out)
    assert len(records) == expected
    for r in records:
        assert os.path.isabs(r["path"]) and isinstance(r["caption"], str) and "error" not in r
        assert r["model"] == "tiny" and r["size"] == os.path.getsize(r["path"])
        assert r["mtime"] == pytest.approx(os.path.getmtime(r["path"]))
    # A GIF is captioned from its first frame.
    save(tmp_path / "first.gif", frames[0])
    ip = pipe
    np.testing.assert_array_equal(decode(str(lib / "animated.gif"), ip), decode(str(tmp_path / "first.gif"), ip))


def test_heic(pipe, tmp_path):
    pytest.importorskip("pillow_heif")  # an optional dependency: `pip install pillow-heif`
    assert images.HEIF_SUPPORTED
    save(tmp_path / "lib" / "iphone.HEIC", Image.fromarray(picture()), quality=95)
    save(tmp_path / "lib" / "other.heif", Image.fromarray(picture(seed=3)), quality=95)
    out = tmp_path / "c.jsonl"
    summary, _ = run(pipe, [tmp_path / "lib"], output=out)
    assert summary.captioned == 2 and summary.failed == []
    assert {os.path.basename(r["path"]) for r in read_jsonl(out)} == {"iphone.HEIC", "other.heif"}


def test_exif_orientation_is_applied(pipe, tmp_path):
    ip = pipe
    upright = Image.fromarray(picture(40, 70))  # how the photo should look
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # how a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    save(tmp_path / "tagged.png", stored, exif=exif)
    save(tmp_path / "upright.png", upright)
    save(tmp_path / "untagged.png", stored)
    tagged = decode(str(tmp_path / "tagged.png"), ip)
    np.testing.assert_array_equal(tagged, decode(str(tmp_path / "upright.png"), ip))
    assert not np.allclose(tagged, decode(str(tmp_path / "untagged.png"), ip))
    # JPEG too (lossy, so compare distances).
    save(tmp_path / "tagged.jpg", stored, exif=exif, quality=95)
    jpeg = decode(str(tmp_path / "tagged.jpg"), ip)
    assert np.abs(jpeg - tagged).mean() < np.abs(jpeg - decode(str(tmp_path / "untagged.png"), ip)).mean() / 3


def test_huge_jpeg_is_decoded_exactly_and_captioned_as_the_pipeline_does(pipe, tmp_path, capsys):
    """A JPEG far larger than the model input (3000 x 2000 for 56 x 56) is decoded at full size, as the pipeline and
    transformers do: a reduced-size (draft) decode changed the pixels, so the CLI's caption differed from Python's."""
    big = Image.fromarray(np.kron(picture(60, 40), np.ones((50, 50, 1), np.uint8)))  # 3000 x 2000
    path = save(tmp_path / "big.jpg", big, quality=80)
    target = pipe.processor.image_processor.size["height"]
    assert min(big.size) > 2 * target
    with Image.open(path) as im:  # the processor's input from the full-size decode
        expected = pipe.processor(images=[im.convert("RGB")])["pixel_values"][0]
    seen = []
    real = pipe.engine.encode

    def spy(pixel_values, **kwargs):
        seen.extend(np.asarray(p) for p in pixel_values)
        return real(pixel_values, **kwargs)

    pipe.engine.encode = spy
    try:
        out = tmp_path / "c.jsonl"
        summary, _ = run(pipe, [path], output=out, generate_kwargs={})
    finally:
        del pipe.engine.encode
    assert summary.captioned == 1
    (pixels,) = seen
    np.testing.assert_array_equal(pixels, expected)
    (record,) = read_jsonl(out)
    assert record["caption"] == pipe.caption(str(path))
    # And from the command line, with the default recipe.
    assert main(["caption", str(path), "--model", str(TINY)]) == 0
    assert capsys.readouterr().out.strip() == pipe.caption(str(path))


# --- batched captioning ------------------------------------------------------------------------------------------


def test_captions_match_the_pipeline(pipe, tmp_path):
    paths = make_library(tmp_path, 5)
    for kwargs, prompt in [({}, None), ({"max_new_tokens": 6, "num_beams": 1}, "a photo of")]:
        out = tmp_path / f"c{len(kwargs)}.jsonl"
        summary, _ = run(pipe, paths, output=out, batch_size=3, prompt=prompt, generate_kwargs=kwargs)
        assert summary.captioned == 5
        got = {r["path"]: r["caption"] for r in read_jsonl(out)}
        assert [got[str(p)] for p in paths] == [pipe.caption(str(p), prompt=prompt, **kwargs) for p in paths]
        assert all(r.get("prompt") == prompt for r in read_jsonl(out))


def test_vision_encoder_runs_batched(pipe, tmp_path, monkeypatch):
    paths = make_library(tmp_path, 5)
    shapes = []
    real = type(pipe.model).encode_images

    def spy(self, pixel_values, *args, **kwargs):
        shapes.append(tuple(np.asarray(pixel_values).shape))
        return real(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(type(pipe.model), "encode_images", spy)
    run(pipe, paths, output=tmp_path / "c.jsonl", batch_size=2)
    assert [s[0] for s in shapes] == [2, 2, 1] and all(s[1:] == shapes[0][1:] for s in shapes)


# --- records: skip, overwrite, failures, crash safety ------------------------------------------------------------


def test_rerun_skips_what_is_done_and_overwrite_redoes_it(pipe, tmp_path):
    paths = make_library(tmp_path / "lib", 4)
    out = tmp_path / "c.jsonl"
    summary, _ = run(pipe, [tmp_path / "lib"], output=out)
    assert (summary.captioned, summary.skipped) == (4, 0)
    first = read_jsonl(out)
    summary, _ = run(no_model, [tmp_path / "lib"], output=out)  # nothing to do: the model is not even loaded
    assert (summary.captioned, summary.skipped, summary.exit_code) == (0, 4, 0)
    assert read_jsonl(out) == first
    # A changed file (new mtime) is captioned again; so is a new one.
    os.utime(paths[1], (time.time() + 10, time.time() + 10))
    save(tmp_path / "lib" / "new.png", Image.fromarray(picture(seed=9)))
    summary, _ = run(pipe, [tmp_path / "lib"], output=out)
    assert (summary.captioned, summary.skipped) == (2, 3)
    records = read_jsonl(out)
    assert len(records) == 5 and len({r["path"] for r in records}) == 5
    assert next(r for r in records if r["path"] == str(paths[1]))["mtime"] == pytest.approx(os.path.getmtime(paths[1]))
    # overwrite: everything again, still one record per image.
    summary, _ = run(pipe, [tmp_path / "lib"], output=out, existing="overwrite")
    assert (summary.captioned, summary.skipped) == (5, 0)
    assert len(read_jsonl(out)) == 5


def test_bad_files_are_recorded_and_retried(pipe, tmp_path):
    lib = tmp_path / "lib"
    good = make_library(lib, 3)
    (lib / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    (lib / "empty.png").write_bytes(b"")
    whole = io.BytesIO()
    Image.fromarray(picture(200, 150)).save(whole, "JPEG", quality=90)
    (lib / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (lib / "text.gif").write_text("GIF89a? no")
    images = [str(p) for p in good]
    out = tmp_path / "c.jsonl"
    summary, _ = run(pipe, [lib], output=out, batch_size=2)
    assert summary.captioned == 3 and summary.exit_code == 1
    assert sorted(os.path.basename(d) for d, _ in summary.failed) == ["corrupt.jpg", "empty.png", "text.gif",
                                                                      "truncated.jpg"]
    records = {r["path"]: r for r in read_jsonl(out)}
    assert len(records) == 7
    for name in ("corrupt.jpg", "empty.png", "truncated.jpg", "text.gif"):
        r = records[str(lib / name)]
        assert "caption" not in r and name in r["error"] and r["size"] == os.path.getsize(lib / name)
    assert all("caption" in records[p] for p in images)
    # Next run: the failures are tried again (a repaired file gets its caption), the captioned ones skipped.
    save(lib / "truncated.jpg", Image.fromarray(picture()), format="JPEG")
    summary, _ = run(pipe, [lib], output=out)
    assert (summary.captioned, summary.skipped, len(summary.failed)) == (1, 3, 3)
    records = read_jsonl(out)
    assert len(records) == 7  # exactly one record per image
    assert "caption" in next(r for r in records if r["path"].endswith("truncated.jpg"))


def test_half_written_last_line_is_repaired(pipe, tmp_path):
    make_library(tmp_path / "lib", 4)
    out = tmp_path / "c.jsonl"
    run(pipe, [tmp_path / "lib"], output=out)
    lines = out.read_bytes().split(b"\n")
    # A hard kill in the middle of the third record: records 1-2 complete, record 3 half written.
    out.write_bytes(lines[0] + b"\n" + lines[1] + b"\n" + lines[2][: len(lines[2]) // 2])
    summary, notes = run(pipe, [tmp_path / "lib"], output=out)
    assert (summary.captioned, summary.skipped) == (2, 2)
    assert any("half-written" in n for n in notes)
    records = read_jsonl(out)
    assert len(records) == 4 and len({r["path"] for r in records}) == 4
    # A whole record that only lacks its newline is kept.
    out.write_bytes(out.read_bytes()[:-1])
    summary, notes = run(no_model, [tmp_path / "lib"], output=out)
    assert summary.skipped == 4 and len(read_jsonl(out)) == 4


def test_killed_run_resumes(tmp_path):
    lib = tmp_path / "lib"
    make_library(lib, 40)
    out = tmp_path / "c.jsonl"
    cmd = [sys.executable, "-m", "mlx_blip2", "caption", str(lib), "-o", str(out), "--model", str(TINY),
           "--batch-size", "1", "--max-new-tokens", "30", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = out.read_bytes().count(b"\n")
    assert done >= 3
    with open(out, "ab") as f:  # and, to be sure, a torn last line
        f.write(b'{"path": "' + str(lib / "img39.png").encode() + b'", "capt')
    assert main(["caption", str(lib), "-o", str(out), "--model", str(TINY), "--max-new-tokens", "3",
                 "--num-beams", "1", "--quiet"]) == 0
    records = read_jsonl(out)
    assert sorted(r["path"] for r in records) == sorted(str(p) for p in lib.glob("*.png"))
    assert all("caption" in r for r in records)


def test_csv_records(pipe, tmp_path):
    make_library(tmp_path / "lib", 3)
    (tmp_path / "lib" / "bad.png").write_bytes(b"nope")
    out = tmp_path / "captions.csv"  # csv from the extension
    summary, _ = run(pipe, [tmp_path / "lib"], output=out)
    assert summary.captioned == 3 and summary.exit_code == 1
    import csv

    rows = list(csv.DictReader(out.open(newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 4
    assert all(os.path.isabs(r["path"]) for r in rows)
    assert [bool(r["error"]) for r in rows].count(True) == 1
    out.write_bytes(out.read_bytes()[:-7])  # torn last line
    summary, notes = run(pipe, [tmp_path / "lib"], output=out)
    assert summary.skipped >= 2 and any("half-written" in n for n in notes)
    rows = list(csv.DictReader(out.open(newline="")))
    assert len(rows) == 4 and len({r["path"] for r in rows}) == 4
    # An unrelated csv is not appended to.
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(library.UsageError, match="not a caption csv"):
        run(pipe, [tmp_path / "lib"], output=other)
    assert other.read_text() == "a,b\n1,2\n"


def test_records_to_stdout(pipe, tmp_path, capsys):
    paths = make_library(tmp_path, 2)
    run(pipe, paths, format="jsonl")
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["path"] for line in lines] == [str(p) for p in paths]


def test_record_writer_keeps_newest_record_per_image(tmp_path):
    out = tmp_path / "c.jsonl"
    image = ImageFile(str(tmp_path / "a.png"), "a.png", "a.png")
    w = RecordWriter("jsonl", "m", path=out)
    w.write(image, 1, 2.0, error="boom")
    w.write(image, 1, 2.0, caption="a cat")
    w.close()
    assert read_jsonl(out) == [{"path": image.path, "caption": "a cat", "model": "m", "size": 1, "mtime": 2.0}]
    w = RecordWriter("jsonl", "m", path=out)
    with pytest.raises(library.UsageError, match="another run"):  # one writer at a time
        RecordWriter("jsonl", "m", path=out)
    assert w.status(image, 1, 2.0, "skip")[0] == "skip" and w.status(image, 1, 3.0, "skip")[0] == "todo"
    assert w.status(image, 1, 2.0, "overwrite")[0] == "todo"
    w.close()


# --- sidecars ----------------------------------------------------------------------------------------------------


def test_txt_sidecars(pipe, tmp_path):
    paths = make_library(tmp_path, 3)
    hashes = [digest(p) for p in paths]
    summary, _ = run(pipe, [tmp_path], format="txt")
    assert summary.captioned == 3
    sidecars = [p.with_suffix(".txt") for p in paths]
    assert [s.read_text(encoding="utf-8").rstrip("\n") for s in sidecars] == \
        [pipe.caption(str(p), **FAST) for p in paths]
    sidecars[0].write_text("hand-written caption\n")
    summary, _ = run(no_model, [tmp_path], format="txt")  # the .txt files are not images; all three skipped
    assert (summary.skipped, summary.total) == (3, 3)
    assert sidecars[0].read_text() == "hand-written caption\n"
    summary, _ = run(pipe, [tmp_path], format="txt", existing="overwrite")
    assert summary.captioned == 3 and sidecars[0].read_text() != "hand-written caption\n"
    assert [digest(p) for p in paths] == hashes  # images are never modified
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # photo.png and photo.jpg would share photo.txt: one is captioned, the other reported.
    save(tmp_path / "pair" / "photo.png")
    save(tmp_path / "pair" / "photo.jpg")
    summary, _ = run(pipe, [tmp_path / "pair"], format="txt")
    assert summary.captioned == 1 and len(summary.failed) == 1 and "photo.txt" in summary.failed[0][1]


DARKTABLE_XMP = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:darktable="http://darktable.sf.net/"
   xmp:Rating="4"
   darktable:xmp_version="5">
   <!-- edited by hand -->
   <dc:subject>
    <rdf:Bag>
     <rdf:li>holiday</rdf:li>
     <rdf:li>beach &amp; sea</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <darktable:history>
    <rdf:Seq>
     <rdf:li darktable:operation="exposure" darktable:enabled="1" darktable:params="0000803f"/>
    </rdf:Seq>
   </darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""

LIGHTROOM_XMP = """<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="Adobe XMP Core 7.0">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:crs="http://ns.adobe.com/camera-raw-settings/1.0/"
    xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"
   crs:Exposure2012="+0.50" photoshop:City="Lisbon"/>
 </rdf:RDF>
</x:xmpmeta>
"""


def xmp_fields(data: bytes):
    """Every element and attribute except dc:description, for checking that nothing else changed."""
    root = ET.fromstring(data)
    inside = {id(x) for d in root.iter(f"{DC}description") for x in d.iter()}
    out = []
    for el in root.iter():
        attrs = sorted((k, v) for k, v in el.attrib.items() if k != f"{DC}description")
        if id(el) in inside:
            continue
        if el.tag == f"{RDF}Description" and attrs == [(f"{RDF}about", "")] and all(id(c) in inside for c in el):
            continue  # a block created just to hold the description
        out.append((el.tag, attrs, (el.text or "").strip()))
    return out


@pytest.mark.parametrize("naming", ["photo.jpg.xmp", "photo.xmp"])
def test_xmp_sidecars(pipe, tmp_path, naming):
    lib = tmp_path / "lib"
    fresh, darktable, lightroom, described, broken = (save(lib / f"{n}.jpg") for n in
                                                       ("fresh", "darktable", "lightroom", "described", "broken"))
    hashes = [digest(p) for p in (fresh, darktable, lightroom, described, broken)]

    def sidecar(p):
        return p.parent / (p.name + ".xmp" if naming == "photo.jpg.xmp" else p.stem + ".xmp")

    sidecar(darktable).write_text(DARKTABLE_XMP)
    sidecar(lightroom).write_text(LIGHTROOM_XMP)
    described_xmp = update_xmp(DARKTABLE_XMP.encode(), "written by a person")
    sidecar(described).write_bytes(described_xmp)
    sidecar(broken).write_text("<x:xmpmeta><rdf:RDF>")
    summary, _ = run(pipe, [lib], format="xmp", xmp_name=naming)
    assert summary.captioned == 3 and summary.skipped == 1 and summary.exit_code == 1
    assert [os.path.basename(d) for d, _ in summary.failed] == ["broken.jpg"]
    assert sidecar(broken).read_text() == "<x:xmpmeta><rdf:RDF>"  # left untouched
    assert sidecar(described).read_bytes() == described_xmp  # a caption someone wrote is kept
    expected = {p: pipe.caption(str(p), **FAST) for p in (fresh, darktable, lightroom)}
    for p, caption in expected.items():
        assert xmp_description(sidecar(p).read_bytes()) == library.xml_text(caption)
    # Updated in place: every other field, and the text around them, is still there.
    for p, original in ((darktable, DARKTABLE_XMP), (lightroom, LIGHTROOM_XMP)):
        new = sidecar(p).read_text()
        assert xmp_fields(new.encode()) == xmp_fields(original.encode())
        assert "<!-- edited by hand -->" in new or p is lightroom
        if p is darktable:
            assert new.startswith(DARKTABLE_XMP.split("<dc:subject>")[0].rstrip().split("<!--")[0].rstrip())
    # overwrite replaces the description and still keeps the rest.
    summary, _ = run(pipe, [described], format="xmp", xmp_name=naming, existing="overwrite")
    assert summary.captioned == 1
    assert xmp_description(sidecar(described).read_bytes()) == library.xml_text(pipe.caption(str(described), **FAST))
    assert xmp_fields(sidecar(described).read_bytes()) == xmp_fields(DARKTABLE_XMP.encode())
    assert [digest(p) for p in (fresh, darktable, lightroom, described, broken)] == hashes


def test_update_xmp_edge_cases():
    ns = 'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"'
    dc = 'xmlns:dc="http://purl.org/dc/elements/1.1/"'
    cases = [
        f'<rdf:RDF {ns}/>',  # no description block at all
        f'<rdf:RDF {ns}><rdf:Description rdf:about=""/></rdf:RDF>',  # self-closing block, no dc namespace
        f'<rdf:RDF {ns}><rdf:Description rdf:about="" {dc} dc:description="old" dc:format="image/jpeg"/></rdf:RDF>',
        f'<rdf:RDF {ns}><rdf:Description {dc}><dc:description/></rdf:Description></rdf:RDF>',
        (f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
         f'<rdf:RDF {ns}><rdf:Description {dc}><dc:description><rdf:Alt><rdf:li xml:lang="x-default">old</rdf:li>'
         f'<rdf:li xml:lang="de">alt</rdf:li></rdf:Alt></dc:description></rdf:Description></rdf:RDF></x:xmpmeta>'
         f'<?xpacket end="w"?>'),
    ]
    caption = 'a "cat" & <dog>\x0f\r\nend'
    for case in cases:
        out = update_xmp(case.encode(), caption)
        assert xmp_description(out) == 'a "cat" & <dog>\nend'
        assert xmp_fields(out) == xmp_fields(case.encode())
        assert out.count(b"description") == 2  # one element, no attribute left over
    assert update_xmp(cases[-1].encode(), "new").startswith('<?xpacket begin="\ufeff"'.encode())
    assert xmp_description(update_xmp(None, "fresh")) == "fresh"
    for bad in (b"<not-xml", b"<a>no rdf</a>", "<rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>"
                                               "\udcff</rdf:RDF>".encode("utf-8", "surrogateescape")):
        with pytest.raises(XmpError):
            update_xmp(bad, "x")


# --- command line ------------------------------------------------------------------------------------------------


def test_cli_exit_codes_and_summary(tmp_path, capsys):
    lib = tmp_path / "lib"
    make_library(lib, 2)
    out = tmp_path / "c.jsonl"
    args = ["--model", str(TINY), "--max-new-tokens", "3", "--num-beams", "1"]
    assert main(["caption", str(lib), "-o", str(out), *args]) == 0
    err = capsys.readouterr().err
    assert "captioned 2, skipped 0, failed 0 of 2 images" in err and "\r" not in err  # no progress bar off a tty
    (lib / "bad.webp").write_bytes(b"RIFF")
    assert main(["caption", str(lib), "-o", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert "captioned 0, skipped 2, failed 1 of 3 images" in err and "failed: " in err and "bad.webp" in err
    assert main(["caption", str(lib), "-o", str(out), "-q", *args]) == 1
    err = capsys.readouterr().err
    assert "captioned" not in err and "bad.webp" in err  # quiet: failures only
    # Usage errors: exit status 2, nothing written.
    for usage in (["caption", str(tmp_path / "missing"), *args],
                  ["caption", str(lib), "--format", "xmp", "-o", str(out), *args],
                  ["caption", str(lib), "--batch-size", "0", *args]):
        assert main(usage) == 2
        assert "error:" in capsys.readouterr().err
    for usage in (["caption", str(lib), "--shard", "3/2"], ["caption", str(lib), "--format", "html"],
                  ["caption", str(lib), "-o", str(out), "--model", str(TINY), "--max-new-tokens", "0"]):
        with pytest.raises(SystemExit) as e:
            main(usage)
        assert e.value.code == 2
    assert len(read_jsonl(out)) == 3
    # Nothing to caption is not an error.
    (tmp_path / "empty").mkdir()
    assert main(["caption", str(tmp_path / "empty"), *args]) == 0
    assert "no images found" in capsys.readouterr().err


def test_progress_bar_and_summary():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    bar = Progress(10, stream=tty)
    assert bar.enabled
    bar.bar.start_t -= 2.0  # two seconds in
    bar.update(4, failed=1, force=True)
    text = tty.getvalue()
    assert "4/10" in text and "images/s" in text and "ETA 00:03" in text and "1 failed" in text
    bar.close()
    pipe_stream = io.StringIO()
    quiet = Progress(10, stream=pipe_stream)
    quiet.update(5, force=True)
    assert not quiet.enabled and pipe_stream.getvalue() == ""
    summary = Summary(total=5, captioned=3, skipped=1, failed=[("x.jpg", "boom")], seconds=1.5)
    assert summary.line() == "captioned 3, skipped 1, failed 1 of 5 images in 0:02, 2.00 images/s"
    assert summary.exit_code == 1 and Summary(total=1, captioned=1).exit_code == 0


def test_caption_files_api(pipe, tmp_path):
    """The lower-level API: files and a writer of your own."""
    paths = make_library(tmp_path, 3)
    files = discover(paths)
    got = []

    class Collect(library.Writer):
        def __init__(self):
            self.notes = []

        def write(self, image, size, mtime, caption=None, error=None):
            got.append((image.display, caption, error))

    summary = caption_files(pipe, files, Collect(), batch_size=2, generate_kwargs=FAST)
    assert summary.captioned == 3 and [g[0] for g in got] == [str(p) for p in paths]


def test_missing_heif_plugin_is_explained(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "HEIF_SUPPORTED", False)
    (tmp_path / "x.heic").write_bytes(b"\x00\x00\x00\x18ftypheic not really")
    with pytest.raises(images.ImageLoadError, match="pip install pillow-heif"):
        decode(str(tmp_path / "x.heic"), pipe)


def test_generated_library_end_to_end(pipe, tmp_path):
    """Names with spaces and accents, a 6000x4000 photo, alpha, CMYK, EXIF, fake and empty files: one record each."""
    lib = tmp_path / "Photos été 2024"
    good = [
        save(lib / "à la plage (1).jpg"),
        save(lib / "sub dir" / "ünïcödé näme.png", Image.fromarray(picture()).convert("RGBA")),
        save(lib / "sub dir" / "cmyk photo.JPG", Image.fromarray(picture()).convert("CMYK")),
        save(lib / "big 6000x4000.jpg",
             Image.fromarray(np.kron(picture(60, 40), np.ones((100, 100, 1), np.uint8))), quality=70),
    ]
    exif = Image.Exif()
    exif[0x0112] = 6
    good.append(save(lib / "rotated ↻.jpg", exif=exif))
    bad = [lib / "empty.png", lib / "fake photo.gif"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(b"this is text, not a GIF")
    (lib / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / "captions.jsonl"
    summary, _ = run(pipe, [lib], output=out, recursive=True)
    records = read_jsonl(out)
    assert sorted(r["path"] for r in records) == sorted(str(p.resolve()) for p in good + bad)
    assert {r["path"] for r in records if "caption" in r} == {str(p.resolve()) for p in good}
    assert {r["path"] for r in records if "error" in r} == {str(p.resolve()) for p in bad}
    assert summary.captioned == len(good) and len(summary.failed) == len(bad) and summary.exit_code == 1


# --- file names that are not valid UTF-8 -------------------------------------------------------------------------


def non_utf8_library(root):
    """Two good images whose names are not valid UTF-8 (Latin-1 bytes, as old cameras and Windows shares write), one
    bad one, and an ordinary one. Returns the exact paths (str, surrogate-escaped)."""
    root.mkdir(parents=True, exist_ok=True)
    raw = os.fsencode(root)
    paths = []
    for i, name in enumerate([b"caf\xe9.png", b"\xff\xfe odd.png", b"plain.png"]):
        path = os.fsdecode(raw + b"/" + name)
        Image.fromarray(picture(seed=i)).save(path, format="PNG")
        paths.append(path)
    bad = os.fsdecode(raw + b"/broken \xe9.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    return paths, bad


def exact_path(record):
    if "path_b64" in record:
        return os.fsdecode(base64.b64decode(record["path_b64"]))
    return record["path"]


def test_non_utf8_names_give_valid_utf8_jsonl_that_identifies_the_file(pipe, tmp_path):
    try:
        paths, bad = non_utf8_library(tmp_path / "lib")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not take names that are not UTF-8")
    out = tmp_path / "c.jsonl"
    summary, _ = run(pipe, [tmp_path / "lib"], output=out)
    assert summary.captioned == 3 and len(summary.failed) == 1
    text = out.read_bytes().decode("utf-8")  # valid UTF-8, for every tool
    assert "\\ud" not in text  # no lone surrogates escaped as JSON \\udcxx (other tools show them as U+FFFD)
    records = [json.loads(line) for line in text.splitlines()]
    assert sorted(exact_path(r) for r in records) == sorted(paths + [bad])
    for r in records:
        r["path"].encode("utf-8")
        assert r["path"] == display_path(exact_path(r))
        assert ("path_b64" in r) == (os.path.basename(exact_path(r)) != "plain.png")
    assert "\ufffd" in next(r for r in records if exact_path(r) == bad)["error"]
    # Resuming recognises the records: nothing is captioned twice.
    summary, _ = run(pipe, [tmp_path / "lib"], output=out)
    assert (summary.captioned, summary.skipped, len(summary.failed)) == (0, 3, 1)
    assert len(read_jsonl(out)) == 4


def test_non_utf8_names_give_valid_utf8_csv(pipe, tmp_path, capsys):
    import csv

    try:
        paths, bad = non_utf8_library(tmp_path / "lib")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not take names that are not UTF-8")
    out = tmp_path / "c.csv"
    summary, _ = run(pipe, [tmp_path / "lib"], output=out)
    assert summary.captioned == 3
    rows = list(csv.DictReader(io.StringIO(out.read_bytes().decode("utf-8"), newline="")))  # valid UTF-8
    assert tuple(rows[0]) == CSV_COLUMNS
    assert sorted(exact_path({k: v for k, v in r.items() if v}) for r in rows) == sorted(paths + [bad])
    summary, _ = run(pipe, [tmp_path / "lib"], output=out)
    assert (summary.captioned, summary.skipped) == (0, 3)
    # Printed captions and the failure list are valid text too.
    summary, _ = run(pipe, [tmp_path / "lib"])
    printed = capsys.readouterr().out
    printed.encode("utf-8")
    assert display_path(paths[0]) in printed
    assert all(display.encode("utf-8") and error.encode("utf-8") for display, error in summary.failed)


def test_csv_written_before_path_b64_is_resumed_and_upgraded(pipe, tmp_path):
    import csv

    paths = make_library(tmp_path / "lib", 2)
    legacy = tmp_path / "old.csv"
    st = os.stat(paths[0])
    legacy.write_text("path,caption,error,model,prompt,size,mtime\n"
                      f"{paths[0]},an old caption,,m,,{st.st_size},{st.st_mtime}\n")
    summary, _ = run(pipe, [tmp_path / "lib"], output=legacy)
    assert (summary.captioned, summary.skipped) == (1, 1)
    rows = list(csv.DictReader(legacy.open(newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 2
    assert rows[0]["caption"] == "an old caption"


# --- XMP: other languages of the description ---------------------------------------------------------------------

MULTILINGUAL_XMP = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">
   <dc:description>
    <rdf:Alt>
     <rdf:li xml:lang="x-default">an old caption</rdf:li>
     <rdf:li xml:lang="de-DE">Ein Hund am Strand</rdf:li>
     <rdf:li xml:lang="fr-FR">Un chien &amp; la plage</rdf:li>
    </rdf:Alt>
   </dc:description>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def languages(data: bytes) -> dict:
    root = ET.fromstring(data)
    return {li.get("{http://www.w3.org/XML/1998/namespace}lang"): li.text
            for d in root.iter(f"{DC}description") for li in d.iter(f"{RDF}li")}


def test_xmp_overwrite_keeps_the_other_languages(pipe, tmp_path):
    photo = save(tmp_path / "photo.jpg")
    sidecar = tmp_path / "photo.jpg.xmp"
    sidecar.write_text(MULTILINGUAL_XMP)
    args = ["--model", str(TINY), "--max-new-tokens", "3", "--num-beams", "1", "-q"]
    assert main(["caption", str(photo), "--format", "xmp", *args]) == 0
    assert sidecar.read_text() == MULTILINGUAL_XMP  # skip: it has a description
    assert main(["caption", str(photo), "--format", "xmp", "--existing", "overwrite", *args]) == 0
    caption = library.xml_text(pipe.caption(str(photo), max_new_tokens=3, num_beams=1))
    new = sidecar.read_bytes()
    assert languages(new) == {"x-default": caption, "de-DE": "Ein Hund am Strand", "fr-FR": "Un chien & la plage"}
    # Only the x-default text changed, byte for byte.
    from xml.sax.saxutils import escape

    assert new.decode() == MULTILINGUAL_XMP.replace(">an old caption<", f">{escape(caption)}<")


def test_update_xmp_adds_x_default_beside_other_languages():
    ns = ('xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" xmlns:dc="http://purl.org/dc/elements/1.1/"')
    only_german = (f'<rdf:RDF {ns}><rdf:Description><dc:description>\n <rdf:Alt>\n  <rdf:li xml:lang="de">alt</rdf:li>'
                   f'\n </rdf:Alt>\n</dc:description></rdf:Description></rdf:RDF>')
    out = update_xmp(only_german.encode(), "new")
    assert languages(out) == {"x-default": "new", "de": "alt"} and xmp_description(out) == "new"
    assert b'<rdf:li xml:lang="x-default">new</rdf:li>\n  <rdf:li xml:lang="de">alt</rdf:li>' in out
    empty_default = only_german.replace('<rdf:li xml:lang="de">alt</rdf:li>',
                                        '<rdf:li xml:lang="x-default"/><rdf:li xml:lang="de">alt</rdf:li>')
    assert languages(update_xmp(empty_default.encode(), "new")) == {"x-default": "new", "de": "alt"}
    twice = update_xmp(update_xmp(only_german.encode(), "one"), "two")
    assert languages(twice) == {"x-default": "two", "de": "alt"}


# --- checkpoints -------------------------------------------------------------------------------------------------


def test_caption_with_a_retrieval_checkpoint_is_a_clear_usage_error(tmp_path, capsys):
    photo = save(tmp_path / "photo.png")
    assert main(["caption", str(photo), "--model", str(FIXTURES / "tiny-blip2-itm")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'caption' needs a captioning checkpoint" in err
    assert "retrieval" in err and "Traceback" not in err


def test_raw_files_are_captioned_from_their_preview_and_pairs_once(pipe, tmp_path):
    from raw_files import write_dng
    from reference_cases import make_images

    from mlx_blip2.images import open_image

    lib = tmp_path / "raw"
    lib.mkdir()
    preview = np.asarray(make_images()[0].resize((64, 48)))
    write_dng(lib / "alone.dng", preview)
    write_dng(lib / "pair.dng", preview)
    Image.fromarray(preview).save(lib / "pair.jpg", quality=95)
    write_dng(lib / "nopreview.dng", None)
    (lib / "corrupt.nef").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    out = tmp_path / "raw.jsonl"
    summary, _ = run(pipe, [lib], output=out)
    records = {os.path.basename(r["path"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == ["alone.dng", "corrupt.nef", "nopreview.dng", "pair.jpg"]
    assert records["pair.jpg"]["raw"] == str(lib / "pair.dng") and "caption" in records["pair.jpg"]
    assert records["alone.dng"]["caption"] == pipe.caption(open_image(lib / "alone.dng"), **FAST)
    assert "preview" in records["nopreview.dng"]["error"] or "RAW" in records["nopreview.dng"]["error"]
    assert "not a readable RAW file" in records["corrupt.nef"]["error"]
    assert summary.exit_code == 1 and len(summary.failed) == 2

