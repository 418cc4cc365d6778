"""Caption a photo library: ``mlx-blip2 caption PATH... [-r] [-o captions.jsonl | --format txt|xmp]``.

- Discovery: files and folders (``recursive`` on request), images recognised by extension, case-insensitive;
  hidden files and folders are skipped; ``shard=(i, n)`` keeps a deterministic 1/n of the files.
- Throughput: a thread pool opens, decodes (JPEGs in Pillow's draft mode, at a reduced size) and preprocesses the
  next images while the model captions the current batch; the vision encoder runs on the whole batch.
- Outputs: a jsonl or csv file of records (appended, flushed, fsynced per batch; a half-written last line left by a
  hard kill is repaired on the next run, and the file is compacted to one record per image at the end), ``.txt``
  sidecars, or XMP sidecars whose ``dc:description`` is set in place, keeping every other field.
- Resuming: with ``existing="skip"`` images already captioned (same path, size and mtime in the output file, or an
  existing caption sidecar) are skipped, so a rerun continues where the last one stopped; failures are retried.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import shutil
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, features

from .processing import HEIF_SUPPORTED, ImageLoadError, load_image

AVIF_SUPPORTED = bool(features.check("avif")) if "avif" in features.modules else False

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif",  # JPEG
    ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".heic", ".heif", ".hif",  # HEIF (pillow-heif)
    ".avif",  # AVIF (Pillow >= 11.3)
})
FORMATS = ("jsonl", "csv", "txt", "xmp")
XMP_NAMES = ("photo.jpg.xmp", "photo.xmp")  # digiKam/darktable, Lightroom
CSV_COLUMNS = ("path", "caption", "error", "model", "prompt", "size", "mtime")
DEFAULT_BATCH_SIZE = 8

NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS_DC = "http://purl.org/dc/elements/1.1/"
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


class UsageError(ValueError):
    """A problem with the command line or its inputs (exit status 2)."""


# --- discovery ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFile:
    path: str  # absolute, as recorded in outputs
    display: str  # as the user would write it (the argument, joined with the part found below it)
    key: str  # shard key: the path below the folder argument it was found in (the name for file arguments)


def is_image(path: str | os.PathLike) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def _hidden(name: str) -> bool:
    return name.startswith(".")  # also macOS "._photo.jpg" resource forks, which are not images


def discover(inputs: Iterable[str | os.PathLike], recursive: bool = False) -> list[ImageFile]:
    """The images among `inputs` (files and folders), each once: file arguments in the order given, folder contents
    sorted. Files without an image extension are ignored; a missing input raises FileNotFoundError."""
    out: dict[str, ImageFile] = {}

    def add(path: str, key: str) -> None:
        absolute = os.path.abspath(path)
        if absolute not in out:
            out[absolute] = ImageFile(absolute, path, key)

    for arg in map(os.fspath, inputs):
        if os.path.isdir(arg):
            seen: set[tuple[int, int]] = set()
            for root, dirs, files in os.walk(arg, followlinks=True):
                st = os.stat(root)
                if (st.st_dev, st.st_ino) in seen:  # a symlink loop
                    dirs[:] = []
                    continue
                seen.add((st.st_dev, st.st_ino))
                dirs[:] = sorted(d for d in dirs if not _hidden(d)) if recursive else []
                for name in sorted(files):
                    path = os.path.join(root, name)
                    if not _hidden(name) and is_image(name) and os.path.isfile(path):
                        add(path, Path(os.path.relpath(path, arg)).as_posix())
        elif os.path.isfile(arg):
            if is_image(arg):
                add(arg, os.path.basename(arg))
        else:
            raise FileNotFoundError(f"no such file or folder: '{arg}'")
    return list(out.values())


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (1 <= I <= N) -> (I, N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, e.g. 1/4; got '{text}'")
    return int(m.group(1)), int(m.group(2))


def shard_index(key: str, n: int) -> int:
    """Which of n shards (1-based) an image belongs to: a hash of its path below the folder argument, so that every
    machine agrees whatever the mount point, and adding files never moves others."""
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % n + 1


def select_shard(files: Sequence[ImageFile], shard: tuple[int, int] | None) -> list[ImageFile]:
    if shard is None:
        return list(files)
    i, n = shard
    return [f for f in files if shard_index(f.key, n) == i]


# --- decoding ----------------------------------------------------------------------------------------------------


def draft_size_for(image_processor) -> int | None:
    """JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps both sides >= twice the model's input
    size: the resize to the input size then looks the same, and a 50-megapixel photo takes 1/64 of the memory."""
    if not getattr(image_processor, "do_resize", False):
        return None
    return 2 * max(image_processor.size["height"], image_processor.size["width"])


def decode(path: str, image_processor, draft_size: int | None = None) -> np.ndarray:
    """Open, orient and preprocess one image file: float32 (3, H, W). Runs in worker threads."""
    try:
        image = load_image(path, draft_size=draft_size)
    except ImageLoadError as e:
        ext = os.path.splitext(path)[1].lower()
        if ext in (".heic", ".heif", ".hif") and not HEIF_SUPPORTED:
            raise ImageLoadError(f"{e} (HEIC/HEIF needs pillow-heif: pip install pillow-heif)") from e
        if ext == ".avif" and not AVIF_SUPPORTED:
            raise ImageLoadError(f"{e} (this Pillow cannot read AVIF: pip install -U pillow)") from e
        raise
    return image_processor.preprocess(image)


# --- sidecars ----------------------------------------------------------------------------------------------------


def txt_sidecar(path: str) -> str:
    return os.path.splitext(path)[0] + ".txt"


def xmp_sidecar(path: str, naming: str = XMP_NAMES[0]) -> str:
    if naming not in XMP_NAMES:
        raise ValueError(f"xmp naming must be one of {XMP_NAMES}, got {naming!r}")
    return path + ".xmp" if naming == "photo.jpg.xmp" else os.path.splitext(path)[0] + ".xmp"


def atomic_write(path: str, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file, never a torn one."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported everywhere (some network file systems)
    finally:
        os.close(fd)


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xml_text(text: str) -> str:
    """`text` as XML 1.0 can hold it: control characters dropped, line breaks normalised as a parser would."""
    return _XML_INVALID.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


class XmpError(ValueError):
    """An existing XMP sidecar that cannot be read or updated safely (it is left untouched)."""


def _parse_xmp(data: bytes) -> tuple[ET.Element, dict[str, set[str]]]:
    """The element tree and, for each namespace URI, the prefixes bound to it anywhere in the document."""
    prefixes: dict[str, set[str]] = {}
    root = None
    try:
        for event, obj in ET.iterparse(io.BytesIO(data), events=("start-ns", "start")):
            if event == "start-ns":
                prefixes.setdefault(obj[1], set()).add(obj[0])
            elif root is None:
                root = obj
    except ET.ParseError as e:
        raise XmpError(f"not well-formed XML ({e})") from None
    if NS_RDF not in prefixes:
        raise XmpError("not an XMP packet (no rdf:RDF)")
    return root, prefixes


def xmp_description(data: bytes) -> str | None:
    """The dc:description an XMP packet holds (its x-default entry, else the first), or None."""
    root, _ = _parse_xmp(data)
    return _description(root)


def _description(root: ET.Element) -> str | None:
    for desc in root.iter(f"{{{NS_RDF}}}Description"):
        value = desc.get(f"{{{NS_DC}}}description")
        if value is not None and value.strip():
            return value
    for el in root.iter(f"{{{NS_DC}}}description"):
        items = [li for li in el.iter(f"{{{NS_RDF}}}li") if (li.text or "").strip()]
        items.sort(key=lambda li: li.get(_XML_LANG) != "x-default")
        if items:
            return items[0].text
        if (el.text or "").strip():
            return el.text
    return None


def _signature(root: ET.Element) -> list:
    """Everything a packet holds except its description, for checking that an edit changed nothing else."""
    out = []

    def walk(el: ET.Element, depth: int) -> None:
        if el.tag == f"{{{NS_DC}}}description":
            return
        attrs = sorted((k, v) for k, v in el.attrib.items() if k != f"{{{NS_DC}}}description")
        children = [c for c in el if c.tag != f"{{{NS_DC}}}description"]
        if el.tag == f"{{{NS_RDF}}}Description" and not children and attrs == [(f"{{{NS_RDF}}}about", "")] \
                and not (el.text or "").strip():
            return  # an empty description block (the one created to hold a new caption)
        out.append((depth, el.tag, attrs, (el.text or "").strip(), (el.tail or "").strip()))
        for child in children:
            walk(child, depth + 1)

    walk(root, 0)
    return out


_ATTRS = r"((?:[^>\"']|\"[^\"]*\"|'[^']*')*?)"


def _mask(text: str) -> str:
    """`text` with comments, CDATA sections, processing instructions and doctypes blanked (same length), so that
    tag searches only see markup."""
    pattern = re.compile(r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>|<!DOCTYPE(?:[^\[>]|\[.*?\])*>", re.DOTALL)
    return pattern.sub(lambda m: " " * len(m.group(0)), text)


def _line_indent(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    return re.match(r"[ \t]*", text[start:pos]).group(0)


def _alt(rdf: str, caption: str, indent: str | None) -> str:
    li = f'<{rdf}:li xml:lang="x-default">{escape(caption)}</{rdf}:li>'
    if indent is None:
        return f"<{rdf}:Alt>{li}</{rdf}:Alt>"
    return f"\n{indent} <{rdf}:Alt>\n{indent}  {li}\n{indent} </{rdf}:Alt>\n{indent}"


NEW_XMP = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="mlx-blip2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:dc="http://purl.org/dc/elements/1.1/">
   <dc:description>{alt}</dc:description>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def update_xmp(data: bytes | None, caption: str) -> bytes:
    """Set dc:description (x-default) in an XMP packet, or make a new packet when `data` is None or empty.

    The existing text is edited in place: every other byte (other fields, namespaces, comments, formatting) stays as
    it was. The result is re-parsed and checked to hold the caption and everything the packet held before;
    XmpError is raised (and nothing should be written) when the packet can't be read or safely edited.
    """
    caption = xml_text(caption)
    if not data or not data.strip():
        return NEW_XMP.format(alt=_alt("rdf", caption, "   ")).encode("utf-8")
    old_root, prefixes = _parse_xmp(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise XmpError("not UTF-8") from None
    rdf_prefixes = sorted(p for p in prefixes[NS_RDF] if p)
    if not rdf_prefixes:
        raise XmpError("RDF is the default namespace; cannot edit safely")
    rdf, any_rdf = rdf_prefixes[0], "|".join(map(re.escape, rdf_prefixes))
    dc_prefixes = sorted(p for p in prefixes.get(NS_DC, ()) if p)

    def apply(text: str, edits: list[tuple[int, int, str]]) -> str:
        for start, end, replacement in sorted(edits, reverse=True):
            text = text[:start] + replacement + text[end:]
        return text

    # 1. Drop the attribute form (dc:description="...") some writers use; the element form replaces it.
    masked, edits = _mask(text), []
    for m in re.finditer(rf"<(?:{any_rdf}):Description(?=[\s/>]){_ATTRS}/?>", masked):
        for dc in dc_prefixes:
            for a in re.finditer(rf"\s+{re.escape(dc)}:description\s*=\s*(\"[^\"]*\"|'[^']*')", m.group(1)):
                edits.append((m.start(1) + a.start(), m.start(1) + a.end(), ""))
    text = apply(text, edits)

    # 2. Replace the content of an existing dc:description element (and drop any duplicates).
    masked, edits, found = _mask(text), [], False
    for dc in dc_prefixes:
        q = re.escape(dc)
        for m in re.finditer(rf"<{q}:description(?=[\s/>]){_ATTRS}(/?)>", masked):
            if m.group(2):  # <dc:description/>
                edits.append((m.start(), m.end(),
                              "" if found else f"<{dc}:description{m.group(1)}>{_alt(rdf, caption, None)}"
                                               f"</{dc}:description>"))
            else:
                end = re.compile(rf"</{q}:description\s*>").search(masked, m.end())
                if end is None:
                    raise XmpError("unterminated dc:description")
                edits.append((m.start(), end.end(), "") if found else
                             (m.end(), end.start(), _alt(rdf, caption, _line_indent(text, m.start()))))
            found = True
    if not found:
        starts = list(re.finditer(rf"<({any_rdf}):Description(?=[\s/>]){_ATTRS}(/?)>", masked))
        if starts:
            # Prefer a block that already declares the dc namespace (darktable and digiKam keep one block).
            m = next((s for s in starts if re.search(r"\sxmlns:dc\s*=", s.group(2))), starts[0])
            r, attrs, closed = m.group(1), m.group(2), m.group(3)
            indent = _line_indent(text, m.start())
            declare = "" if re.search(r"\sxmlns:dc\s*=", attrs) else f' xmlns:dc="{NS_DC}"'
            element = f"\n{indent} <dc:description>{_alt(r, caption, indent + ' ')}</dc:description>"
            tag = f"<{r}:Description{attrs}{declare}>"
            edits.append((m.start(), m.end(), tag + element + (f"\n{indent}</{r}:Description>" if closed else "")))
        else:
            m = re.search(rf"<({any_rdf}):RDF(?=[\s/>]){_ATTRS}(/?)>", masked)
            if m is None:
                raise XmpError("no rdf:RDF element")
            r, indent = m.group(1), _line_indent(text, m.start())
            block = (f'\n{indent} <{r}:Description {r}:about="" xmlns:dc="{NS_DC}">\n{indent}  <dc:description>'
                     f"{_alt(r, caption, indent + '  ')}</dc:description>\n{indent} </{r}:Description>")
            edits.append((m.start(), m.end(), f"<{r}:RDF{m.group(2)}>{block}" +
                          (f"\n{indent}</{r}:RDF>" if m.group(3) else "")))
    out = apply(text, edits).encode("utf-8")
    new_root, _ = _parse_xmp(out)
    if (_description(new_root) or "") != caption or _signature(new_root) != _signature(old_root):
        raise XmpError("could not update dc:description without changing other fields")
    return out


# --- writers -----------------------------------------------------------------------------------------------------

TODO, SKIP, FAIL = "todo", "skip", "fail"


def _stat(path: str) -> tuple[int | None, float | None]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime
    except OSError:
        return None, None


def _same_mtime(a, b) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-3
    except (TypeError, ValueError):
        return False


class Writer:
    """Where captions go. `status` decides (in worker threads) whether an image still needs a caption."""

    notes: list[str]

    def status(self, image: ImageFile, size, mtime, existing: str) -> tuple[str, str | None]:
        return TODO, None

    def write(self, image: ImageFile, size, mtime, caption: str | None = None, error: str | None = None) -> str | None:
        """Record a caption (or an error). Returns an error message if the caption could not be stored."""
        raise NotImplementedError

    def end_batch(self) -> None:
        pass

    def close(self) -> None:
        pass


class PlainWriter(Writer):
    """`path: caption` lines on stdout (the bare caption when there is one image); errors go to the summary."""

    def __init__(self, stream=None, bare: bool = False):
        self.stream, self.bare, self.notes = stream, bare, []

    def write(self, image, size, mtime, caption=None, error=None):
        if caption is not None:
            stream = self.stream or sys.stdout
            print(caption if self.bare else f"{image.display}: {caption}", file=stream, flush=True)
        return None


def _record(image: ImageFile, size, mtime, caption, error, model, prompt) -> dict:
    record = {"path": image.path}
    record.update({"caption": caption} if error is None else {"error": error})
    record["model"] = model
    if prompt is not None:
        record["prompt"] = prompt
    record.update(size=size, mtime=mtime)
    return record


def _jsonl_line(record: dict) -> bytes:
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not valid UTF-8 (a lone surrogate): escape it
        return (json.dumps(record) + "\n").encode("ascii")


def _csv_row(record: dict) -> list[str]:
    # One record per line whatever a caption holds, so that a torn last line is all a crash can leave.
    def cell(value):
        return "" if value is None else re.sub(r"[\r\n]+", " ", str(value))

    return [cell(record.get(c)) for c in CSV_COLUMNS]


def _csv_bytes(rows: Iterable[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode("utf-8", "surrogateescape")


def _done(record: dict | None, size, mtime) -> bool:
    if not record or record.get("error") or not isinstance(record.get("caption"), str):
        return False
    try:
        same_size = int(record.get("size")) == size
    except (TypeError, ValueError):
        return False
    return same_size and _same_mtime(record.get("mtime"), mtime)


class RecordWriter(Writer):
    """jsonl or csv records, to a file (crash-safe, resumable, compacted to one record per image at the end) or to a
    stream such as stdout."""

    def __init__(self, fmt: str, model: str | None = None, prompt: str | None = None, path=None, stream=None):
        if fmt not in ("jsonl", "csv"):
            raise ValueError(f"records are jsonl or csv, got {fmt!r}")
        self.fmt, self.model, self.prompt = fmt, model, prompt
        self.path = None if path is None else os.fspath(path)
        self.records: dict[str, dict] = {}
        self.notes: list[str] = []
        self._lines = 0
        self._dirty = False
        self._file = None
        self._stream = stream
        if self.path is not None:
            self._open()
        elif fmt == "csv":
            self._emit(_csv_bytes([list(CSV_COLUMNS)]))

    # file handling
    def _open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        f = open(self.path, "a+b")
        try:
            try:
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # pragma: no cover - not on POSIX
                pass
            except OSError:
                raise UsageError(f"another run is writing '{self.path}'") from None
            f.seek(0)
            data = f.read()
            data = self._repair(f, data)
            self._load(data)
            if self.fmt == "csv" and not data:
                f.write(_csv_bytes([list(CSV_COLUMNS)]))
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
        if self.fmt == "jsonl" and self._parse_json(tail) is not None:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
            self.notes.append(f"ended the unterminated last line of '{self.path}'")
            return data + b"\n"
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
        self.notes.append(f"repaired '{self.path}': dropped a half-written last line ({len(tail)} bytes)")
        return data[:cut]

    @staticmethod
    def _parse_json(line: bytes) -> dict | None:
        try:
            record = json.loads(line)
        except ValueError:
            return None
        return record if isinstance(record, dict) and isinstance(record.get("path"), str) else None

    def _load(self, data: bytes) -> None:
        bad = 0
        if self.fmt == "jsonl":
            for line in data.split(b"\n"):
                if not line.strip():
                    continue
                record = self._parse_json(line)
                if record is None:
                    bad += 1
                    continue
                self._lines += 1
                self._keep(record)
        elif data:
            rows = csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
            header = next(rows, None)
            if header is None or "path" not in header:
                raise UsageError(f"'{self.path}' is not a caption csv file (no 'path' column)")
            if tuple(header) != CSV_COLUMNS:
                raise UsageError(f"'{self.path}' has columns {header}, expected {list(CSV_COLUMNS)}")
            for row in rows:
                if len(row) != len(CSV_COLUMNS):
                    bad += 1
                    continue
                record = {k: (v if v != "" else None) for k, v in zip(CSV_COLUMNS, row)}
                if record["caption"] is None and record["error"] is None:
                    record["caption"] = ""
                self._lines += 1
                self._keep(record)
        if bad:
            self._dirty = True
            self.notes.append(f"'{self.path}': dropped {bad} unreadable line(s)")

    def _keep(self, record: dict) -> None:
        self.records.pop(record["path"], None)  # the newest record of an image goes last
        self.records[record["path"]] = record

    def _emit(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
        else:
            stream = self._stream or sys.stdout
            stream.write(data.decode("utf-8", "surrogateescape"))
            stream.flush()

    # Writer interface
    def status(self, image, size, mtime, existing):
        if existing == "skip" and _done(self.records.get(image.path), size, mtime):
            return SKIP, None
        return TODO, None

    def write(self, image, size, mtime, caption=None, error=None):
        record = _record(image, size, mtime, caption, error, self.model, self.prompt)
        self._emit(_jsonl_line(record) if self.fmt == "jsonl" else _csv_bytes([_csv_row(record)]))
        if self._file is not None:
            self._lines += 1
            self._keep(record)
        return None

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
            data = b"".join(_jsonl_line(r) for r in self.records.values())
        else:
            data = _csv_bytes([list(CSV_COLUMNS)] + [_csv_row(r) for r in self.records.values()])
        atomic_write(self.path, data)
        self._lines, self._dirty = len(self.records), False


class SidecarWriter(Writer):
    """A `.txt` or XMP sidecar next to each image. Images are never touched; sidecars are replaced atomically."""

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
            return FAIL, f"cannot read sidecar '{sidecar}': {e}"
        if self.fmt == "txt":
            return (SKIP, None) if existing == "skip" and data.strip() else (TODO, None)
        if not data.strip():
            return TODO, None
        try:
            described = xmp_description(data) is not None
        except XmpError as e:
            return FAIL, f"existing sidecar '{sidecar}' left untouched: {e}"
        return (SKIP, None) if existing == "skip" and described else (TODO, None)

    def write(self, image, size, mtime, caption=None, error=None):
        if caption is None:
            return None
        sidecar = self.sidecar(image.path)
        try:
            if self.fmt == "txt":
                atomic_write(sidecar, (caption + "\n").encode("utf-8", "surrogateescape"))
            else:
                try:
                    with open(sidecar, "rb") as f:
                        old = f.read()
                except FileNotFoundError:
                    old = None
                atomic_write(sidecar, update_xmp(old, caption))
        except XmpError as e:
            return f"existing sidecar '{sidecar}' left untouched: {e}"
        except OSError as e:
            return f"cannot write sidecar '{sidecar}': {e}"
        return None


def sidecar_conflicts(files: Sequence[ImageFile], sidecar: Callable[[str], str]) -> dict[str, str]:
    """Images whose sidecar another image (earlier in `files`) already claims, e.g. photo.jpg and photo.png both
    mapping to photo.txt. Decide this on the whole list, before sharding, so that every machine agrees."""
    owner: dict[str, ImageFile] = {}
    conflicts = {}
    for f in files:
        s = os.path.normcase(sidecar(f.path))
        if s in owner:
            conflicts[f.path] = f"its sidecar '{sidecar(f.path)}' belongs to '{owner[s].display}'"
        else:
            owner[s] = f
    return conflicts


# --- progress ----------------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A one-line progress bar with images/s and ETA, redrawn at most 10 times a second; silent unless enabled
    (by default: when the stream is a terminal)."""

    def __init__(self, total: int, stream=None, enabled: bool | None = None, width: int = 24):
        self.stream = stream or sys.stderr
        self.enabled = bool(self.stream.isatty()) if enabled is None else enabled
        self.total, self.width = total, width
        self.start = time.monotonic()
        self._last = 0.0
        self._shown = False

    def render(self, done: int, failed: int = 0) -> str:
        elapsed = time.monotonic() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        frac = done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        bar = "=" * filled + (">" if filled < self.width else "") + " " * max(self.width - filled - 1, 0)
        eta = format_duration((self.total - done) / rate) if rate > 0 else "?"
        line = f"{done}/{self.total} [{bar}] {frac:4.0%} {rate:.2f} images/s ETA {eta}"
        return line + (f" ({failed} failed)" if failed else "")

    def update(self, done: int, failed: int = 0, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1 and done < self.total:
            return
        self._last = now
        self.stream.write("\r\033[K" + self.render(done, failed))
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


# --- captioning --------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    total: int = 0
    captioned: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (display path, error)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else (1 if self.failed else 0)

    def line(self) -> str:
        rate = f", {self.captioned / self.seconds:.2f} images/s" if self.captioned and self.seconds > 0 else ""
        head = "interrupted: " if self.interrupted else ""
        return (f"{head}captioned {self.captioned}, skipped {self.skipped}, failed {len(self.failed)} "
                f"of {self.total} image{'s' if self.total != 1 else ''} in {format_duration(self.seconds)}{rate}")


def caption_options(options: dict | None = None) -> dict:
    """The `generate` options for captioning, exactly as ``Blip2Pipeline.caption`` resolves them. Raises ValueError
    for invalid values, so that a bad option is a usage error rather than a failure on every image."""
    from .generation.options import CAPTION_DEFAULTS
    from .generation.options import resolve as _resolve
    generation_options = lambda d, o: {k: v for k, v in _resolve(d, o).to_dict().items() if v is not None}

    return generation_options(CAPTION_DEFAULTS, dict(options or {}))


class BatchCaptioner:
    """Caption a batch of preprocessed images with one model call: the vision encoder and Q-Former run on the whole
    batch, then the language model decodes all rows together. Same options and output as `Blip2Pipeline.caption`."""

    def __init__(self, pipe, prompt: str | None = None, **generate_kwargs):
        self.pipe = pipe
        self.kwargs = {"eos_token_id": pipe.eos_token_ids(), "pad_token_id": pipe.processor.tokenizer.pad_token_id,
                       **caption_options(generate_kwargs)}
        self.input_ids = self.attention_mask = None
        if prompt is not None:
            # The processor tokenises the prompt (with its image placeholders) exactly as for pipe.caption.
            enc = pipe.processor(images=[Image.new("RGB", (8, 8))], text=[prompt])
            self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]

    def __call__(self, pixel_values: np.ndarray) -> list[str]:
        n = len(pixel_values)
        ids = mask = None
        if self.input_ids is not None:
            ids, mask = np.repeat(self.input_ids, n, axis=0), np.repeat(self.attention_mask, n, axis=0)
        out = self.pipe.model.generate(pixel_values, ids, mask, **self.kwargs)
        texts = self.pipe.processor.batch_decode(np.asarray(out).tolist(), skip_special_tokens=True)
        return [t.strip() for t in texts]


