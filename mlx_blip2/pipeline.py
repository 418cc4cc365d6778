"""The high-level API: ``load(model).caption(images)`` and ``.ask(image, question)``."""

from __future__ import annotations

import os
from typing import Any, Sequence

import mlx.core as mx

from .blip2 import Blip2ForConditionalGeneration
from .loading import resolve_checkpoint
from .processing import Blip2Processor, load_image

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
VQA_TEMPLATE = "Question: {} Answer:"


class Blip2Pipeline:
    """A model and its processor, with the defaults BLIP-2 was evaluated with."""

    def __init__(self, model: Blip2ForConditionalGeneration, processor: Blip2Processor):
        self.model = model
        self.processor = processor
        if model.config.use_decoder_only_language_model:
            # A decoder-only model continues from the last position, so batches must pad on the left.
            processor.tokenizer.padding_side = "left"

    # --- generation options ---------------------------------------------------------------------------------------

    def eos_token_ids(self) -> list[int]:
        """End of sequence, plus the newline for OPT: BLIP-2's OPT models were trained to end captions with it."""
        ids = {self.processor.tokenizer.eos_token_id, self.model.config.text_config.eos_token_id}
        if self.model.config.use_decoder_only_language_model:
            newline = self.processor.tokenizer.encode("\n", add_special_tokens=False)
            if len(newline) == 1:
                ids.add(newline[0])
        return sorted(i for i in ids if i is not None)

    def _generate(self, images: list, prompts: list[str] | None, generate_kwargs: dict[str, Any]) -> list[str]:
        pil = [load_image(im) for im in images]
        inputs = self.processor(images=pil, text=prompts, padding=True)
        kwargs = {"max_new_tokens": 30, "eos_token_id": self.eos_token_ids(),
                  "pad_token_id": self.processor.tokenizer.pad_token_id, **generate_kwargs}
        ids = self.model.generate(inputs["pixel_values"], inputs.get("input_ids"), inputs.get("attention_mask"),
                                  **kwargs)
        return [t.strip() for t in self.processor.batch_decode(ids.tolist(), skip_special_tokens=True)]

    # --- tasks -----------------------------------------------------------------------------------------------------

    def caption(self, images, prompt: str | None = None, **generate_kwargs) -> str | list[str]:
        """Caption one image (returns a str) or a list of images (returns a list of str).

        Images may be paths, PIL images or arrays. ``prompt`` is a text the caption continues ("a photo of").
        """
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        if not batch:
            return []
        prompts = None if prompt is None else [prompt] * len(batch)
        out = self._generate(batch, prompts, generate_kwargs)
        return out[0] if single else out

    def ask(self, image, question: str | Sequence[str], template: str = VQA_TEMPLATE, **generate_kwargs):
        """Answer a question about an image. A list of questions on one image returns a list of answers."""
        single = isinstance(question, str)
        questions = [question] if single else list(question)
        out = self._generate([image] * len(questions), [template.format(q) for q in questions], generate_kwargs)
        return out[0] if single else out


def load(path_or_repo_id: str | os.PathLike = DEFAULT_MODEL, dtype: mx.Dtype | None = None) -> Blip2Pipeline:
    """Load a checkpoint (local directory or Hub repo id, original or converted) with its processor."""
    directory = resolve_checkpoint(path_or_repo_id)
    return Blip2Pipeline(
        Blip2ForConditionalGeneration.from_pretrained(directory, dtype=dtype),
        Blip2Processor.from_pretrained(directory),
    )
