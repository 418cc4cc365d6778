"""Dataset-scale output: Parquet shards with a done marker each (``--format parquet -o DIR [--shard-size S]``).

The images (a manifest's, in its order, or a folder walk's) are cut into shards of S by position: shard k is
``DIR/{k:05d}.parquet``, followed by its done marker ``DIR/_{k:05d}_stats.json`` once it is complete (as img2dataset
does, under a name that starts with ``_`` so that pandas, pyarrow, DuckDB and Ray read ``DIR`` whole as data). A
shard whose marker is there, for the same images, is never redone (nothing of it is even stat'ed); an unfinished one
is captioned again whole, so a kill costs at most one shard per rank. Every shard has the schema :func:`schema`,
whether or not any of its images failed. Under ``mlx.launch`` the unfinished shards are dealt round robin to the
ranks; each rank writes its own shards (no merge). Needs pyarrow (``pip install 'mlx-blip2[parquet]'``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from ..files import ImageFile, display_path
from .atomic import atomic_write, fsync_dir
from .progress import Summary
from .records import make_record
from .run import caption_files
from .writer import TODO, UsageError, Writer

DEFAULT_SHARD_SIZE = 10_000
COLUMNS = ("path", "caption", "error", "model", "prompt", "size", "mtime", "path_b64", "raw")
_BARE_MARKER = re.compile(r"(\d{5,})_stats\.json")  # the marker name before it started with "_"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("--format parquet needs pyarrow: pip install 'mlx-blip2[parquet]'") from None
    return pa, pq


def schema():
    """The columns of every shard: text, except ``size`` (int64 bytes) and ``mtime`` (float64 seconds)."""
    pa, _ = _pyarrow()
    types = {"size": pa.int64(), "mtime": pa.float64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])


def shard_paths(directory: str, k: int) -> tuple[str, str]:
    return os.path.join(directory, f"{k:05d}.parquet"), os.path.join(directory, f"_{k:05d}_stats.json")


def adopt_bare_markers(directory: str) -> None:
    """Give the done markers of a folder written under the bare names (``00000_stats.json``, which readers take for
    data) their ``_`` names. Safe for ranks doing it at once: a rename is atomic, and one that lost the race is
    already done."""
    for name in os.listdir(directory):
        if _BARE_MARKER.fullmatch(name):
            try:
                os.replace(os.path.join(directory, name), os.path.join(directory, "_" + name))
            except FileNotFoundError:
                pass


def is_done(directory: str, k: int, files: list[ImageFile]) -> bool:
    """Whether shard k is complete for exactly these images (its marker names their count, first and last)."""
    try:
        with open(shard_paths(directory, k)[1], "rb") as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return False
    return (isinstance(stats, dict) and stats.get("count") == len(files)
            and stats.get("first") == display_path(files[0].path) and stats.get("last") == display_path(files[-1].path)
            and os.path.exists(shard_paths(directory, k)[0]))


class ParquetShardWriter(Writer):
    """One shard's records, written as a Parquet file (then its marker) when every image of it has one."""

    def __init__(self, directory: str, k: int, files: list[ImageFile], model=None, prompt=None):
        self.directory, self.k, self.files, self.model, self.prompt = directory, k, files, model, prompt
        self.records: dict[str, dict] = {}
        self.notes: list[str] = []
        self.start = time.monotonic()

    def status(self, image, size, mtime, existing):
        return TODO, None

    def write(self, image, size, mtime, caption=None, error=None):
        self.records[image.path] = make_record(image, size, mtime, caption, error, self.model, self.prompt)

    def close(self) -> None:
        if len(self.records) < len(self.files):  # interrupted: no shard, no marker; it is redone next time
            return
        pa, pq = _pyarrow()
        rows = [self.records[f.path] for f in self.files]
        table = pa.table({c: [r.get(c) for r in rows] for c in COLUMNS}, schema=schema())
        data_path, stats_path = shard_paths(self.directory, self.k)
        tmp = os.path.join(self.directory, f".{self.k:05d}.parquet.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, data_path)
        fsync_dir(self.directory)
        failed = sum(1 for r in rows if "error" in r)
        stats = {"shard": self.k, "count": len(rows), "captioned": len(rows) - failed, "failed": failed,
                 "first": rows[0]["path"], "last": rows[-1]["path"], "model": self.model,
                 "seconds": round(time.monotonic() - self.start, 3)}
        atomic_write(stats_path, (json.dumps(stats, ensure_ascii=False) + "\n").encode("utf-8"))


class _Once:
    """A pipeline loader called at most once (shards share the model)."""

    def __init__(self, load):
        self.load, self.pipe = load, None

    def __call__(self):
        if self.pipe is None:
            self.pipe = self.load()
        return self.pipe


def caption_parquet(pipe, files: list[ImageFile], job, *, rank: int = 0, size: int = 1) -> tuple[Summary, list[str]]:
    """Caption ``files`` into Parquet shards in the folder ``job.output`` (a CaptionJob): this rank's share of the
    unfinished shards."""
    directory, model_name, prompt, shard_size, existing = (job.output, job.model_name, job.prompt, job.shard_size,
                                                            job.existing)
    kwargs = {"batch_size": job.batch_size, "workers": job.workers, "generate_kwargs": job.generate_kwargs}
    _pyarrow()
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UsageError(f"--format parquet writes shards into a folder; '{display_path(directory)}' is a file")
    os.makedirs(directory, exist_ok=True)
    adopt_bare_markers(directory)
    shards = [files[i:i + shard_size] for i in range(0, len(files), shard_size)]
    pending = [k for k, shard in enumerate(shards) if existing == "overwrite" or not is_done(directory, k, shard)]
    summary = Summary(total=len(files), rank=rank)
    if rank == 0:  # every rank sees the same markers; the job's summary adds up the ranks'
        summary.skipped = sum(len(shard) for k, shard in enumerate(shards) if k not in set(pending))
    if not hasattr(pipe, "engine"):
        pipe = _Once(pipe)
    start = time.monotonic()
    for k in pending[rank::size]:
        writer = ParquetShardWriter(directory, k, shards[k], model_name, prompt)
        part = caption_files(pipe, shards[k], writer, existing="overwrite", progress=False, **kwargs)
        summary.captioned += part.captioned
        summary.failed += part.failed
        if part.interrupted:
            summary.interrupted = True
            break
        if rank == 0 and job.progress is not False:
            done = sum(1 for j, shard in enumerate(shards) if is_done(directory, j, shard))
            print(f"progress: shard {k:05d} written; {done}/{len(shards)} shards done", file=sys.stderr, flush=True)
    summary.seconds = time.monotonic() - start
    return summary, []
