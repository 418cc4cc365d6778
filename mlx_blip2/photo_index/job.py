"""The whole of ``mlx-blip2 index``: an :class:`IndexJob` (built once, by the command line or a caller) run in one
process (:func:`.indexer.index_paths`) or as one rank of an ``mlx.launch`` job (:mod:`.distributed`)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from ..files import display_path
from ..library.launch import Group, current_group
from .distributed import run_launched
from .indexer import IndexReport, index_paths
from .store import PhotoIndex, PhotoIndexError

AUTO = "auto"


@dataclass(frozen=True)
class IndexJob:
    """What to index and into which index: the options of ``mlx-blip2 index``.

    ``paths``: folders and image files. ``db``: the index file (its embeddings go beside it, in ``DB.vectors``).
    ``model``: a retrieval checkpoint (default: the index's, or Salesforce/blip2-itm-vit-g for a new index).
    ``dtype``: the compute precision (an ``mx.Dtype``; None: float32 on the CPU). ``progress``: a bar (True), none
    (False), or None for "when stderr is a terminal".
    """

    paths: Sequence[str | os.PathLike]
    db: str | os.PathLike
    model: str | None = None
    recursive: bool = False
    batch_size: int = 8
    dtype: object = None
    progress: bool | None = None

    def __post_init__(self):
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "db", os.fspath(self.db))

    def check(self) -> None:
        """A ValueError (or FileNotFoundError) for options that can't work, raised before anything is opened."""
        if self.batch_size <= 0:
            raise ValueError("--batch-size must be positive")
        for path in self.paths:
            if not os.path.exists(path):
                raise FileNotFoundError(f"no such file or folder: '{display_path(os.fsdecode(path))}'")


def index(job: IndexJob, *, group: Group | None | str = AUTO) -> IndexReport | None:
    """Run ``job``, alone or as one rank of an ``mlx.launch`` job (``group``: "auto" looks at the environment; None
    runs alone). Returns the report of the whole job, with ``searchable`` set; None on a rank other than 0."""
    job.check()
    if group == AUTO:
        group = current_group()
    try:
        if group is not None:
            report = run_launched(job, group)
            if report is None:
                return None
        else:
            with PhotoIndex(job.db) as db:
                report = index_paths(db, job.paths, model=job.model, recursive=job.recursive,
                                     batch_size=job.batch_size, dtype=job.dtype, progress=job.progress)
        with PhotoIndex(job.db, create=False) as db:
            report.searchable = db.count()
    except sqlite3.Error as e:
        raise PhotoIndexError(f"'{job.db}': {e}") from None
    return report
