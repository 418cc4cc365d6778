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

import importlib

# The public names, imported on first use: the photo index reads records and sidecars through this package
# without loading the captioning run (the engine, mlx-lm, transformers).
_EXPORTS = {
    "atomic_write": "atomic",
    "ALL_FORMATS": "job",
    "CaptionJob": "job",
    "caption": "job",
    "caption_paths": "job",
    "read_manifest": "manifest",
    "leftover_parts": "parts",
    "merge_parts": "parts",
    "part_path": "parts",
    "Progress": "progress",
    "Summary": "progress",
    "format_duration": "progress",
    "CSV_COLUMNS": "records",
    "RecordWriter": "records",
    "record_path": "records",
    "BatchCaptioner": "run",
    "DEFAULT_BATCH_SIZE": "run",
    "FORMATS": "run",
    "caption_files": "run",
    "caption_options": "run",
    "parse_shard": "shards",
    "select_shard": "shards",
    "shard_index": "shards",
    "SidecarWriter": "sidecars",
    "XMP_NAMES": "sidecars",
    "sidecar_conflicts": "sidecars",
    "txt_sidecar": "sidecars",
    "xmp_sidecar": "sidecars",
    "FAIL": "writer",
    "PlainWriter": "writer",
    "SKIP": "writer",
    "TODO": "writer",
    "UsageError": "writer",
    "Writer": "writer",
    "XmpError": "xmp",
    "update_xmp": "xmp",
    "xml_text": "xmp",
    "xmp_description": "xmp",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
