"""Pipelines: a checkpoint's model and processor with the task recipes (captioning and VQA, or retrieval), and the
batched engine (engine) that opens images, tokenizes and detokenizes for every generation entry point."""

from __future__ import annotations

import os

import mlx.core as mx

from ..models.loading import resolve_checkpoint
from ..models.registry import INSTRUCTBLIP, RETRIEVAL, checkpoint_spec
from .captioning import Blip2Pipeline
from .retrieval import Blip2RetrievalPipeline

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"


def load(path_or_repo_id: str | os.PathLike = DEFAULT_MODEL, dtype: mx.Dtype | None = None,
         adapter_path: str | os.PathLike | None = None):
    """Load a checkpoint (local directory or Hub repo id, original or converted) with its processor.

    What it is comes from :mod:`mlx_blip2.models.registry`. Captioning checkpoints give a :class:`Blip2Pipeline`
    (caption, ask); InstructBLIP checkpoints an :class:`~.instructblip.InstructBlipPipeline` (caption, ask,
    describe); retrieval checkpoints (``Blip2ForImageTextRetrieval``, e.g. Salesforce/blip2-itm-vit-g) a
    :class:`Blip2RetrievalPipeline` (match, similarity, embed_images, embed_texts, rank).

    ``adapter_path``: a fine-tuned adapter directory (``mlx-blip2 finetune``) applied to the captioning model.
    """
    from ..generation.conditional import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration
    from ..processing import Blip2Processor, InstructBlipProcessor

    directory = resolve_checkpoint(path_or_repo_id)
    spec = checkpoint_spec(directory)
    if spec.kind == RETRIEVAL:
        if adapter_path is not None:
            raise ValueError(f"{directory} is a retrieval checkpoint; adapters apply to captioning checkpoints")
        return Blip2RetrievalPipeline.from_pretrained(directory, dtype=dtype)
    if spec.family == INSTRUCTBLIP:
        from .instructblip import InstructBlipPipeline

        processor = InstructBlipProcessor.from_pretrained(directory)  # first: a missing qformer_tokenizer/ fails fast
        pipeline = InstructBlipPipeline(InstructBlipForConditionalGeneration.from_pretrained(directory, dtype=dtype),
                                        processor)
    else:
        pipeline = Blip2Pipeline(Blip2ForConditionalGeneration.from_pretrained(directory, dtype=dtype),
                                 Blip2Processor.from_pretrained(directory))
    if adapter_path is not None:
        from ..models.adapters import load_adapter

        load_adapter(pipeline.model, adapter_path)
    return pipeline
