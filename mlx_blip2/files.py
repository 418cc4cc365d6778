"""One way to find image files under the paths a user gives (``caption`` and ``index`` both use it).

Rules: folder contents are sorted, file arguments kept in the order given, each file found once. Hidden files and
folders are skipped, macOS AppleDouble ``._photo.jpg`` files included (they carry an image extension but are not
images). Symlinked folders are followed, once each: a link back up the tree (a loop) is not entered again. Names
that are not valid UTF-8 are kept exactly as the file system gives them (``os.fsdecode``'s surrogate escapes);
:func:`display_path` shows them in valid UTF-8. A RAW file with a JPEG or HEIC of the same name beside it (the
camera's RAW+JPEG pair) is one image: the JPEG, with the RAW named in ``ImageFile.raw``.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

# The extensions that select a file as an image (the formats mlx_blip2.images decodes). They live here, not beside
# the decoder, so that finding files (and every --help) needs neither Pillow nor numpy.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif",  # JPEG
    ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".heic", ".heif", ".hif",  # HEIF (pillow-heif)
    ".avif",  # AVIF (Pillow >= 11.3)
    ".cr2", ".cr3", ".nef", ".arw", ".dng", ".raf", ".orf", ".rw2",  # RAW: the embedded preview (rawpy)
})
RAW_EXTENSIONS = frozenset({".cr2", ".cr3", ".nef", ".arw", ".dng", ".raf", ".orf", ".rw2"})


def is_image_path(path: str | os.PathLike) -> bool:
    return os.path.splitext(os.fsdecode(path))[1].lower() in IMAGE_EXTENSIONS


def is_raw_path(path: str | os.PathLike) -> bool:
    return os.path.splitext(os.fsdecode(path))[1].lower() in RAW_EXTENSIONS


DEVELOPED_EXTENSIONS = (".jpg", ".jpeg", ".heic", ".heif", ".hif")  # preferred over a RAW of the same stem


@dataclass(frozen=True)
class ImageFile:
    path: str  # absolute; os.fsencode(path) gives the file system's bytes back
    display: str  # as the user would write it (the argument, joined with the part found below it)
    key: str  # shard key: the path below the folder argument it was found in (the name for file arguments)
    raw: str | None = None  # the RAW file this JPEG/HEIC was developed from (same folder, same name)


@dataclass
class FoundFiles:
    files: list[ImageFile] = field(default_factory=list)
    ignored: int = 0  # files without an image extension (caption sidecars not counted: they belong to an image)
    roots: list[str] = field(default_factory=list)  # absolute folder arguments
    named: set[str] = field(default_factory=set)  # absolute file arguments
    recursive: bool = False

    def in_scope(self, path: str) -> bool:
        """Whether ``path`` lies in what was searched (for removing entries of deleted files)."""
        if path in self.named:
            return True
        parent = os.path.dirname(path)
        return any(parent == r or (self.recursive and path.startswith(r.rstrip(os.sep) + os.sep)) for r in self.roots)


def is_hidden(name: str) -> bool:
    return name.startswith(".")  # dot files, and AppleDouble "._name" resource forks


def display_path(path: str) -> str:
    """A path as valid UTF-8 text: undecodable bytes shown as U+FFFD (for people; records keep the exact path)."""
    return os.fsencode(path).decode("utf-8", "replace")


def utf8_text(text: str) -> str:
    """``text`` as valid UTF-8 (a caption, an error quoting a file name): undecodable bytes become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def path_fields(path: str) -> dict[str, str]:
    """A path for records and JSON: ``{"path": ...}`` as valid UTF-8 text, plus ``path_b64`` (base64 of the exact
    bytes) when the name is not valid UTF-8."""
    shown = display_path(path)
    if shown == path:
        return {"path": path}
    return {"path": shown, "path_b64": base64.b64encode(os.fsencode(path)).decode("ascii")}


def _walk(top: str, recursive: bool):
    """(folder, sorted file names) under ``top``, following symlinked folders once each."""
    seen: set[tuple[int, int]] = set()
    for root, dirs, names in os.walk(top, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: a loop or a second route
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not is_hidden(d)) if recursive else []
        yield root, sorted(names)


def _pairs(names: list[str]) -> tuple[dict[str, str], set[str]]:
    """RAW+JPEG pairs in one folder: (developed name -> RAW name, RAW names to skip)."""
    developed = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() in DEVELOPED_EXTENSIONS:
            developed.setdefault(stem.lower(), name)
    pairs = {}
    for name in names:
        stem = os.path.splitext(name)[0].lower()
        if is_raw_path(name) and stem in developed:
            pairs[developed[stem]] = name
    return pairs, set(pairs.values())


SIDECAR_EXTENSIONS = (".txt", ".xmp")  # captions beside an image: photo.txt, photo.xmp, photo.jpg.xmp


def _sidecars(names: list[str]) -> set[str]:
    """The caption sidecars among one folder's file names: a .txt or .xmp named after an image there."""
    stems = {os.path.splitext(n)[0].lower() for n in names if is_image_path(n)}
    images = {n.lower() for n in names if is_image_path(n)}
    return {n for n in names if os.path.splitext(n)[1].lower() in SIDECAR_EXTENSIONS
            and (os.path.splitext(n)[0].lower() in stems or os.path.splitext(n)[0].lower() in images)}


def find_images(inputs: Iterable[str | os.PathLike], recursive: bool = False, missing: str = "raise") -> FoundFiles:
    """The images among ``inputs`` (files and folders). A missing input raises FileNotFoundError; with
    ``missing="keep"`` it is listed as a file (reading it then fails: a batch job reports it and goes on) unless
    every input is missing (nothing to do but a mistake to report)."""
    found = FoundFiles(recursive=recursive)
    index: dict[str, ImageFile] = {}

    def add(path: str, key: str, raw: str | None = None) -> None:
        absolute = os.path.abspath(path)
        if absolute not in index:
            index[absolute] = ImageFile(absolute, path, key, raw and os.path.abspath(raw))

    for arg in map(os.fspath, inputs):
        arg = os.fsdecode(arg)
        if os.path.isdir(arg):
            found.roots.append(os.path.abspath(arg))
            for root, names in _walk(arg, recursive):
                pairs, paired_raws = _pairs(names)
                sidecars = _sidecars(names)
                for name in names:
                    path = os.path.join(root, name)
                    if is_hidden(name) or name in paired_raws or not os.path.isfile(path):
                        continue
                    if not is_image_path(name):
                        found.ignored += name not in sidecars
                        continue
                    raw = os.path.join(root, pairs[name]) if name in pairs else None
                    add(path, Path(os.path.relpath(path, arg)).as_posix(), raw)
        elif os.path.isfile(arg):
            found.named.add(os.path.abspath(arg))
            if is_image_path(arg):
                add(arg, os.path.basename(arg))
            else:
                found.ignored += 1
        elif missing == "keep":
            add(arg, os.path.basename(arg))
        else:
            raise FileNotFoundError(f"no such file or folder: '{display_path(arg)}'")
    found.files = list(index.values())
    if missing == "keep" and found.files and not (found.roots or found.named):
        first = found.files[0].display
        raise FileNotFoundError(f"no such file or folder: '{display_path(first)}'")
    return found
