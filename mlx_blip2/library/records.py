"""jsonl and csv caption records: one per image, crash-safe and resumable.

A record names its image by ``path``, valid UTF-8 text. A file name that is not valid UTF-8 can't be written as text
exactly, so its ``path`` shows the undecodable bytes as U+FFFD and ``path_b64`` (present only then) holds the exact
name: base64 of the file system's bytes (``os.fsencode``). Records are appended and fsynced per batch; a half-written
last line left by a hard kill is repaired on the next run, and the file is compacted to one record per image (the
newest) at the end.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
import re
import sys
from collections.abc import Iterable

from ..files import ImageFile, display_path, path_fields, utf8_text
from .atomic import atomic_write
from .launch import lock_open_file
from .writer import SKIP, TODO, UsageError, Writer

CSV_COLUMNS = ("path", "caption", "error", "model", "prompt", "size", "mtime", "path_b64")
LEGACY_CSV_COLUMNS = CSV_COLUMNS[:-1]  # files written before path_b64 existed: read, appended to, then upgraded


def record_path(record: dict) -> str:
    """The exact path a record names (as ``os.fsdecode`` gives it, surrogate escapes included)."""
    encoded = record.get("path_b64")
    if encoded:
        try:
            return os.fsdecode(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError, TypeError):
            pass
    return record["path"]


def make_record(image: ImageFile, size, mtime, caption, error, model, prompt) -> dict:
    record = path_fields(image.path)
    if image.raw:  # a RAW+JPEG pair: one record naming both
        record["raw"] = display_path(image.raw)
    record.update({"caption": utf8_text(caption)} if error is None else {"error": utf8_text(error)})
    record["model"] = None if model is None else utf8_text(model)
    if prompt is not None:
        record["prompt"] = utf8_text(prompt)
    record.update(size=size, mtime=mtime)
    return record


def _normalise(record: dict) -> dict:
    """A record read back, in today's form (older versions wrote a name that is not UTF-8 as lone surrogates)."""
    path = record_path(record)
    fields = path_fields(path)
    if "path_b64" not in fields:
        record.pop("path_b64", None)
    return {**fields, **{k: (utf8_text(v) if isinstance(v, str) else v) for k, v in record.items() if k not in fields}}


