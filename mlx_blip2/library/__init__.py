"""Caption a photo library: ``mlx-blip2 caption PATH... [-r] [-o captions.jsonl | --format txt|xmp]``.

The data flow, one module per step:

- :mod:`.run` — find the images (:mod:`mlx_blip2.files`), keep this machine's shard (:mod:`.shards`), ask the output
  what is left to do, decode ahead in threads (``Engine.preprocess``) and caption in batches (``Engine.generate``);
  a bad file is recorded and retried next time, never fatal.
- :mod:`.writer` — the output interface, and printing ``path: caption``.
- :mod:`.records` — jsonl/csv records: resumable, fsynced per batch, torn last line repaired, compacted to one record
  per image; ``path`` is valid UTF-8 text and ``path_b64`` the exact bytes of a name that is not.
- :mod:`.sidecars` — ``.txt`` and XMP sidecars, with :mod:`.xmp` editing an existing packet's ``dc:description``
  (x-default) in place and :mod:`.atomic` replacing files crash-safely.
- :mod:`.progress` — the progress bar (tqdm) and the summary line.
- :mod:`.manifest` — ``--manifest FILE``: the images listed in a text, CSV or Parquet file, instead of a walk.
- :mod:`.job` — the whole command: a :class:`CaptionJob` run in one process (:mod:`.run`), as a job under
  ``mlx.launch`` (:mod:`.distributed`, with each rank's records in a part file, :mod:`.parts`, merged into the
  output), or into Parquet shards (:mod:`.parquet`).
- :mod:`.launch` — what captioning and indexing share under ``mlx.launch``: the group of ranks, the output's lock
  and the part files' names.
"""

from .atomic import atomic_write
from .job import ALL_FORMATS, CaptionJob, caption, caption_paths
from .manifest import read_manifest
from .parts import leftover_parts, merge_parts, part_path
from .progress import Progress, Summary, format_duration
from .records import CSV_COLUMNS, RecordWriter, record_path
from .run import (
    DEFAULT_BATCH_SIZE,
    FORMATS,
    BatchCaptioner,
    caption_files,
    caption_options,
)
from .shards import parse_shard, select_shard, shard_index
from .sidecars import (
    XMP_NAMES,
    SidecarWriter,
    sidecar_conflicts,
    txt_sidecar,
    xmp_sidecar,
)
from .writer import FAIL, SKIP, TODO, PlainWriter, UsageError, Writer
from .xmp import XmpError, update_xmp, xml_text, xmp_description

__all__ = [
    "ALL_FORMATS",
    "CSV_COLUMNS",
    "DEFAULT_BATCH_SIZE",
    "FAIL",
    "FORMATS",
    "SKIP",
    "TODO",
    "XMP_NAMES",
    "BatchCaptioner",
    "CaptionJob",
    "PlainWriter",
    "Progress",
    "RecordWriter",
    "SidecarWriter",
    "Summary",
    "UsageError",
    "Writer",
    "XmpError",
    "atomic_write",
    "caption",
    "caption_files",
    "caption_options",
    "caption_paths",
    "format_duration",
    "leftover_parts",
    "merge_parts",
    "parse_shard",
    "part_path",
    "read_manifest",
    "record_path",
    "select_shard",
    "shard_index",
    "sidecar_conflicts",
    "txt_sidecar",
    "update_xmp",
    "xml_text",
    "xmp_description",
    "xmp_sidecar",
]
