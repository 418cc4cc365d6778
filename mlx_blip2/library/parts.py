"""Part files: the records of one rank of a distributed run, kept beside the output until merged into it.

Rank ``r`` of a run writing ``captions.jsonl`` appends to ``.captions.jsonl.part-r.jsonl`` (named by :mod:`.launch`;
a RecordWriter: fsynced per batch, locked). Whoever holds the output's lock merges every part into the output (appended, fsynced) and only
then deletes it, so a kill at any point loses nothing: a part merged twice is deduplicated (one record per image, the
newest), and a half-written last line is dropped as the RecordWriter drops it. Any run on the output merges the parts
it finds first, with or without ``mlx.launch`` and whatever its number of ranks.
"""

from __future__ import annotations

import os

from ..files import display_path
from .launch import leftover_parts as _leftover_parts
from .launch import part_path as _part_path
from .atomic import fsync_dir
from .records import RecordWriter, parse_json

PART_SUFFIX = ".jsonl"


def part_path(output: str | os.PathLike, rank: int) -> str:
    return _part_path(output, rank, PART_SUFFIX)


def leftover_parts(output: str | os.PathLike) -> list[str]:
    """The record part files beside ``output``, whatever run (and number of ranks) left them, by rank."""
    return _leftover_parts(output, PART_SUFFIX)


def read_part(path: str) -> tuple[list[dict], int]:
    """(the records of a part file, lines that could not be read). A half-written last line is not a record."""
    with open(path, "rb") as f:
        data = f.read()
    records, bad = [], 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        record = parse_json(line)
        if record is not None:
            records.append(record)
        elif i < len(lines) - 1:  # a whole line that is not a record (a torn last line is expected after a kill)
            bad += 1
    return records, bad


def merge_parts(writer: RecordWriter, parts: list[str]) -> int:
    """Append the records of ``parts`` to ``writer`` (a file output, whose lock the caller holds), make them durable,
    then delete the parts. Returns the number of records merged; notes go to ``writer.notes``."""
    merged = 0
    for path in parts:
        records, bad = read_part(path)
        for record in records:
            writer.append(record)
        merged += len(records)
        if bad:
            writer.notes.append(f"'{display_path(path)}': dropped {bad} unreadable line(s)")
    writer.end_batch()  # fsync: the records are in the output before any part goes
    for path in parts:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    if parts:
        fsync_dir(os.path.dirname(parts[0]))
    return merged


def merge_leftovers(writer: RecordWriter) -> None:
    """Merge the parts an earlier distributed run left beside ``writer``'s file (a kill, or a relaunch with other N)."""
    if writer.path is None:
        return
    parts = leftover_parts(writer.path)
    if parts:
        n = merge_parts(writer, parts)
        writer.notes.append(f"merged {n} record(s) from {len(parts)} part file(s) of an earlier distributed run")
