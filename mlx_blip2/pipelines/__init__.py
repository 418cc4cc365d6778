"""Pipelines: a checkpoint's model and processor with the task recipes (captioning and VQA, or retrieval)."""

from __future__ import annotations

import os

import mlx.core as mx

from ..models.loading import CheckpointError, resolve_checkpoint
from ..models.retrieval import architectures
from .captioning import Blip2Pipeline
from .retrieval import Blip2RetrievalPipeline

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
GENERATION_ARCHITECTURES = ("Blip2ForConditionalGeneration",)


def load(path_or_repo_id: str | os.PathLike = DEFAULT_MODEL, dtype: mx.Dtype | None = None):
    """Load a checkpoint (local directory or Hub repo id, original or converted) with its processor.

    Captioning checkpoints give a :class:`Blip2Pipeline` (caption, ask); retrieval checkpoints
    (``Blip2ForImageTextRetrieval``, e.g. Salesforce/blip2-itm-vit-g) a :class:`Blip2RetrievalPipeline` (match,
    similarity, embed_images, embed_texts, rank).
    """
    from ..models.blip2 import Blip2ForConditionalGeneration
    from ..processing import Blip2Processor

    directory = resolve_checkpoint(path_or_repo_id)
    if "Blip2ForImageTextRetrieval" in architectures(directory):
        return Blip2RetrievalPipeline.from_pretrained(directory, dtype=dtype)
    return Blip2Pipeline(
        Blip2ForConditionalGeneration.from_pretrained(directory, dtype=dtype),
        Blip2Processor.from_pretrained(directory),
    )


def require(pipe, kind: str, command: str):
    """``pipe`` when it is a ``kind`` ("captioning" or "retrieval") pipeline, else CheckpointError saying which
    kind of checkpoint ``command`` needs."""
    if getattr(pipe, "kind", None) == kind:
        return pipe
    examples = {"captioning": "Salesforce/blip2-opt-2.7b or Salesforce/blip2-flan-t5-xl",
                "retrieval": "Salesforce/blip2-itm-vit-g"}
    raise CheckpointError(f"'{command}' needs a {kind} checkpoint (such as {examples[kind]}); the one given is a "
                          f"{getattr(pipe, 'kind', 'different')} checkpoint")
