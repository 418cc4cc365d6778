"""One pass over a library: ``mlx-blip2 caption DIR --index DB [--index-model ITM]`` writes the captions (any output
format) and the index entries together.

The captioning job runs exactly as ``caption`` alone (:func:`mlx_blip2.library.job.caption`: the same plan, output,
resume and ``mlx.launch`` ranks, the same batches, the same error records), on an engine that does the index's work
on the side (:class:`OnePassEngine`):

- each image is decoded once (``open_image``); the captioning processor's pixels feed both models (or the retrieval
  processor's, made from the same decoded image, when the two processors differ);
- the ViT runs once per batch when the two checkpoints' vision weights are equal (:mod:`.vision_share`, checked at
  load; the captioning model's Q-Former and the retrieval Q-Former both read its output), else each model runs its
  own and the run says why;
- after each batch its embeddings and captions go into the index in one transaction per kind (under ``mlx.launch``
  into the rank's part index, merged by rank 0 as ``index`` does), so a kill loses at most a batch;
- then the ordinary incremental index pass (:func:`.indexer.index_paths`, the loaded retrieval model reused) embeds
  what the caption run did not decode (images already captioned, or that failed), follows deleted files, reads
  sidecar captions and records the library's roots; a records output's captions are imported into the index.

Only images the index needs (new or changed) are embedded in the caption batches; the others are captioned only.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

import numpy as np

from ..images import open_image
from ..pipelines.engine import Engine
from .indexer import IndexReport, file_hash, index_paths, model_id
from .store import Entry, PhotoIndex
from .vision_share import VisionShare, load_sharing


@dataclass
class _Pending:
    path: str
    size: int
    mtime_ns: int
    sha256: bytes
    index_pixels: np.ndarray
    pixels: np.ndarray  # kept alive: entries are found by id() of the captioning pixels


class IndexSink:
    """The index side of a one-pass run: which images it needs, and their embeddings and captions batch by batch."""

    def __init__(self, db: PhotoIndex, model: str, num_queries: int, embed_dim: int):
        self.db = db
        db.bind_model(model, num_queries, embed_dim)
        self.stored = db.files()
        self.entries: list[Entry] = []
        self.captions: dict[str, str] = {}
        self.added = self.updated = 0

    def wants(self, path: str, size: int, mtime_ns: int) -> bool:
        old = self.stored.get(path)
        return old is None or old[:2] != (size, mtime_ns)

    def flush(self) -> None:
        from .captions import import_captions

        if self.entries:
            self.db.write_batch(self.entries)
            for e in self.entries:
                if e.path in self.stored:
                    self.updated += 1
                else:
                    self.added += 1
                self.stored[e.path] = (e.size, e.mtime_ns, True)
            self.entries = []
        if self.captions:
            import_captions(self.db, self.captions)
            self.captions = {}


class OnePassEngine(Engine):
    """The captioning engine, with the index's work done in the same batches (see the module)."""

    def __init__(self, engine: Engine, retrieval, sink: IndexSink, share: VisionShare):
        super().__init__(engine.model, engine.processor, engine.eos_token_ids)
        self.retrieval, self.sink, self.share = retrieval, sink, share
        self.same_pixels = _processor_settings(engine.processor) == _processor_settings(retrieval.processor)
        self._pending: dict[int, _Pending] = {}
        self._paths: dict[int, tuple[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    def preprocess(self, image) -> np.ndarray:
        """Decode once; keep what the index needs of an image it wants (thread-safe)."""
        decoded = open_image(image)
        pixels = self.processor.image_processor.preprocess(decoded)
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            st = os.stat(path)
            pending = None
            if self.sink.wants(path, st.st_size, st.st_mtime_ns):
                index_pixels = pixels if self.same_pixels else self.retrieval.preprocess(decoded)
                pending = _Pending(path, st.st_size, st.st_mtime_ns, file_hash(path), index_pixels, pixels)
            with self._lock:
                self._paths[id(pixels)] = (path, pixels)  # the array kept alive, so that its id stays its own
                if pending is not None:
                    self._pending[id(pixels)] = pending
        return pixels

    def encode(self, pixel_values, **text_inputs):
        arrays = list(pixel_values) if isinstance(pixel_values, (list, tuple)) else list(np.asarray(pixel_values))
        with self._lock:
            wanted = [(i, self._pending.pop(id(a))) for i, a in enumerate(arrays) if id(a) in self._pending]
        if not self.share.shared:
            features = super().encode(np.stack(arrays), **text_inputs)
            if wanted:
                embeds = self.retrieval.embed_images([p.index_pixels for _, p in wanted], preprocessed=True)
                self._keep(wanted, embeds)
            return features
        import mlx.core as mx

        vit = self.model.get_image_features(np.stack(arrays)).last_hidden_state
        features = self.model.encode_image_features(vit)
        if wanted:
            rows = vit if len(wanted) == len(arrays) else vit[mx.array([i for i, _ in wanted])]
            embeds = self.retrieval.model.image_embeds_from_features(rows)
            self._keep(wanted, np.array(embeds.astype(mx.float32)))
        return features

    def _keep(self, wanted, embeds) -> None:
        self.sink.entries += [Entry(p.path, p.size, p.mtime_ns, e, p.sha256) for (_, p), e in zip(wanted, embeds)]

    def generate(self, rows, options, should_stop=None):
        self.sink.flush()  # what an earlier batch left when its captions failed
        out = super().generate(rows, options, should_stop)
        with self._lock:
            for row, completions in zip(rows, out):
                path, _ = self._paths.pop(id(row.pixel_values), (None, None))
                if path is not None and completions:
                    self.sink.captions[path] = completions[0].text
        self.sink.flush()
        return out


def _processor_settings(processor) -> dict:
    ip = processor.image_processor
    return {k: repr(v) for k, v in sorted(vars(ip).items()) if not k.startswith("_")}


class _OnePassPipe:
    """The captioning pipeline with its engine replaced by a :class:`OnePassEngine`."""

    def __init__(self, pipe, engine: OnePassEngine):
        self._pipe, self.engine = pipe, engine

    def __getattr__(self, name):
        return getattr(self._pipe, name)


@dataclass
class OnePassResult:
    summary: object  # the caption job's Summary
    notes: list[str]
    index: IndexReport | None  # None on a rank other than 0
    share: VisionShare | None  # None when nothing needed a caption
    embedded_in_pass: int = 0


def caption_and_index(load_captioning, job, index_job, *, group="auto", stdout=None, log=sys.stderr) -> OnePassResult:
    """Run a CaptionJob and an IndexJob (its ``db``, ``model``, ``dtype``; the images are the caption job's) in one
    pass (see the module). ``load_captioning``: a function returning the captioning pipeline, called only when
    something needs a caption."""
    from ..library.job import caption
    from ..library.launch import current_group
    from ..models.retrieval import DEFAULT_RETRIEVAL_MODEL
    from .distributed import part_index
    from .indexer import load_embedder

    if group == "auto":
        group = current_group()
    rank = 0 if group is None else group.rank
    if group is None:
        model = _index_model(index_job, DEFAULT_RETRIEVAL_MODEL)
    else:  # rank 0 alone opens the index; the others take its answer, or its error
        from .store import PhotoIndexError

        answer = None
        if rank == 0:
            try:
                answer = {"model": _index_model(index_job, DEFAULT_RETRIEVAL_MODEL)}
            except (PhotoIndexError, OSError) as e:
                answer = {"error": str(e)}
        answer = group.broadcast_json(answer)
        if "error" in answer:
            raise PhotoIndexError(answer["error"])
        model = answer["model"]
    state: dict = {}

    def load():
        pipe, retrieval, share = load_sharing(load_captioning, lambda: load_embedder(model, dtype=index_job.dtype),
                                              log if rank == 0 else None)
        config = retrieval.model.config
        db = PhotoIndex(index_job.db if group is None else part_index(index_job.db, rank))
        sink = IndexSink(db, model, config.num_query_tokens, config.image_text_hidden_size)
        state.update(retrieval=retrieval, sink=sink, share=share)
        return _OnePassPipe(pipe, OnePassEngine(pipe.engine, retrieval, sink, share))

    try:
        summary, notes = caption(load, job, group=group, stdout=stdout)
    finally:
        if "sink" in state:
            state["sink"].flush()
            state["sink"].db.close()
    sink = state.get("sink")
    embedded = sink.added + sink.updated if sink is not None else 0
    if rank != 0:
        return OnePassResult(summary, notes, None, state.get("share"), embedded)
    report = _index_rest(job, index_job, model, state.get("retrieval"))
    if sink is not None and group is None:  # the pass's embeddings, which the last pass found unchanged
        report.added += sink.added
        report.updated += sink.updated
        report.unchanged = max(0, report.unchanged - embedded)
    return OnePassResult(summary, notes, report, state.get("share"), embedded)


def _index_model(index_job, default: str) -> str:
    """The retrieval checkpoint the index is (to be) built with; PhotoIndexError when it holds another's."""
    from .store import PhotoIndexError

    with PhotoIndex(index_job.db) as db:
        model = model_id(index_job.model) if index_job.model else (db.model or default)
        if db.model is not None and db.model != model:
            raise PhotoIndexError(f"'{db.path}' holds embeddings from {db.model}, not {model}; index with "
                                  f"--index-model {db.model} or use another --db")
    return model


def _index_rest(job, index_job, model: str, retrieval) -> IndexReport:
    """Rank 0, after the caption job: merge part indexes, the ordinary incremental pass, a records file's captions."""
    from ..library.manifest import read_manifest
    from .captions import import_captions, read_caption_records
    from .distributed import leftover_indexes, merge_indexes
    from .indexer import load_embedder

    paths = list(job.inputs) or [f.path for f in read_manifest(job.manifest)]
    with PhotoIndex(index_job.db) as db:
        merge_indexes(db, leftover_indexes(index_job.db))
        factory = ((lambda m: retrieval) if retrieval is not None
                   else (lambda m: load_embedder(m, dtype=index_job.dtype)))
        report = index_paths(db, paths, model=model, recursive=job.recursive, batch_size=index_job.batch_size,
                             progress=index_job.progress, embedder_factory=factory)
        output_format = job.output_format()
        if output_format in ("jsonl", "csv") and job.output is not None and os.path.isfile(job.output):
            import_captions(db, read_caption_records(os.fspath(job.output)))
        report.searchable = db.count()
    return report
