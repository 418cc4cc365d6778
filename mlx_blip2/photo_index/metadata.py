"""When a photo was taken: EXIF DateTimeOriginal (else DateTimeDigitized, else DateTime), or the file's mtime.

Only the file's header is read (PIL parses the EXIF block without decoding pixels; pixels are decoded by
:func:`mlx_blip2.images.open_image`, never here). The result is a wall-clock time, ``YYYY-MM-DDTHH:MM:SS``, as the
camera recorded it (EXIF holds no time zone), or the mtime in this machine's local time: what a person means by
"photos from July 2024". Sorted as text, these strings sort by time.
"""

from __future__ import annotations

import os
import re
import time

from PIL import Image

from ..images import available_formats

_EXIF_IFD = 0x8769
_DATE_TIME_ORIGINAL, _DATE_TIME_DIGITIZED, _DATE_TIME = 36867, 36868, 306
_EXIF_DATE = re.compile(r"\s*(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")


def exif_date(path: str) -> str | None:
    """The EXIF capture time of an image file as ``YYYY-MM-DDTHH:MM:SS``, or None (no EXIF, no date, unreadable)."""
    try:
        with Image.open(path, formats=available_formats()) as img:
            exif = img.getexif()
            values = [exif.get_ifd(_EXIF_IFD).get(_DATE_TIME_ORIGINAL),
                      exif.get_ifd(_EXIF_IFD).get(_DATE_TIME_DIGITIZED), exif.get(_DATE_TIME)]
    except Exception:  # noqa: BLE001 - any file PIL cannot parse simply has no EXIF date
        return None
    for value in values:
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        m = _EXIF_DATE.match(value) if isinstance(value, str) else None
        if m and m.group(1) != "0000":  # "0000:00:00 00:00:00" is a camera's "unknown"
            return "{}-{}-{}T{}:{}:{}".format(*m.groups())
    return None


def mtime_date(mtime_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(mtime_ns / 1e9))


def date_taken(path: str, mtime_ns: int | None = None) -> str:
    """EXIF capture time, else the file's mtime (``mtime_ns``, or from stat); the epoch if neither can be read."""
    found = exif_date(path)
    if found is not None:
        return found
    if mtime_ns is None:
        try:
            mtime_ns = os.stat(path).st_mtime_ns
        except OSError:
            mtime_ns = 0
    return mtime_date(mtime_ns)
