"""The whole of ``mlx-blip2 caption``: one process (:func:`.run.caption_paths`, unchanged), a launched job
(:mod:`.distributed`, under ``mlx.launch``), or Parquet shards (:mod:`.parquet`, either way)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from .distributed import Group, Job, caption_distributed, current_group, end_job
from .parquet import DEFAULT_SHARD_SIZE, caption_parquet
from .progress import Summary
from .run import DEFAULT_BATCH_SIZE, FORMATS, _output_format, caption_paths, plan
from .sidecars import XMP_NAMES
from .writer import UsageError

ALL_FORMATS = (*FORMATS, "parquet")
AUTO = "auto"


def _parquet(pipe, files, output, group: Group | None, kwargs: dict, shard_size: int) -> tuple[Summary, list[str]]:
    rank, size = (group.rank, group.size) if group is not None else (0, 1)
    run = {"model_name": kwargs["model_name"], "prompt": kwargs["prompt"], "shard_size": shard_size,
           "existing": kwargs["existing"], "rank": rank, "size": size, "progress": kwargs["progress"],
           "batch_size": kwargs["batch_size"], "workers": kwargs["workers"]}
    if group is None:
        return caption_parquet(pipe, files, output, generate_kwargs=kwargs["generate_kwargs"], **run)
    start = time.monotonic()
    summary, report = Summary(total=len(files), rank=rank), {"fatal": None, "usage": False, "part": None}
    try:
        summary, _ = caption_parquet(pipe, files, output, generate_kwargs=kwargs["generate_kwargs"], **run)
    except Exception as e:  # noqa: BLE001 - reported by rank 0; every rank reaches the last barrier
        report.update(fatal=f"{type(e).__name__}: {e}", usage=isinstance(e, (UsageError, NotImplementedError)))
    finally:
        end_job(group, summary, report)
    summary.total, summary.seconds = len(files), time.monotonic() - start
    return summary, []


def caption(pipe, inputs: Sequence[str | os.PathLike], *, output=None, format: str | None = None,
            recursive: bool = False, xmp_name: str = XMP_NAMES[0], existing: str = "skip",
            shard: tuple[int, int] | None = None, model_name: str | None = None, prompt: str | None = None,
            batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None, generate_kwargs: dict | None = None,
            progress=False, stdout=None, manifest=None, shard_size: int = DEFAULT_SHARD_SIZE,
            group: Group | None | str = AUTO) -> tuple[Summary, list[str]]:
    """Caption images, folders or a manifest, alone or as one rank of an ``mlx.launch`` job (``group``: "auto"
    looks at the environment; None runs alone). A non-zero ``summary.rank`` means: not rank 0, report nothing."""
    if group == AUTO:
        group = current_group()
    if format != "parquet" and group is None:  # exactly the one-process run
        return caption_paths(pipe, inputs, output=output, format=format, recursive=recursive, xmp_name=xmp_name,
                             existing=existing, shard=shard, model_name=model_name, prompt=prompt,
                             batch_size=batch_size, workers=workers, generate_kwargs=generate_kwargs,
                             progress=progress, stdout=stdout, manifest=manifest)
    if format == "parquet":
        if output is None:
            raise UsageError("--format parquet writes shards into a folder: give it with -o")
        _output_format(None, None, xmp_name, batch_size)
    else:
        format = _output_format(output, format, xmp_name, batch_size)
    files, mine, model_name = plan(pipe, inputs, recursive, manifest, shard, model_name, generate_kwargs)
    kwargs = {"model_name": model_name, "prompt": prompt, "existing": existing, "batch_size": batch_size,
              "workers": workers, "generate_kwargs": dict(generate_kwargs or {}), "progress": progress}
    if format == "parquet":
        return _parquet(pipe, mine, output, group, kwargs, shard_size)
    job = Job(files, mine, format, None if output is None else os.fspath(output), xmp_name, **kwargs)
    return caption_distributed(pipe, job, group)
