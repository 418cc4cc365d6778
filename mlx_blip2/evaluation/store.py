"""One record per item, appended and fsynced per batch, so a killed run resumes where it stopped.

``DIR/records.jsonl`` holds ``{"key", "output"}`` (or ``{"key", "error"}``) lines. Under ``mlx.launch`` each rank
appends to its own part file beside it (named by :mod:`mlx_blip2.library.launch`); when every rank is done, rank 0
merges the parts into the records and only then deletes them. Reading takes the records and any parts a killed run
left, the newest line per key winning and a torn last line (a kill mid-write) dropped.
"""

from __future__ import annotations

import contextlib
import json
import os

from ..library import launch
from ..library.atomic import fsync_dir
from ..library.progress import Progress

RECORDS = "records.jsonl"
PART_SUFFIX = ".jsonl"


def records_path(out_dir: str) -> str:
    return os.path.join(out_dir, RECORDS)


def read_lines(path: str) -> list[dict]:
    """The JSON object lines of a records or part file; unreadable lines (a torn last one) are left out."""
    with open(path, "rb") as f:
        data = f.read()
    out = []
    for line in data.split(b"\n"):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(record, dict) and "key" in record:
            out.append(record)
    return out


def read_records(out_dir: str) -> dict:
    """Every finished or failed item so far: key -> record, from the records file and leftover parts."""
    path = records_path(out_dir)
    found: dict = {}
    for source in ([path] if os.path.exists(path) else []) + launch.leftover_parts(path, PART_SUFFIX):
        for record in read_lines(source):
            found[str(record["key"])] = record
    return found


class RecordAppender:
    """Appends records to this process's file: the records file alone, or rank ``rank``'s part under mlx.launch."""

    def __init__(self, out_dir: str, rank: int | None = None):
        path = records_path(out_dir)
        self.path = path if rank is None else launch.part_path(path, rank, PART_SUFFIX)
        self._repair()
        self.f = open(self.path, "ab")  # noqa: SIM115 - open for the run, closed by close()

    def _repair(self) -> None:
        """A torn last line (a kill mid-write) would glue onto the next record: cut it off first."""
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def write(self, records: list[dict]) -> None:
        """A batch's records, durable on return."""
        self.f.write(b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def merge_parts(out_dir: str) -> None:
    """Rank 0, once every rank is done: the parts' records into the records file (fsynced), then the parts deleted."""
    path = records_path(out_dir)
    parts = launch.leftover_parts(path, PART_SUFFIX)
    if not parts:
        return
    appender = RecordAppender(out_dir)
    try:
        for part in parts:
            appender.write(read_lines(part))
    finally:
        appender.close()
    for part in parts:
        os.unlink(part)
    fsync_dir(out_dir)


@contextlib.contextmanager
def recording(out_dir: str, group, total: int, progress: bool | None):
    """This process's appender and progress bar for ``total`` items. On a normal exit, under mlx.launch, every rank
    is waited for and rank 0 merges the parts; after an error the parts stay for the next run to read."""
    appender = RecordAppender(out_dir, None if group is None else group.rank)
    bar = Progress(total, enabled=progress)
    try:
        yield appender, bar
    finally:
        appender.close()
        bar.close()
    if group is not None:
        group.barrier()
        if group.rank == 0:
            merge_parts(out_dir)
