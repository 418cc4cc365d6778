"""InstructBLIP's pipeline: ``caption``, ``ask`` and free-form ``describe`` with InstructBLIP's own prompts and
generation settings, on the same batched engine as BLIP-2.

The recipes follow Salesforce LAVIS (``lavis/models/blip2_models/blip2_vicuna_instruct.py`` and
``blip2_t5_instruct.py``, and the evaluation configs in ``lavis/projects/instructblip/``):

- ``generate`` defaults (used by ``describe``, and by the transformers model card's example): 5 beams,
  ``max_length=256`` new tokens, ``min_length=1``, ``repetition_penalty=1.5``, ``length_penalty=1.0``
  (``top_p=0.9`` and ``temperature=1`` only matter when sampling);
- captioning (``caption_coco_*_eval_test.yaml``): the instruction ``"A short image caption."``, 5 beams,
  ``max_len=80``, ``min_len=10``, ``length_penalty=1``, with ``generate``'s ``repetition_penalty=1.5``;
- VQA (``qa_okvqa_*_eval.yaml`` and ``predict_answers``): the template ``"Question: {} Short Answer:"``, 5 beams,
  ``max_len=10``, ``min_len=1``, ``length_penalty=-1``, with ``repetition_penalty=1.5``.

LAVIS's ``max_length`` counts new tokens for both language models (Vicuna generates from embeddings alone, and the
T5 code passes ``max_new_tokens=max_length``), so it maps onto ``max_new_tokens`` here.
"""

from __future__ import annotations

from ..generation.options import resolve
from ..images import open_image
from .captioning import Blip2Pipeline

INSTRUCT_GENERATE_DEFAULTS = {"num_beams": 5, "max_new_tokens": 256, "min_new_tokens": 1,
                              "repetition_penalty": 1.5, "length_penalty": 1.0}
INSTRUCT_CAPTION_DEFAULTS = {"num_beams": 5, "max_new_tokens": 80, "min_new_tokens": 10,
                             "repetition_penalty": 1.5, "length_penalty": 1.0}
INSTRUCT_VQA_DEFAULTS = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "repetition_penalty": 1.5,
                         "length_penalty": -1.0}
INSTRUCT_CAPTION_PROMPT = "A short image caption."
INSTRUCT_VQA_TEMPLATE = "Question: {} Short Answer:"


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

    def generate(self, images: list, prompts: list, defaults: dict, options: dict) -> list[str]:
        # The caption recipe's min_new_tokens=10 gives way to a smaller max_new_tokens asked for explicitly.
        if options.get("max_new_tokens") is not None and options.get("min_new_tokens") is None:
            defaults = {**defaults, "min_new_tokens": min(defaults.get("min_new_tokens", 0), options["max_new_tokens"])}
        return super().generate(images, prompts, defaults, options)

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
        out = self.generate(images, [instruction] * len(images), self.describe_defaults, generate_kwargs)
        return out[0] if single else out

    def describe_options(self, **overrides):
        """The options ``describe`` runs with after ``overrides`` (for inspection and the examples)."""
        return resolve(self.describe_defaults, overrides)
