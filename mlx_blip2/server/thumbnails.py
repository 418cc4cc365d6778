"""Thumbnails for the search page: made once per file version, cached as JPEG files beside the index.

The cache folder is ``<index>.thumbs/`` (``library.sqlite.thumbs/``), one file per (path, size, mtime) named by a
hash of them, in 256 subfolders; a changed photo gets a new thumbnail and the old one is left for a cleanup (delete
the folder any time: thumbnails are made again on demand). Each is written atomically (a temporary file renamed
over), so a crash never leaves a torn one. Images open through :func:`mlx_blip2.images.open_image` (EXIF
orientation, HEIC/AVIF, RAW previews) and are shrunk to at most :data:`THUMB_SIZE` pixels a side. When the folder
cannot be created or written (a read-only library), thumbnails are made per request and not kept.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from pathlib import Path

from ..images import DEFAULT_MAX_PIXELS, open_image
from ..library.atomic import atomic_write

log = logging.getLogger("mlx_blip2.server")

THUMB_SIZE = 384  # pixels, the longer side (the grid shows ~200 CSS px: sharp on 2x screens); at most 512
MAX_THUMB_SIZE = 512
JPEG_QUALITY = 82


def thumb_key(path: str, size: int, mtime_ns: int, thumb_size: int) -> str:
    """The cache name of one version of one file (the exact path bytes, its size and mtime, the thumbnail size)."""
    h = hashlib.sha256(os.fsencode(path))
    h.update(f"\0{size}\0{mtime_ns}\0{thumb_size}".encode())
    return h.hexdigest()[:40]


def make_thumbnail(path: str, thumb_size: int = THUMB_SIZE, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> bytes:
    """JPEG bytes of the image at ``path``, at most ``thumb_size`` pixels a side (never enlarged)."""
    from PIL import Image

    image = open_image(path, max_pixels=max_pixels)
    image.thumbnail((thumb_size, thumb_size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True, progressive=True)
    return out.getvalue()


class ThumbnailCache:
    """``get(path, size, mtime_ns)`` -> (JPEG bytes, key): from the cache folder, or made and stored once."""

    def __init__(self, folder: str | os.PathLike | None, thumb_size: int = THUMB_SIZE,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        if not 16 <= thumb_size <= MAX_THUMB_SIZE:
            raise ValueError(f"thumbnails are 16 to {MAX_THUMB_SIZE} pixels, not {thumb_size}")
        self.thumb_size, self.max_pixels = thumb_size, max_pixels
        self.folder = Path(folder) if folder is not None else None
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._warned = False
        if self.folder is not None:
            try:
                self.folder.mkdir(mode=0o700, exist_ok=True)
            except OSError as e:
                log.warning("thumbnail cache %s cannot be created (%s); thumbnails will not be kept", self.folder, e)
                self.folder = None

    @classmethod
    def beside(cls, index_path: str | os.PathLike, **kwargs) -> ThumbnailCache:
        """The cache folder of an index: ``library.sqlite`` -> ``library.sqlite.thumbs/``."""
        return cls(str(index_path) + ".thumbs", **kwargs)

    def _file(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / key[:2] / f"{key}.jpg"

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _store(self, file: Path, data: bytes) -> None:
        try:
            file.parent.mkdir(mode=0o700, exist_ok=True)
            atomic_write(str(file), data)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("thumbnail cache %s is not writable (%s); thumbnails will not be kept", self.folder, e)

    def get(self, path: str, size: int, mtime_ns: int) -> tuple[bytes, str]:
        """The thumbnail of this version of the file (made once, even when asked for by several requests at once).
        Raises what :func:`make_thumbnail` raises for a file that cannot be read."""
        key = thumb_key(path, size, mtime_ns, self.thumb_size)
        file = self._file(key)
        lock = self._lock(key)
        try:
            with lock:
                if file is not None:
                    try:
                        return file.read_bytes(), key
                    except OSError:
                        pass
                data = make_thumbnail(path, self.thumb_size, self.max_pixels)
                if file is not None:
                    self._store(file, data)
                return data, key
        finally:
            with self._guard:
                if not lock.locked():
                    self._locks.pop(key, None)