def caption_files(
    pipe,
    files: Sequence[ImageFile],
    writer: Writer,
    *,
    existing: str = "skip",
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    prompt: str | None = None,
    generate_kwargs: dict | None = None,
    progress: Progress | bool | None = False,
) -> Summary:
    """Caption `files` into `writer`, skipping those it already holds (existing='skip'); never stops on a bad file.

    `pipe` is a `Blip2Pipeline` or a function returning one (called only if something needs captioning).
    `progress`: a Progress, True/False, or None for "when stderr is a terminal".
    """
    if existing not in ("skip", "overwrite"):
        raise ValueError(f"existing must be 'skip' or 'overwrite', got {existing!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    summary = Summary(total=len(files))
    start = time.monotonic()
    workers = workers or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlx-blip2-decode")
    bar = None
    try:
        # 1. What is left to do (stat calls and sidecar reads, in parallel: libraries live on slow disks too).
        def plan(image):
            size, mtime = _stat(image.path)
            if size is None:
                return size, mtime, FAIL, f"cannot read '{image.display}': file disappeared or is unreadable"
            return (size, mtime, *writer.status(image, size, mtime, existing))

        todo = []
        for image, (size, mtime, state, error) in zip(files, pool.map(plan, files)):
            if state == SKIP:
                summary.skipped += 1
            elif state == FAIL:
                writer.write(image, size, mtime, error=error)
                summary.failed.append((image.display, error))
            else:
                todo.append((image, size, mtime))
        writer.end_batch()
        if not todo:
            return summary

        # 2. Decode ahead in the pool while the model captions the current batch.
        if not hasattr(pipe, "model"):  # a loader: load only now that something needs captioning
            pipe = pipe()
        captioner = BatchCaptioner(pipe, prompt, **(generate_kwargs or {}))
        image_processor = pipe.processor.image_processor
        draft = draft_size_for(image_processor)
        if isinstance(progress, Progress):
            bar = progress
        else:
            bar = Progress(len(todo), enabled=progress)
        done = 0

        def fail(image, size, mtime, error):
            writer.write(image, size, mtime, error=error)
            summary.failed.append((image.display, error))

        def run(batch):
            nonlocal done
            try:
                captions = captioner(np.stack([a for _, a in batch]))
            except NotImplementedError:
                raise
            except Exception as e:  # e.g. out of memory: try the images one by one
                if len(batch) > 1:
                    for item in batch:
                        run([item])
                    return
                (image, size, mtime), _ = batch[0]
                fail(image, size, mtime, f"captioning failed: {type(e).__name__}: {e}")
                done += 1
                bar.update(done, len(summary.failed))
                return
            for ((image, size, mtime), _), caption in zip(batch, captions):
                error = writer.write(image, size, mtime, caption=caption)
                if error is None:
                    summary.captioned += 1
                else:
                    fail(image, size, mtime, error)
            writer.end_batch()
            done += len(batch)
            bar.update(done, len(summary.failed))

        window = 2 * batch_size + workers
        pending: deque = deque()
        queue = iter(todo)

        def top_up():
            while len(pending) < window:
                item = next(queue, None)
                if item is None:
                    return
                pending.append((item, pool.submit(decode, item[0].path, image_processor, draft)))

        top_up()
        batch = []
        while pending:
            item, future = pending.popleft()
            top_up()
            try:
                batch.append((item, future.result()))
            except Exception as e:  # one bad file never stops the run
                fail(*item, str(e) or type(e).__name__)
                done += 1
                bar.update(done, len(summary.failed))
            if batch and (len(batch) == batch_size or not pending):
                run(batch)
                batch = []
        writer.end_batch()
        bar.update(done, len(summary.failed), force=True)
        return summary
    except KeyboardInterrupt:
        summary.interrupted = True
        return summary
    finally:
        if bar is not None:
            bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
        summary.seconds = time.monotonic() - start
        writer.close()


def caption_paths(
    pipe,
    inputs: Sequence[str | os.PathLike],
    *,
    output: str | os.PathLike | None = None,
    format: str | None = None,
    recursive: bool = False,
    xmp_name: str = XMP_NAMES[0],
    existing: str = "skip",
    shard: tuple[int, int] | None = None,
    model_name: str | None = None,
    prompt: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    generate_kwargs: dict | None = None,
    progress: Progress | bool | None = False,
    stdout=None,
) -> tuple[Summary, list[str]]:
    """Discover the images in `inputs` and caption them: the whole of ``mlx-blip2 caption``.

    Without `output` and `format` captions are printed (`path: caption`); jsonl/csv go to `output` (or stdout);
    txt/xmp write sidecars. Returns the summary and notes (repairs made to the output file).
    Raises UsageError (or FileNotFoundError for a missing input) before loading anything.
    """
    if format is None:
        format = ("csv" if str(output).lower().endswith(".csv") else "jsonl") if output is not None else None
    if format is not None and format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got '{format}'")
    if format in ("txt", "xmp") and output is not None:
        raise UsageError(f"--format {format} writes sidecars next to the images; --output is for jsonl and csv")
    if xmp_name not in XMP_NAMES:
        raise UsageError(f"--xmp-name must be one of {', '.join(XMP_NAMES)}, got '{xmp_name}'")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    try:
        caption_options(generate_kwargs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    files = discover(inputs, recursive)
    if model_name is None and hasattr(pipe, "model"):
        model_name = str(getattr(pipe.model, "checkpoint_dir", "") or "") or None
    if format in ("txt", "xmp"):
        writer = SidecarWriter(format, xmp_name)
        writer.conflicts = sidecar_conflicts(files, writer.sidecar)
    elif format is None:
        writer = PlainWriter(stdout, bare=len(select_shard(files, shard)) == 1)
    else:
        writer = RecordWriter(format, model_name, prompt, path=output, stream=stdout)
    files = select_shard(files, shard)
    summary = caption_files(pipe, files, writer, existing=existing, batch_size=batch_size, workers=workers,
                            prompt=prompt, generate_kwargs=generate_kwargs, progress=progress)
    return summary, writer.notes


# --- command line ------------------------------------------------------------------------------------------------

EPILOG = """\
examples:
  mlx-blip2 caption photo.jpg                              print a caption
  mlx-blip2 caption ~/Pictures -r -o captions.jsonl         a whole library; rerun to resume
  mlx-blip2 caption ~/Pictures -r --format xmp              dc:description in photo.jpg.xmp (digiKam, darktable)
  mlx-blip2 caption ~/Pictures -r --format xmp --xmp-name photo.xmp   (Lightroom)
  mlx-blip2 caption dataset/ --format txt                   dataset/img1.txt next to dataset/img1.png
  mlx-blip2 caption /photos -r -o part2.jsonl --shard 2/3   the second third, on a second machine

exit status: 0 every image captioned (or skipped), 1 some failed (listed at the end), 2 usage error.
"""


def add_caption_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `caption` subcommand on an argparse subparsers object."""
    from .cli.common import add_generation_args, add_model_args

    p = subparsers.add_parser(
        "caption", help="caption images, folders and photo libraries",
        description="Caption images: print them, write a jsonl/csv file, or write .txt/XMP sidecars. Images are "
                    "recognised by extension (" + " ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS)) + "); "
                    "other files are ignored. Image files are never modified.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files and folders")
    p.add_argument("-r", "--recursive", action="store_true", help="include images in subfolders")
    p.add_argument("-o", "--output", default=None,
                   help="write records to this file (jsonl, or csv when it ends in .csv); rerunning resumes")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="jsonl/csv records (to --output, or stdout), or txt/xmp sidecars next to each image "
                        "(default: print 'path: caption', or jsonl with --output)")
    p.add_argument("--xmp-name", choices=XMP_NAMES, default=XMP_NAMES[0],
                   help="XMP sidecar naming: photo.jpg.xmp (digiKam, darktable; default) or photo.xmp (Lightroom)")
    p.add_argument("--existing", choices=("skip", "overwrite"), default="skip",
                   help="skip images already captioned in the output or with a caption sidecar (default), or "
                        "caption them again")
    p.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                   help="caption only the I-th of N deterministic parts (1 <= I <= N), to share a library between "
                        "machines; give each its own --output")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per model call (default: {DEFAULT_BATCH_SIZE})")
    p.add_argument("--workers", type=int, default=None,
                   help="image decoding threads (default: number of CPUs, at most 8)")
    p.add_argument("--prompt", default=None, help="text the caption continues, e.g. 'a photo of'")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary line (failures are "
                                                               "still listed)")
    add_model_args(p)
    add_generation_args(p)
    p.set_defaults(func=cmd_caption)
    return p


def cmd_caption(args) -> int:
    from .pipelines import DEFAULT_MODEL

    model = args.model or DEFAULT_MODEL

    def load_pipe():
        import mlx.core as mx

        from .pipelines import load

        return load(model, dtype=getattr(mx, args.dtype) if args.dtype else None)

    from .cli.common import generation_kwargs

    err = sys.stderr
    try:
        summary, notes = caption_paths(
            load_pipe, args.images, output=args.output, format=args.format, recursive=args.recursive,
            xmp_name=args.xmp_name, existing=args.existing, shard=args.shard, model_name=model, prompt=args.prompt,
            batch_size=args.batch_size, workers=args.workers, generate_kwargs=generation_kwargs(args),
            progress=False if args.quiet else None)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:  # UsageError, bad options or checkpoint
        print(f"error: {e}", file=err)
        return 2
    except OSError as e:  # the output file could not be written (disk full, permissions)
        print(f"error: {e}", file=err)
        return 1
    if not args.quiet:
        for note in notes:
            print(f"note: {note}", file=err)
        if summary.total == 0:
            hint = "" if args.recursive else " (use -r to look in subfolders)"
            print(f"no images found{hint}", file=err)
        else:
            print(summary.line(), file=err)
    for display, error in summary.failed[:50]:
        print(f"failed: {display}: {error}", file=err)
    if len(summary.failed) > 50:
        more = f"; every failure is in '{args.output}'" if args.output else ""
        print(f"failed: ... and {len(summary.failed) - 50} more{more}", file=err)
    return summary.exit_code
