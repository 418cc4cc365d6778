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

from .._exports import lazy_exports

# The public names, imported on first use: the photo index reads records and sidecars through this package
# without loading the captioning run (the engine, mlx-lm, transformers).
_NAMES = {  # submodule: the public names it holds
    "atomic": "atomic_write",
    "job": "ALL_FORMATS CaptionJob caption caption_paths",
    "manifest": "read_manifest",
    "parts": "leftover_parts merge_parts part_path",
    "progress": "Progress Summary format_duration",
    "records": "CSV_COLUMNS RecordWriter record_path",
    "run": "BatchCaptioner DEFAULT_BATCH_SIZE FORMATS caption_files caption_options",
    "shards": "parse_shard select_shard shard_index",
    "sidecars": "SidecarWriter XMP_NAMES sidecar_conflicts txt_sidecar xmp_sidecar",
    "writer": "FAIL PlainWriter SKIP TODO UsageError Writer",
    "xmp": "XmpError update_xmp xml_text xmp_description",
}
_EXPORTS = {name: module for module, names in _NAMES.items() for name in names.split()}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
