"""A captioning run: find the images, decide what is left to do, decode ahead in threads, caption in batches.

Data flow: :func:`plan` finds the files (:func:`mlx_blip2.files.find_images`) and keeps this machine's shard;
:func:`caption_found` picks the output (a :class:`~.writer.Writer`); :func:`caption_files` asks the output what still
needs a caption, decodes the next images in a thread pool (``Engine.preprocess``: the one image opener, exact pixels)
while the model captions the current batch (``Engine.generate`` on rows of preprocessed pixels, the vision encoder
batched), and hands the output each batch. One bad file never stops a run: it is recorded as a failure and tried
again next time.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..files import ImageFile, display_path, find_images, utf8_text
from ..generation.options import OPTION_FLAGS, GenerationOptions
from ..generation.recipes import CAPTION_DEFAULTS, resolve_recipe
from .manifest import read_manifest
from .parts import merge_leftovers
from .progress import Progress, Summary
from .records import RecordWriter
from .shards import select_shard
from .sidecars import sidecar_writer
from .writer import FAIL, SKIP, PlainWriter, UsageError, Writer, file_stat

FORMATS = ("jsonl", "csv", "txt", "xmp")
DEFAULT_BATCH_SIZE = 8


def caption_options(options: dict | None = None, recipe: dict | None = None) -> GenerationOptions:
    """The generation options of a caption, exactly as ``Blip2Pipeline.caption`` resolves them (LAVIS's recipe
    overridden by ``options``). A bad value is a UsageError naming its flag, raised before anything is loaded."""
    try:
        return resolve_recipe(CAPTION_DEFAULTS if recipe is None else recipe, options, names=OPTION_FLAGS)
    except ValueError as e:
        raise UsageError(str(e)) from None


class BatchCaptioner:
    """Caption a batch of preprocessed images with one model call: same options and output as
    ``Blip2Pipeline.caption``."""

    def __init__(self, pipe, prompt: str | None = None, **generate_kwargs):
        self.engine = pipe.engine
        self.options = caption_options(generate_kwargs, pipe.caption_defaults)
        self.prompt = pipe.caption_prompt(prompt)

    def preprocess(self, path: str) -> np.ndarray:
        return self.engine.preprocess(path)  # thread-safe

    def __call__(self, pixel_values: Sequence[np.ndarray]) -> list[str]:
        from ..pipelines.engine import Row  # here: the command line's help and usage errors load no model code

        rows = [Row(pixel_values=p, prompt=self.prompt) for p in pixel_values]
        return [completions[0].text for completions in self.engine.generate(rows, self.options)]


def _plan(files: Sequence[ImageFile], writer: Writer, existing: str, pool, summary: Summary) -> list[tuple]:
    """(image, size, mtime) of the files that need a caption. Stat calls and sidecar reads run in the pool: libraries
    live on slow disks too."""
    def status(image):
        size, mtime = file_stat(image.path)
        if size is None:
            why = "no such file" if not os.path.lexists(image.path) else "file unreadable"
            return size, mtime, FAIL, f"cannot read '{display_path(image.display)}': {why}"
        return (size, mtime, *writer.status(image, size, mtime, existing))

    todo = []
    for image, (size, mtime, state, error) in zip(files, pool.map(status, files)):
        if state == SKIP:
            summary.skipped += 1
        elif state == FAIL:
            writer.write(image, size, mtime, error=error)
            summary.failed.append((display_path(image.display), utf8_text(error)))
        else:
            todo.append((image, size, mtime))
    writer.end_batch()
    return todo


def _decode_ahead(todo: list[tuple], pool, preprocess, window: int):
    """(item, future of its pixels) in order, keeping ``window`` decodes in flight."""
    pending: deque = deque()
    queue = iter(todo)
    while True:
        while len(pending) < window:
            item = next(queue, None)
            if item is None:
                break
            pending.append((item, pool.submit(preprocess, item[0].path)))
        if not pending:
            return
        yield pending.popleft()


class _Batches:
    """Captions decoded images batch by batch into the writer, counting into the summary and the progress bar."""

    def __init__(self, captioner: BatchCaptioner, writer: Writer, summary: Summary, bar: Progress):
        self.captioner, self.writer, self.summary, self.bar = captioner, writer, summary, bar
        self.done = 0

    def fail(self, item: tuple, error: str) -> None:
        image, size, mtime = item
        self.writer.write(image, size, mtime, error=error)
        self.summary.failed.append((display_path(image.display), utf8_text(error)))

    def advance(self, n: int) -> None:
        self.done += n
        self.bar.update(self.done, len(self.summary.failed))

    def caption(self, batch: list[tuple]) -> None:
        """``batch``: (item, pixels) pairs. A batch the model can't take (e.g. out of memory) goes one by one."""
        try:
            captions = self.captioner([pixels for _, pixels in batch])
        except NotImplementedError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the model raises, the run goes on
            if len(batch) > 1:
                for pair in batch:
                    self.caption([pair])
                return
            self.fail(batch[0][0], f"captioning failed: {type(e).__name__}: {e}")
            self.advance(1)
            return
        for (item, _), caption in zip(batch, captions):
            error = self.writer.write(*item, caption=caption)
            if error is None:
                self.summary.captioned += 1
            else:
                self.fail(item, error)
        self.writer.end_batch()
        self.advance(len(batch))

    def steps(self, todo: list[tuple], pool, batch_size: int, workers: int):
        """Caption ``todo``, yielding after each batch (a distributed run reports progress between batches)."""
        batch = []
        for item, future in _decode_ahead(todo, pool, self.captioner.preprocess, 2 * batch_size + workers):
            try:
                batch.append((item, future.result()))
            except Exception as e:  # noqa: BLE001 - one bad file never stops the run
                self.fail(item, str(e) or type(e).__name__)
                self.advance(1)
            if len(batch) == batch_size:
                self.caption(batch)
                batch = []
                yield
        if batch:
            self.caption(batch)
        self.writer.end_batch()
        self.bar.update(self.done, len(self.summary.failed), force=True)
        yield

    def run(self, todo: list[tuple], pool, batch_size: int, workers: int) -> None:
        for _ in self.steps(todo, pool, batch_size, workers):
            pass


