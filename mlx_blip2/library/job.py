"""The whole of ``mlx-blip2 caption``: a :class:`CaptionJob` (built once, by the command line or a caller) run in one
process (:func:`.run.caption_found`), as one rank of an ``mlx.launch`` job (:mod:`.distributed`), or into Parquet
shards (:mod:`.parquet`, either way)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from .distributed import caption_distributed, end_job
from .launch import Group, current_group
from .parquet import DEFAULT_SHARD_SIZE, caption_parquet
from .progress import Progress, Summary
from .run import DEFAULT_BATCH_SIZE, FORMATS, caption_found, plan
from .sidecars import XMP_NAMES
from .writer import UsageError

ALL_FORMATS = (*FORMATS, "parquet")
AUTO = "auto"


@dataclass(frozen=True)
class CaptionJob:
    """What to caption and where the captions go: the options of ``mlx-blip2 caption``.

    ``inputs``: image files and folders (or ``manifest``, a file listing them). ``format``: jsonl/csv records (to
    ``output``, or stdout), txt/xmp sidecars, parquet shards in the ``output`` folder, or None: print them (jsonl or
    csv, by the name, when ``output`` is given). ``shard``: (i, n), the i-th of n deterministic parts.
    ``generate_kwargs``: generation options over the captioning recipe. ``progress``: a bar (True, a Progress),
    none (False), or None for "when stderr is a terminal".
    """

    inputs: Sequence[str | os.PathLike] = ()
    manifest: str | os.PathLike | None = None
    recursive: bool = False
    output: str | os.PathLike | None = None
    format: str | None = None
    xmp_name: str = XMP_NAMES[0]
    existing: str = "skip"
    shard: tuple[int, int] | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    model_name: str | None = None
    prompt: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None
    generate_kwargs: Mapping = field(default_factory=dict)
    progress: Progress | bool | None = False

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "generate_kwargs", MappingProxyType(dict(self.generate_kwargs or {})))

    def output_format(self) -> str | None:
        """The format the captions are written in (None: printed), after checking that the options make sense
        together: a UsageError otherwise, raised before anything is read."""
        fmt = self.format
        if fmt == "parquet":
            if self.output is None:
                raise UsageError("--format parquet writes shards into a folder: give it with -o")
        else:
            if fmt is None and self.output is not None:
                fmt = "csv" if os.fspath(self.output).lower().endswith(".csv") else "jsonl"
            if fmt is not None and fmt not in FORMATS:
                raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
            if fmt in ("txt", "xmp") and self.output is not None:
                raise UsageError(f"--format {fmt} writes sidecars next to the images; --output is for jsonl and csv")
        if self.xmp_name not in XMP_NAMES:
            raise UsageError(f"--xmp-name must be one of {', '.join(XMP_NAMES)}, got '{self.xmp_name}'")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        return fmt


def _parquet(pipe, files, job: CaptionJob, group: Group | None) -> tuple[Summary, list[str]]:
    if group is None:
        return caption_parquet(pipe, files, job)
    start = time.monotonic()
    summary, report = Summary(total=len(files), rank=group.rank), {"fatal": None, "usage": False, "part": None}
    try:
        summary, _ = caption_parquet(pipe, files, job, rank=group.rank, size=group.size)
    except Exception as e:  # noqa: BLE001 - reported by rank 0; every rank reaches the last barrier
        report.update(fatal=f"{type(e).__name__}: {e}", usage=isinstance(e, (UsageError, NotImplementedError)))
    finally:
        end_job(group, summary, report)
    summary.total, summary.seconds = len(files), time.monotonic() - start
    return summary, []


def caption(pipe, job: CaptionJob, *, group: Group | None | str = AUTO, stdout=None) -> tuple[Summary, list[str]]:
    """Run ``job``, alone or as one rank of an ``mlx.launch`` job (``group``: "auto" looks at the environment; None
    runs alone). Returns the summary and notes (repairs made to the output file); a non-zero ``summary.rank`` means:
    not rank 0, report nothing. ``pipe``: a pipeline, or a function returning one (called only if something needs a
    caption). Raises UsageError (or FileNotFoundError for a missing input) before loading anything."""
    if group == AUTO:
        group = current_group()
    job = replace(job, format=job.output_format())
    files, mine, model_name = plan(pipe, job)
    job = replace(job, model_name=model_name)
    if job.format == "parquet":
        return _parquet(pipe, mine, job, group)
    if group is None:
        return caption_found(pipe, job, files, mine, stdout)
    return caption_distributed(pipe, job, files, mine, group)


def caption_paths(pipe, inputs: Sequence[str | os.PathLike], *, stdout=None, **options) -> tuple[Summary, list[str]]:
    """``caption(pipe, CaptionJob(inputs, **options))`` in this process: captions printed (``path: caption``),
    written as records (``output=``, ``format=``) or as sidecars (``format="txt"`` or ``"xmp"``)."""
    return caption(pipe, CaptionJob(inputs, **options), group=None, stdout=stdout)
