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

import logging
import os
import threading
import time
from typing import Callable, Sequence

from ..photo_index.captions import read_caption_records, read_sidecar_caption

log = logging.getLogger("mlx_blip2.server")

RELOAD_SECONDS = 2.0


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
                    self._records[f] = read_caption_records(f)
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

    def sidecar_caption(self, path: str) -> str | None:
        """photo.txt, else the XMP description (photo.jpg.xmp, then photo.xmp); only sidecars in the library."""
        return read_sidecar_caption(path, self.allowed)[0]
