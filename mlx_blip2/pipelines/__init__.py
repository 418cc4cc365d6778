"""Pipelines: a checkpoint's model and processor with the task recipes (captioning and VQA, or retrieval)."""

from __future__ import annotations

import json
import os

import mlx.core as mx

from ..models.loading import CheckpointError, resolve_checkpoint
from ..models.retrieval import RETRIEVAL_ARCHITECTURES, architectures
from .captioning import Blip2Pipeline
from .retrieval import Blip2RetrievalPipeline

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
GENERATION_ARCHITECTURES = ("Blip2ForConditionalGeneration",)
INSTRUCTBLIP_ARCHITECTURES = ("InstructBlipForConditionalGeneration",)


def load(path_or_repo_id: str | os.PathLike = DEFAULT_MODEL, dtype: mx.Dtype | None = None):
    """Load a checkpoint (local directory or Hub repo id, original or converted) with its processor.

    Captioning checkpoints give a :class:`Blip2Pipeline` (caption, ask); InstructBLIP checkpoints
    (``InstructBlipForConditionalGeneration``) an :class:`~.instructblip.InstructBlipPipeline` (caption, ask,
    describe); retrieval checkpoints
    (``Blip2ForImageTextRetrieval``, e.g. Salesforce/blip2-itm-vit-g) a :class:`Blip2RetrievalPipeline` (match,
    similarity, embed_images, embed_texts, rank).
    """
    from ..models.blip2 import Blip2ForConditionalGeneration
    from ..processing import Blip2Processor

    directory = resolve_checkpoint(path_or_repo_id)
    if "Blip2ForImageTextRetrieval" in architectures(directory):
        return Blip2RetrievalPipeline.from_pretrained(directory, dtype=dtype)
    if _is_instructblip(directory):
        # InstructBLIP (Vicuna or Flan-T5): caption, ask and describe with its own prompts and recipes.
        from ..models.instructblip import InstructBlipForConditionalGeneration
        from ..processing_instructblip import InstructBlipProcessor
        from .instructblip import InstructBlipPipeline

        processor = InstructBlipProcessor.from_pretrained(directory)  # first: a missing qformer_tokenizer/ fails fast
        return InstructBlipPipeline(InstructBlipForConditionalGeneration.from_pretrained(directory, dtype=dtype),
                                    processor)
    return Blip2Pipeline(
        Blip2ForConditionalGeneration.from_pretrained(directory, dtype=dtype),
        Blip2Processor.from_pretrained(directory),
    )


def _is_instructblip(directory) -> bool:
    """By ``architectures``, or by ``model_type`` for configs written without it."""
    if any(a in INSTRUCTBLIP_ARCHITECTURES for a in architectures(directory)):
        return True
    try:
        return json.loads((directory / "config.json").read_text()).get("model_type") == "instructblip"
    except (OSError, ValueError, AttributeError):
        return False


KINDS = {"captioning": "Salesforce/blip2-opt-2.7b or Salesforce/blip2-flan-t5-xl",
         "retrieval": "Salesforce/blip2-itm-vit-g"}


def checkpoint_kind(architectures: list[str]) -> str:
    """"retrieval" for Blip2ForImageTextRetrieval (and its halves), else "captioning"."""
    return "retrieval" if any(a in RETRIEVAL_ARCHITECTURES for a in architectures) else "captioning"


def require_kind(architectures: list[str], kind: str, command: str) -> None:
    """CheckpointError (a ValueError: exit status 2) when a checkpoint is not of the ``kind`` ``command`` needs."""
    found = checkpoint_kind(architectures)
    if found != kind:
        raise CheckpointError(f"'{command}' needs a {kind} checkpoint (such as {KINDS[kind]}); the one given is a "
                              f"{found} checkpoint ({', '.join(architectures) or 'no architectures listed'})")
