"""One way to open an image (images.py) and one way to find files (files.py)."""

import io
import os

import numpy as np
import pytest
from PIL import Image
from reference_cases import make_images

from mlx_blip2.files import display_path, find_images
from mlx_blip2.images import (IMAGE_EXTENSIONS, ImageLoadError, ImageTooLargeError, available_formats, is_image_path,
                              open_image)


def jpeg_bytes(image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def test_paths_bytes_pil_and_arrays_open_alike(tmp_path):
    image = make_images()[0]
    path = tmp_path / "a.png"
    image.save(path)
    from_path, from_bytes = open_image(path), open_image(path.read_bytes())
    assert from_path.mode == from_bytes.mode == "RGB"
    assert np.array_equal(np.asarray(from_path), np.asarray(from_bytes))
    assert np.array_equal(np.asarray(open_image(image)), np.asarray(from_path))
    assert np.array_equal(np.asarray(open_image(np.asarray(image))), np.asarray(from_path))


def test_exif_orientation_is_applied_to_files_and_bytes(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = jpeg_bytes(image, exif=exif)
    (tmp_path / "r.jpg").write_bytes(data)
    assert open_image(data).size == (20, 40)
    assert open_image(tmp_path / "r.jpg").size == (20, 40)


def test_limits_are_enforced_before_decoding(tmp_path):
    data = jpeg_bytes(Image.new("RGB", (300, 200)))
    with pytest.raises(ImageTooLargeError, match="limit"):
        open_image(data, max_bytes=100)
    with pytest.raises(ImageTooLargeError, match="megapixels"):
        open_image(data, max_pixels=1000)
    (tmp_path / "big.jpg").write_bytes(data)
    with pytest.raises(ImageTooLargeError, match="big.jpg"):
        open_image(tmp_path / "big.jpg", max_pixels=1000)
    assert open_image(data, max_bytes=len(data), max_pixels=300 * 200).size == (300, 200)


def test_bad_input_names_what_is_wrong(tmp_path):
    with pytest.raises(ImageLoadError, match="empty"):
        open_image(b"")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.jpg.*empty"):
        open_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageLoadError, match="upload.*not an image"):
        open_image(b"<html></html>", name="upload")
    # A format outside the one list (an EPS file would run Ghostscript) is refused, not decoded.
    with pytest.raises(ImageLoadError, match="not an image in a supported format"):
        open_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    data = jpeg_bytes(make_images()[2])
    truncated = data[:len(data) // 2]
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        open_image(truncated)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        open_image(tmp_path / "nope.png")


def test_one_format_list():
    assert {".heic", ".heif", ".avif", ".jpg", ".png", ".webp", ".tiff"} <= IMAGE_EXTENSIONS
    assert is_image_path("IMG_0001.HEIC") and not is_image_path("notes.txt")
    assert "JPEG" in available_formats() and "EPS" not in available_formats()


def make_tree(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    for rel in ("b.jpg", "a.png", "sub/c.heic", "sub/deeper/d.avif", "notes.txt", ".hidden.jpg", "._a.png"):
        (root / rel).write_bytes(b"x")
    (root / ".cache").mkdir()
    (root / ".cache" / "e.jpg").write_bytes(b"x")


def test_find_images_recursion_hidden_and_appledouble(tmp_path):
    make_tree(tmp_path)
    flat = find_images([tmp_path])
    assert [f.key for f in flat.files] == ["a.png", "b.jpg"] and flat.ignored == 1
    deep = find_images([tmp_path], recursive=True)
    assert [f.key for f in deep.files] == ["a.png", "b.jpg", "sub/c.heic", "sub/deeper/d.avif"]
    assert deep.in_scope(str(tmp_path / "sub" / "gone.jpg")) and not flat.in_scope(str(tmp_path / "sub" / "x.jpg"))
    named = find_images([tmp_path / "b.jpg", tmp_path / "a.png", tmp_path / "b.jpg"])
    assert [f.display for f in named.files] == [str(tmp_path / "b.jpg"), str(tmp_path / "a.png")]
    with pytest.raises(FileNotFoundError, match="missing"):
        find_images([tmp_path / "missing"])


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path):
    lib = tmp_path / "lib"
    make_tree(lib)
    os.symlink(lib, lib / "sub" / "loop")  # a link back up the tree
    other = tmp_path / "other"
    other.mkdir()
    (other / "z.jpg").write_bytes(b"x")
    os.symlink(other, lib / "linked")
    keys = [f.key for f in find_images([lib], recursive=True).files]
    assert keys == ["a.png", "b.jpg", "linked/z.jpg", "sub/c.heic", "sub/deeper/d.avif"]


def test_names_that_are_not_utf8_round_trip(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9.jpg"  # Latin-1 bytes: not valid UTF-8
    with open(raw, "wb") as f:
        f.write(jpeg_bytes(make_images()[0]))
    (found,) = find_images([tmp_path]).files
    assert os.fsencode(found.path) == raw
    assert display_path(found.path).endswith("caf\ufffd.jpg")
    display_path(found.path).encode("utf-8")  # valid UTF-8 for people and tools
    assert open_image(found.path).size == make_images()[0].size


# --- RAW files ---------------------------------------------------------------------------------------------------


def test_raw_files_open_through_their_embedded_preview(tmp_path):
    from raw_files import write_dng

    preview = np.asarray(make_images()[1])
    write_dng(tmp_path / "IMG_1.DNG", preview)
    assert np.array_equal(np.asarray(open_image(tmp_path / "IMG_1.DNG")), preview)
    write_dng(tmp_path / "bare.dng", None)
    with pytest.raises(ImageLoadError, match="bare.dng.*(no embedded preview|not a readable RAW)"):
        open_image(tmp_path / "bare.dng")
    (tmp_path / "broken.nef").write_bytes(b"II*\x00" + os.urandom(2000))
    with pytest.raises(ImageLoadError, match="broken.nef.*not a readable RAW file"):
        open_image(tmp_path / "broken.nef")


def test_a_raw_beside_its_jpeg_is_one_image(tmp_path):
    for name in ("IMG_2.CR2", "IMG_2.JPG", "IMG_3.nef", "IMG_4.ARW", "IMG_4.heic"):
        (tmp_path / name).write_bytes(b"x")
    files = find_images([tmp_path]).files
    assert [(f.key, f.raw and os.path.basename(f.raw)) for f in files] == [
        ("IMG_2.JPG", "IMG_2.CR2"), ("IMG_3.nef", None), ("IMG_4.heic", "IMG_4.ARW")]
    # Named explicitly, a RAW is read even when its JPEG exists.
    assert [f.key for f in find_images([tmp_path / "IMG_2.CR2"]).files] == ["IMG_2.CR2"]