def caption_files(pipe, files: Sequence[ImageFile], writer: Writer, *, existing: str = "skip",
                  batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None, prompt: str | None = None,
                  generate_kwargs: dict | None = None, progress: Progress | bool | None = False) -> Summary:
    """Caption ``files`` into ``writer``, skipping those it already holds (existing='skip'); never stops on a bad file.

    ``pipe``: a ``Blip2Pipeline``, or a function returning one (called only if something needs captioning).
    ``progress``: a Progress, True/False, or None for "when stderr is a terminal". The writer is closed at the end.
    """
    if existing not in ("skip", "overwrite"):
        raise ValueError(f"existing must be 'skip' or 'overwrite', got {existing!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    summary = Summary(total=len(files))
    start = time.monotonic()
    workers = workers or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlx-blip2-decode")
    bar = None
    try:
        todo = _plan(files, writer, existing, pool, summary)
        if not todo:
            return summary
        if not hasattr(pipe, "engine"):  # a loader: load only now that something needs captioning
            pipe = pipe()
        captioner = BatchCaptioner(pipe, prompt, **(generate_kwargs or {}))
        bar = progress if isinstance(progress, Progress) else Progress(len(todo), enabled=progress)
        _Batches(captioner, writer, summary, bar).run(todo, pool, batch_size, workers)
        return summary
    except KeyboardInterrupt:
        summary.interrupted = True
        return summary
    finally:
        if bar is not None:
            bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
        summary.seconds = time.monotonic() - start
        writer.close()


def plan(pipe, job) -> tuple[list[ImageFile], list[ImageFile], str | None]:
    """Check a CaptionJob's generation options and find its files, before any model is loaded: (all files, this
    shard's, the model's name for the records)."""
    caption_options(job.generate_kwargs, getattr(pipe, "caption_defaults", None))
    files = find_files(job.inputs, job.recursive, job.manifest)
    model_name = job.model_name
    if model_name is None and hasattr(pipe, "model"):
        model_name = str(getattr(pipe.model, "checkpoint_dir", "") or "") or None
    return files, select_shard(files, job.shard), model_name


def find_files(inputs: Sequence[str | os.PathLike], recursive: bool = False, manifest=None) -> list[ImageFile]:
    """The images to caption: those a manifest lists, or those found in ``inputs`` (files and folders)."""
    if manifest is not None:
        if inputs:
            raise UsageError("give image files and folders, or --manifest, not both")
        return read_manifest(manifest)
    return find_images(inputs, recursive, missing="keep").files  # a missing one fails alone, as a bad file does


def caption_found(pipe, job, files: list[ImageFile], mine: list[ImageFile], stdout=None) -> tuple[Summary, list[str]]:
    """Caption ``mine`` (this shard of ``files``) in this process, as a checked CaptionJob says (``job.format`` is
    the output format, None to print ``path: caption``). Returns the summary and the output's notes."""
    if job.format in ("txt", "xmp"):
        writer = sidecar_writer(job.format, job.xmp_name, files)  # on every file, so that all shards agree
    elif job.format is None:
        writer = PlainWriter(stdout, bare=len(mine) == 1)
    else:
        writer = RecordWriter(job.format, job.model_name, job.prompt, path=job.output, stream=stdout)
        merge_leftovers(writer)  # what a killed distributed run left beside the output
    summary = caption_files(pipe, mine, writer, existing=job.existing, batch_size=job.batch_size,
                            workers=job.workers, prompt=job.prompt, generate_kwargs=job.generate_kwargs,
                            progress=job.progress)
    return summary, writer.notes
