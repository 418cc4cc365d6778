"""What a task reads from its annotation files: the items to run and the references to score them against."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass
class Item:
    """One unit of work and of resumption: ``key`` is its record key (the id as text)."""

    key: str
    image: str
    question: str | None = None


@dataclass
class TaskData:
    kind: str  # "caption", "vqa", "gqa" or "retrieval"
    items: list[Item]
    ids: dict = field(default_factory=dict)  # record key -> the dataset's id (int or str), as the results file has it
    references: dict = field(default_factory=dict)  # caption: {id: [captions]}; vqa: {qid: annotation}; gqa: answers
    groups: dict = field(default_factory=dict)  # id -> subset name (NoCaps domains)
    texts: list[str] = field(default_factory=list)  # retrieval: every caption, in file order
    txt2img: list[int] = field(default_factory=list)  # retrieval: each caption's image index
    img2txt: list[list[int]] = field(default_factory=list)  # retrieval: each image's caption indices


def read_json(path: str | os.PathLike, what: str):
    """A JSON file; a clear one-line error naming the file when it is missing or not JSON."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {os.fspath(path)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{os.fspath(path)}: not a JSON {what} file ({e})") from None


def image_path(root: str | os.PathLike, relative: str) -> str:
    """``root/relative``, or ``root/<file name>`` when the annotations name a folder the images are not kept in."""
    full = os.path.join(root, relative)
    if os.path.exists(full):
        return full
    flat = os.path.join(root, os.path.basename(relative))
    return flat if os.path.exists(flat) else full


def numeric_id(text: str):
    return int(text) if text.isdigit() else text


def require(entry, keys: tuple[str, ...], path, index) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{os.fspath(path)}: entry {index} is not an object")
    for key in keys:
        if key not in entry:
            raise ValueError(f"{os.fspath(path)}: entry {index} has no {key!r}")


def limited(items: list, limit: int | None) -> list:
    """The first ``limit`` items (all when None): a quick subset that a later full run extends, not redoes."""
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    return items if limit is None else items[:limit]
