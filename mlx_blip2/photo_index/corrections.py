"""A person's correction of a caption: it goes to the photo's sidecar, to the index, and to the corrections file.

1. **The sidecar**: every sidecar the photo already has is rewritten (``photo.txt``; the XMP ``x-default``
   description of ``photo.jpg.xmp`` / ``photo.xmp``, edited in place by :func:`mlx_blip2.library.xmp.update_xmp`,
   which keeps every other field and language), so that no program reads the old caption from one of them; a photo
   with none gets one (``new_sidecar``: ``xmp``, the photo.jpg.xmp naming, or ``txt``). All new contents are made
   first, then each file is replaced atomically (:func:`mlx_blip2.library.atomic.atomic_write`): an XMP file that
   cannot be edited safely refuses the whole correction and nothing is written.
2. **The index**: the caption, marked corrected, in one transaction (search finds its words at once).
3. **The corrections file** beside the index, ``DB.corrections.jsonl``: one JSON line appended per correction, in
   one ``write`` on a file opened for appending, then fsynced (training data for ``mlx-blip2 finetune``; the format
   is :func:`correction_record`'s). A reader keeps the last line of each path and skips a line that does not parse
   (a crash in the middle of an append).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ..files import path_fields
from ..library.atomic import atomic_write
from ..library.records import parse_json, record_path
from ..library.sidecars import XMP_NAMES, txt_sidecar, xmp_sidecar
from ..library.xmp import XmpError, update_xmp
from .captions import caption_row, clean_caption, read_sidecar_caption, set_caption, sidecar_stamp
from .store import PhotoIndex, decode_path

SIDECAR_FORMATS = ("xmp", "txt")


class CorrectionError(ValueError):
    """A correction that cannot be saved; ``status`` is the HTTP status the page answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def corrections_path(db_path: str | os.PathLike) -> Path:
    """The corrections file of an index: ``library.sqlite`` -> ``library.sqlite.corrections.jsonl``."""
    path = Path(db_path)
    return path.with_name(path.name + ".corrections.jsonl")


def _sidecar_writes(path: str, caption: str, new_sidecar: str) -> list[tuple[str, bytes]]:
    """(sidecar, new bytes) for each sidecar to write; CorrectionError when an XMP cannot be edited safely."""
    writes = []
    txt = txt_sidecar(path)
    if os.path.exists(txt):
        writes.append((txt, (caption + "\n").encode("utf-8")))
    for naming in XMP_NAMES:
        xmp = xmp_sidecar(path, naming)
        try:
            with open(xmp, "rb") as f:
                old = f.read()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise CorrectionError(f"cannot read the sidecar '{xmp}': {e.strerror or e}", 500) from None
        try:
            writes.append((xmp, update_xmp(old, caption)))
        except XmpError as e:
            raise CorrectionError(f"the sidecar '{xmp}' cannot be edited safely ({e}); nothing was written",
                                  409) from None
    if not writes:
        if new_sidecar == "txt":
            writes.append((txt, (caption + "\n").encode("utf-8")))
        else:
            writes.append((xmp_sidecar(path), update_xmp(None, caption)))
    return writes


def _file_sha256(path: str) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def correction_record(path: str, caption: str, previous: str | None, sidecars: list[str], image_id: int) -> dict:
    """One line of the corrections file: ``path`` (valid UTF-8; ``path_b64`` holds the exact bytes of a name that
    is not), ``caption`` (the correction), ``previous`` (the caption shown before, or null), ``time`` (UTC,
    ISO 8601), ``sha256`` (of the image file, to check it is unchanged; null if unreadable), ``sidecar`` (the first
    sidecar written), ``sidecars`` (all of them) and ``id`` (the index's id of the photo)."""
    return {**path_fields(path), "caption": caption, "previous": previous,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sha256": _file_sha256(path),
            "sidecar": path_fields(sidecars[0])["path"] if sidecars else None,
            "sidecars": [path_fields(s)["path"] for s in sidecars], "id": image_id}


def append_correction(file: str | os.PathLike, record: dict) -> None:
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def correct_caption(db: PhotoIndex, image_id: int, caption: str, previous: str | None = None,
                    new_sidecar: str = "xmp") -> dict:
    """Save a person's caption for an indexed photo (sidecar, index, corrections file; see the module) and return
    the corrections file's record. ``previous``: the caption the person saw (default: the index's)."""
    if new_sidecar not in SIDECAR_FORMATS:
        raise ValueError(f"new sidecars are {' or '.join(SIDECAR_FORMATS)}, got {new_sidecar!r}")
    cleaned = clean_caption(caption)
    if cleaned is None:
        raise CorrectionError("the caption is empty")
    row = db.db.execute("SELECT path FROM images WHERE id = ? AND row IS NOT NULL", (image_id,)).fetchone()
    if row is None:
        raise CorrectionError(f"no indexed image has id {image_id}", 404)
    path = decode_path(bytes(row[0]) if not isinstance(row[0], str) else row[0])
    if not os.path.isfile(path):
        raise CorrectionError(f"image {image_id} is no longer on disk", 404)
    if previous is None:
        stored = caption_row(db, image_id)
        previous = stored[0] if stored is not None else read_sidecar_caption(path)[0]
    writes = _sidecar_writes(path, cleaned, new_sidecar)
    try:
        for sidecar, data in writes:
            atomic_write(sidecar, data)
    except OSError as e:
        raise CorrectionError(f"cannot write the sidecar: {e.strerror or e}", 500) from None
    db.begin()
    try:
        set_caption(db, image_id, cleaned, "correction", True, sidecar_stamp(path))
        db.commit()
    except BaseException:
        db.rollback()
        raise
    record = correction_record(path, cleaned, previous, [s for s, _ in writes], image_id)
    append_correction(corrections_path(db.path), record)
    return record


def read_corrections(file: str | os.PathLike) -> list[dict]:
    """The corrections file's records, the last one of each image only (in the order of those last lines), each
    with its exact ``path``; lines that do not parse are skipped. [] when there is no file."""
    try:
        with open(file, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    latest: dict[str, dict] = {}
    for line in data.split(b"\n"):
        record = parse_json(line) if line.strip() else None
        if not isinstance(record, dict) or not isinstance(record.get("caption"), str) or "path" not in record:
            continue
        path = record_path(record)
        latest.pop(path, None)
        latest[path] = {**record, "path": path}
    return list(latest.values())
