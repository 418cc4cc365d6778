"""transformers' generation classes: a network of :mod:`mlx_blip2.models` with ``generate``.

The networks (``Blip2Model``, ``InstructBlipModel``) encode images and run the language model; decoding (greedy,
beam search, sampling) belongs to this layer. So the classes that can ``generate``, under transformers' names, are
put together here, one layer up, and models never import generation.
"""

from __future__ import annotations

import mlx.core as mx

from ..models.blip2 import Blip2Model
from ..models.instructblip import InstructBlipModel
from .generate import GenerationMixin


class Blip2ForConditionalGeneration(GenerationMixin, Blip2Model):
    """BLIP-2 for captioning and visual question answering: ``Blip2Model`` plus ``generate``."""


class InstructBlipForConditionalGeneration(InstructBlipModel, Blip2ForConditionalGeneration):
    """InstructBLIP for instructed captioning and VQA, with transformers' argument names and semantics."""

    def generate(self, pixel_values=None, qformer_input_ids=None, qformer_attention_mask=None, input_ids=None,
                 attention_mask=None, **kwargs) -> mx.array:
        """New token ids only, (B * num_return_sequences, T); options as :meth:`GenerationMixin.generate`."""
        return super().generate(pixel_values, input_ids, attention_mask, qformer_input_ids=qformer_input_ids,
                                qformer_attention_mask=qformer_attention_mask, **kwargs)
