"""Captions for the search page: from caption runs' outputs (``mlx-blip2 caption -o captions.jsonl`` / ``.csv``),
else from the sidecars beside each photo (``photo.txt``; the ``x-default`` ``dc:description`` of ``photo.jpg.xmp``
or ``photo.xmp``), when present.

Records name their image by ``path`` (``path_b64`` holds the exact bytes of a name that is not UTF-8:
:func:`mlx_blip2.library.records.record_path`); relative paths are taken from the record file's folder. A record
file is read again when it changes (checked at most every :data:`RELOAD_SECONDS`); with several files the later
ones win. Sidecars are read per request, small ones only, and only when ``allowed(path)`` (the page's own check that
a file lies in the library) says so.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
import time
from typing import Callable, Sequence

from ..library.records import parse_json, record_path
from ..library.sidecars import XMP_NAMES, txt_sidecar, xmp_sidecar
from ..library.xmp import XmpError, xmp_description

log = logging.getLogger("mlx_blip2.server")

RELOAD_SECONDS = 2.0
MAX_SIDECAR_BYTES = 1 << 20
MAX_CAPTION_CHARS = 1000


def _clean(text) -> str | None:
    if not isinstance(text, str):
        return None
    text = " ".join(text.split())
    return text[:MAX_CAPTION_CHARS] or None


def read_records(path: str) -> dict[str, str]:
    """exact image path -> caption, from one jsonl or csv caption output (the last record of an image wins)."""
    with open(path, "rb") as f:
        data = f.read()
    folder = os.path.dirname(os.path.abspath(path))
    if path.lower().endswith(".csv"):
        text = data.decode("utf-8", "surrogateescape")
        records = [r for r in csv.DictReader(io.StringIO(text, newline="")) if r.get("path")]
        records = [{k: v for k, v in r.items() if v not in (None, "")} for r in records]
    else:
        records = [r for line in data.split(b"\n") if line.strip() and (r := parse_json(line)) is not None]
    out: dict[str, str] = {}
    for record in records:
        caption = _clean(record.get("caption"))
        if caption is None:
            continue
        image = record_path(record)
        out[image if os.path.isabs(image) else os.path.normpath(os.path.join(folder, image))] = caption
    return out


class CaptionLookup:
    """``caption(path)``: the caption to show for an indexed image, or None."""

    def __init__(self, record_files: Sequence[str | os.PathLike] = (), sidecars: bool = True,
                 allowed: Callable[[str], bool] | None = None):
        self.files = [os.fspath(f) for f in record_files]
        for f in self.files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"no caption file '{f}'")
        self.sidecars, self.allowed = sidecars, allowed
        self._stamps: dict[str, tuple[int, int]] = {}
        self._records: dict[str, dict[str, str]] = {}
        self._checked = 0.0
        self._lock = threading.Lock()
        self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_SECONDS:
            return
        with self._lock:
            self._checked = now
            for f in self.files:
                try:
                    st = os.stat(f)
                except OSError:
                    continue
                stamp = (st.st_size, st.st_mtime_ns)
                if self._stamps.get(f) == stamp:
                    continue
                try:
                    self._records[f] = read_records(f)
                    self._stamps[f] = stamp
                except (OSError, ValueError) as e:
                    log.warning("cannot read captions from %s: %s", f, e)

    def caption(self, path: str) -> str | None:
        self._reload()
        for f in reversed(self.files):
            found = self._records.get(f, {}).get(path)
            if found is not None:
                return found
        return self.sidecar_caption(path) if self.sidecars else None

    def _read_small(self, path: str) -> bytes | None:
        try:
            if self.allowed is not None and not self.allowed(path):
                return None
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size > MAX_SIDECAR_BYTES:
                    return None
                return f.read(MAX_SIDECAR_BYTES)
        except OSError:
            return None

    def sidecar_caption(self, path: str) -> str | None:
        """photo.txt, else the XMP description (photo.jpg.xmp, then photo.xmp)."""
        data = self._read_small(txt_sidecar(path))
        if data is not None:
            caption = _clean(data.decode("utf-8", "replace"))
            if caption:
                return caption
        for naming in XMP_NAMES:
            data = self._read_small(xmp_sidecar(path, naming))
            if data is None:
                continue
            try:
                caption = _clean(xmp_description(data))
            except (XmpError, ValueError):
                continue
            if caption:
                return caption
        return None
