"""InstructBLIP's pipeline: ``caption``, ``ask`` and free-form ``describe`` with InstructBLIP's own prompts and
generation settings (LAVIS's, in :mod:`mlx_blip2.generation.recipes`), on the same batched engine as BLIP-2."""

from __future__ import annotations

from ..generation.recipes import (INSTRUCT_CAPTION_DEFAULTS, INSTRUCT_CAPTION_PROMPT, INSTRUCT_GENERATE_DEFAULTS,
                                  INSTRUCT_VQA_DEFAULTS, INSTRUCT_VQA_TEMPLATE, resolve_recipe)
from ..images import open_image
from .captioning import Blip2Pipeline


class InstructBlipPipeline(Blip2Pipeline):
    """An InstructBLIP model (Vicuna or Flan-T5) and its processor, with LAVIS's InstructBLIP recipes.

    The instruction reaches both the Q-Former and the language model, so each (image, instruction) pair is encoded
    on its own.
    """

    caption_defaults = INSTRUCT_CAPTION_DEFAULTS
    vqa_defaults = INSTRUCT_VQA_DEFAULTS
    vqa_template = INSTRUCT_VQA_TEMPLATE
    describe_defaults = INSTRUCT_GENERATE_DEFAULTS
    caption_instruction = INSTRUCT_CAPTION_PROMPT

    def caption_prompt(self, prompt: str | None) -> str:
        """InstructBLIP captions on an instruction: the user's, or LAVIS's ``"A short image caption."``."""
        return prompt if prompt else self.caption_instruction

    def describe(self, image, instruction: str, **generate_kwargs):
        """Follow a free-form instruction about one image (or each of a list of images): "What is unusual about
        this image?", "Describe the scene in detail." Defaults are LAVIS's ``generate`` settings (5 beams, up to 256
        new tokens, repetition penalty 1.5); any ``generate`` option overrides them."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("describe needs a non-empty instruction")
        single = not isinstance(image, (list, tuple))
        images = [open_image(image)] if single else [open_image(im) for im in image]
        if not images:
            return []
        out = self._texts(images, [instruction] * len(images), self.describe_defaults, generate_kwargs)
        return out[0] if single else out

    def describe_options(self, **overrides):
        """The options ``describe`` runs with after ``overrides`` (for inspection and the examples)."""
        return resolve_recipe(self.describe_defaults, overrides)
