"""Training examples from what people have: captioned photo folders, JSONL/CSV tables, COCO caption annotations.

- a folder of images whose captions sit beside them: the ``.txt`` sidecar, else the XMP ``dc:description``
  (x-default) that ``mlx-blip2 caption`` writes and a person corrects; images without a caption are skipped;
- JSON Lines or CSV rows with an image path (``image``, ``path``, ``file_name`` or ``file``) and either a caption
  (``caption`` or ``text``) or a question and its answer (``question``, ``answer`` or a list ``answers``: the most
  frequent), relative paths read from ``image_root`` or the table's folder;
- COCO-style caption annotations: a JSON object with ``images`` (``id``, ``file_name``) and ``annotations``
  (``image_id``, ``caption``), one example per annotation, images under ``image_root`` (default: the JSON's folder);
- the search page's corrections file (``library.sqlite.corrections.jsonl``): the latest correction of each image.

A row that cannot be used becomes a one-line error naming the file and line; the rest still load.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter
from dataclasses import dataclass

from ..files import find_images
from ..library.sidecars import XMP_NAMES, txt_sidecar, xmp_sidecar
from ..library.xmp import XmpError, xmp_description
from ..photo_index.corrections import read_corrections

CORRECTIONS_SUFFIX = ".corrections.jsonl"  # written beside a photo index by the search page's caption editor

IMAGE_KEYS = ("image", "path", "file_name", "file")
CAPTION_KEYS = ("caption", "text")


@dataclass(frozen=True)
class Example:
    image: str  # path to the image file
    target: str  # the caption or answer the model must produce
    question: str | None = None  # VQA examples: the question (the prompt is the VQA template around it)
    where: str = ""  # file:line the example came from, for error lines


class DatasetError(ValueError):
    """A data source that cannot be read at all (missing, not a known format)."""


def sidecar_caption(path: str) -> str | None:
    """The corrected caption beside an image: its .txt sidecar, else its XMP dc:description (x-default)."""
    txt = txt_sidecar(path)
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        if text:
            return text
    for naming in XMP_NAMES:
        xmp = xmp_sidecar(path, naming)
        if os.path.isfile(xmp):
            with open(xmp, "rb") as f:
                text = (xmp_description(f.read()) or "").strip()
            if text:
                return text
    return None


def folder_examples(folder: str, errors: list[str]) -> list[Example]:
    out, uncaptioned = [], 0
    for f in find_images([folder], recursive=True).files:
        try:
            caption = sidecar_caption(f.path)
        except (OSError, XmpError) as e:
            errors.append(f"{f.display}: unreadable sidecar ({e})")
            continue
        if caption is None:
            uncaptioned += 1
        else:
            out.append(Example(f.path, caption, where=f.display))
    if uncaptioned:
        errors.append(f"{folder}: {uncaptioned} image(s) without a .txt or XMP caption skipped")
    return out


def _first(row: dict, keys) -> str | None:
    for k in keys:
        v = row.get(k)
        if isinstance(v, (str, int)) and str(v).strip():
            return str(v).strip()
    return None


def row_example(row, root: str, where: str) -> Example:
    """One table row -> Example; ValueError with the reason otherwise."""
    if not isinstance(row, dict):
        raise ValueError("expected an object with an image path and a caption or a question and answer")
    image = _first(row, IMAGE_KEYS)
    if image is None:
        raise ValueError(f"no image path (one of {', '.join(IMAGE_KEYS)})")
    path = os.path.join(root, os.path.expanduser(image))
    question = _first(row, ("question",))
    if question is not None:
        answer = _first(row, ("answer",))
        answers = row.get("answers")
        if answer is None and isinstance(answers, list) and answers:
            texts = [a.get("answer") if isinstance(a, dict) else a for a in answers]
            texts = [str(t).strip() for t in texts if isinstance(t, (str, int)) and str(t).strip()]
            answer = Counter(texts).most_common(1)[0][0] if texts else None
        if answer is None:
            raise ValueError("a question without an answer ('answer' or 'answers')")
        return Example(path, answer, question, where)
    caption = _first(row, CAPTION_KEYS)
    if caption is None:
        raise ValueError(f"no caption ({', '.join(CAPTION_KEYS)}) and no question")
    return Example(path, caption, where=where)


def table_examples(path: str, root: str, errors: list[str]) -> list[Example]:
    out = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        if path.lower().endswith(".csv"):
            rows = ((i + 2, row, None) for i, row in enumerate(csv.DictReader(f)))  # line 1 is the header
        else:
            rows = ((i + 1, *_json_line(line)) for i, line in enumerate(f) if line.strip())
        for line, row, problem in rows:
            where = f"{path}:{line}"
            try:
                if problem:
                    raise ValueError(problem)
                out.append(row_example(row, root, where))
            except ValueError as e:
                errors.append(f"{where}: {e}")
    return out


def _json_line(line: str):
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})"


def coco_examples(path: str, data: dict, root: str, errors: list[str]) -> list[Example]:
    images = {}
    for im in data.get("images") or []:
        if isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str):
            images[im["id"]] = os.path.join(root, im["file_name"])
    out = []
    for i, ann in enumerate(data.get("annotations") or []):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or not ann["caption"].strip():
            errors.append(f"{where}: no caption")
        elif ann.get("image_id") not in images:
            errors.append(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        else:
            out.append(Example(images[ann["image_id"]], ann["caption"].strip(), where=where))
    return out


def correction_examples(path: str) -> list[Example]:
    """The search page's corrections file: only the latest correction of each image (a person may save twice)."""
    return [Example(r["path"], r["caption"], where=f"{path}: {r['path']}") for r in read_corrections(path)]


def read_examples(source: str, image_root: str | None = None, errors: list[str] | None = None) -> list[Example]:
    """Examples from a folder, a .jsonl/.json/.csv table or a COCO annotation file; problems go to ``errors``."""
    errors = [] if errors is None else errors
    source = os.path.expanduser(os.fspath(source))
    if os.path.isdir(source):
        return folder_examples(source, errors)
    if not os.path.isfile(source):
        raise DatasetError(f"training data not found: '{source}'")
    root = os.path.expanduser(image_root) if image_root else os.path.dirname(os.path.abspath(source))
    lower = source.lower()
    if lower.endswith(".json"):
        try:
            with open(source, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{source}: not valid JSON ({e})") from None
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            return coco_examples(source, data, root, errors)
        if not isinstance(data, list):
            raise DatasetError(f"{source}: expected COCO annotations ('images' and 'annotations') or a list of rows")
        out = []
        for i, row in enumerate(data):
            try:
                out.append(row_example(row, root, f"{source}: [{i}]"))
            except ValueError as e:
                errors.append(f"{source}: [{i}]: {e}")
        return out
    if lower.endswith(CORRECTIONS_SUFFIX):
        return correction_examples(source)
    if lower.endswith((".jsonl", ".csv")):
        return table_examples(source, root, errors)
    raise DatasetError(f"{source}: expected a folder of captioned images, a .jsonl, .csv or COCO .json file")


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded ``fraction`` of the distinct images (all their examples) held out."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {fraction}")
    images = sorted({e.image for e in examples})
    n = round(len(images) * fraction)
    if fraction > 0 and n == 0 and len(images) > 1:
        n = 1
    held = set(random.Random(seed).sample(images, n))
    return [e for e in examples if e.image not in held], [e for e in examples if e.image in held]
