"""Sidecar outputs: a ``.txt`` caption or an XMP ``dc:description`` next to each image (images are never touched).

Sidecars are replaced atomically; an existing XMP sidecar is edited in place (:mod:`.xmp`), keeping every other
field. Images whose sidecar another image already claims (photo.jpg and photo.png -> photo.txt) are reported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from ..files import ImageFile, display_path
from .atomic import atomic_write
from .writer import FAIL, SKIP, TODO, Writer
from .xmp import XmpError, update_xmp, xmp_description

XMP_NAMES = ("photo.jpg.xmp", "photo.xmp")  # digiKam/darktable, Lightroom


def txt_sidecar(path: str) -> str:
    return os.path.splitext(path)[0] + ".txt"


def xmp_sidecar(path: str, naming: str = XMP_NAMES[0]) -> str:
    if naming not in XMP_NAMES:
        raise ValueError(f"xmp naming must be one of {XMP_NAMES}, got {naming!r}")
    return path + ".xmp" if naming == "photo.jpg.xmp" else os.path.splitext(path)[0] + ".xmp"


class SidecarWriter(Writer):
    """A ``.txt`` or XMP sidecar next to each image."""

    def __init__(self, fmt: str, xmp_name: str = XMP_NAMES[0], conflicts: dict[str, str] | None = None):
        if fmt not in ("txt", "xmp"):
            raise ValueError(f"sidecars are txt or xmp, got {fmt!r}")
        self.fmt, self.xmp_name = fmt, xmp_name
        self.conflicts = conflicts or {}
        self.notes: list[str] = []

    def sidecar(self, path: str) -> str:
        return txt_sidecar(path) if self.fmt == "txt" else xmp_sidecar(path, self.xmp_name)

    def status(self, image, size, mtime, existing):
        if image.path in self.conflicts:
            return FAIL, self.conflicts[image.path]
        sidecar = self.sidecar(image.path)
        try:
            with open(sidecar, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return TODO, None
        except OSError as e:
            return FAIL, f"cannot read sidecar '{display_path(sidecar)}': {e.strerror or e}"
        if self.fmt == "txt":
            return (SKIP, None) if existing == "skip" and data.strip() else (TODO, None)
        if not data.strip():
            return TODO, None
        try:
            described = xmp_description(data, default_only=True) is not None
        except XmpError as e:
            return FAIL, f"existing sidecar '{display_path(sidecar)}' left untouched: {e}"
        return (SKIP, None) if existing == "skip" and described else (TODO, None)

    def write(self, image, size, mtime, caption=None, error=None):
        if caption is None:
            return None
        sidecar = self.sidecar(image.path)
        try:
            if self.fmt == "txt":
                atomic_write(sidecar, (caption + "\n").encode("utf-8"))
            else:
                try:
                    with open(sidecar, "rb") as f:
                        old = f.read()
                except FileNotFoundError:
                    old = None
                atomic_write(sidecar, update_xmp(old, caption))
        except XmpError as e:
            return f"existing sidecar '{display_path(sidecar)}' left untouched: {e}"
        except OSError as e:
            return f"cannot write sidecar '{display_path(sidecar)}': {e.strerror or e}"
        return None


def sidecar_conflicts(files: Sequence[ImageFile], sidecar: Callable[[str], str]) -> dict[str, str]:
    """Images whose sidecar another image (earlier in ``files``) already claims, e.g. photo.jpg and photo.png both
    mapping to photo.txt. Decided on the whole list, before sharding, so that every machine agrees."""
    owner: dict[str, ImageFile] = {}
    conflicts = {}
    for f in files:
        s = os.path.normcase(sidecar(f.path))
        if s in owner:
            conflicts[f.path] = (f"its sidecar '{display_path(sidecar(f.path))}' belongs to "
                                 f"'{display_path(owner[s].display)}'")
        else:
            owner[s] = f
    return conflicts


def sidecar_writer(fmt: str, xmp_name: str, files: Sequence[ImageFile]) -> SidecarWriter:
    """The sidecar output of a run over ``files``, knowing which of them claim another's sidecar."""
    writer = SidecarWriter(fmt, xmp_name)
    writer.conflicts = sidecar_conflicts(files, writer.sidecar)
    return writer