def jsonl_line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def csv_bytes(rows: Iterable[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode("utf-8")


def csv_row(record: dict, columns=CSV_COLUMNS) -> list[str]:
    # One record per line whatever a caption holds, so that a torn last line is all a crash can leave.
    def cell(value):
        return "" if value is None else re.sub(r"[\r\n]+", " ", str(value))

    return [cell(record.get(c)) for c in columns]


def _same_mtime(a, b) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-3
    except (TypeError, ValueError):
        return False


def is_done(record: dict | None, size, mtime) -> bool:
    """Whether a record holds a caption of the file as it is now (same size and mtime)."""
    if not record or record.get("error") or not isinstance(record.get("caption"), str):
        return False
    try:
        same_size = int(record.get("size")) == size
    except (TypeError, ValueError):
        return False
    return same_size and _same_mtime(record.get("mtime"), mtime)


def parse_json(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("path"), str) else None


class RecordWriter(Writer):
    """jsonl or csv records, to a file (crash-safe, resumable, compacted to one record per image at the end) or to a
    stream such as stdout."""

    def __init__(self, fmt: str, model: str | None = None, prompt: str | None = None, path=None, stream=None):
        if fmt not in ("jsonl", "csv"):
            raise ValueError(f"records are jsonl or csv, got {fmt!r}")
        self.fmt, self.model, self.prompt = fmt, model, prompt
        self.path = None if path is None else os.fspath(path)
        self.records: dict[str, dict] = {}  # exact path -> newest record
        self.notes: list[str] = []
        self.columns = CSV_COLUMNS
        self._lines = 0
        self._dirty = False
        self._file = None
        self._stream = stream
        if self.path is not None:
            self._open()
        elif fmt == "csv":
            self._emit(csv_bytes([list(CSV_COLUMNS)]))

    # --- the file: open, repair, load ------------------------------------------------------------------------------

    def _open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        f = open(self.path, "a+b")  # noqa: SIM115 - held (and locked) until close()
        try:
            lock_open_file(f, UsageError(f"another run is writing '{display_path(self.path)}'"))
            f.seek(0)
            data = self._repair(f, f.read())
            self._load(data)
            if self.fmt == "csv" and not data:
                f.write(csv_bytes([list(CSV_COLUMNS)]))
                f.flush()
        except BaseException:
            f.close()
            raise
        self._file = f

    def _repair(self, f, data: bytes) -> bytes:
        """A hard kill can leave a half-written last line: drop it (or end it, if it is a whole record)."""
        if not data or data.endswith(b"\n"):
            return data
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        if self.fmt == "jsonl" and parse_json(tail) is not None:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
            self.notes.append(f"ended the unterminated last line of '{display_path(self.path)}'")
            return data + b"\n"
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
        self.notes.append(f"repaired '{display_path(self.path)}': dropped a half-written last line ({len(tail)} bytes)")
        return data[:cut]

    def _load(self, data: bytes) -> None:
        records = self._read_jsonl(data) if self.fmt == "jsonl" else self._read_csv(data)
        bad = 0
        for record in records:
            if record is None:
                bad += 1
                continue
            self._lines += 1
            self._keep(_normalise(record))
        if bad:
            self._dirty = True
            self.notes.append(f"'{display_path(self.path)}': dropped {bad} unreadable line(s)")

    @staticmethod
    def _read_jsonl(data: bytes) -> Iterable[dict | None]:
        return (parse_json(line) for line in data.split(b"\n") if line.strip())

    def _read_csv(self, data: bytes) -> list[dict | None]:
        if not data:
            return []
        # surrogateescape: files written before path_b64 existed could hold a name that is not UTF-8 as raw bytes.
        rows = csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
        header = tuple(next(rows, None) or ())
        shown = display_path(self.path)
        if "path" not in header:
            raise UsageError(f"'{shown}' is not a caption csv file (no 'path' column)")
        if header not in (CSV_COLUMNS, LEGACY_CSV_COLUMNS):
            raise UsageError(f"'{shown}' has columns {list(header)}, expected {list(CSV_COLUMNS)}")
        if header == LEGACY_CSV_COLUMNS:
            self.columns, self._dirty = LEGACY_CSV_COLUMNS, True  # appended to as it is, upgraded when compacted
        out = []
        for row in rows:
            if len(row) != len(header):
                out.append(None)
                continue
            record = {k: v for k, v in zip(header, row) if v != ""}
            if "caption" not in record and "error" not in record:
                record["caption"] = ""
            out.append(record)
        return out

    def _keep(self, record: dict) -> None:
        key = record_path(record)
        self.records.pop(key, None)  # the newest record of an image goes last
        self.records[key] = record

    def _emit(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
        else:
            stream = self._stream or sys.stdout
            stream.write(data.decode("utf-8"))
            stream.flush()

    # --- Writer interface ------------------------------------------------------------------------------------------

    def status(self, image, size, mtime, existing):
        if existing == "skip" and is_done(self.records.get(image.path), size, mtime):
            return SKIP, None
        return TODO, None

    def write(self, image, size, mtime, caption=None, error=None):
        record = make_record(image, size, mtime, caption, error, self.model, self.prompt)
        self._emit(jsonl_line(record) if self.fmt == "jsonl" else csv_bytes([csv_row(record, self.columns)]))
        if self._file is not None:
            self._lines += 1
            self._keep(record)

    def append(self, record: dict) -> None:
        """Add a record read from elsewhere (a part file being merged), as it is; durable at the next end_batch."""
        record = _normalise(record)
        self._emit(jsonl_line(record) if self.fmt == "jsonl" else csv_bytes([csv_row(record, self.columns)]))
        if self._file is not None:
            self._lines += 1
            self._keep(record)

    def end_batch(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is None:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            if self._dirty or self._lines != len(self.records):
                self._compact()
        finally:
            self._file.close()
            self._file = None

    def _compact(self) -> None:
        """Rewrite the file with one record per image (the newest), atomically."""
        if self.fmt == "jsonl":
            data = b"".join(jsonl_line(r) for r in self.records.values())
        else:
            data = csv_bytes([list(CSV_COLUMNS)] + [csv_row(r) for r in self.records.values()])
        atomic_write(self.path, data)
        self._lines, self._dirty, self.columns = len(self.records), False, CSV_COLUMNS
