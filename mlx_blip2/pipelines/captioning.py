"""The high-level API: ``load(model).caption(images)`` and ``.ask(image, question)``, on the batched engine."""

from __future__ import annotations

from typing import Sequence

from .engine import Engine, Row
from ..generation.recipes import CAPTION_DEFAULTS, VQA_DEFAULTS, VQA_TEMPLATE, resolve_recipe
from ..images import open_image


def default_eos_token_ids(model, processor) -> list[int]:
    """End of sequence, plus the newline for OPT: BLIP-2's OPT models were trained to end captions with it."""
    ids = {processor.tokenizer.eos_token_id, model.config.text_config.eos_token_id}
    if model.config.use_decoder_only_language_model and model.config.text_config.model_type == "opt":
        newline = processor.tokenizer.encode("\n", add_special_tokens=False)
        if len(newline) == 1:
            ids.add(newline[0])
    return sorted(i for i in ids if i is not None)


class Blip2Pipeline:
    """A model and its processor, with the defaults BLIP-2 was evaluated with."""

    caption_defaults = CAPTION_DEFAULTS
    vqa_defaults = VQA_DEFAULTS
    vqa_template = VQA_TEMPLATE
    kind = "captioning"

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        if model.config.use_decoder_only_language_model:
            # A decoder-only model continues from the last position, so batches must pad on the left.
            processor.tokenizer.padding_side = "left"
        self.engine = Engine(model, processor, default_eos_token_ids(model, processor))

    def eos_token_ids(self) -> list[int]:
        return list(self.engine.eos_token_ids)

    def caption_prompt(self, prompt: str | None) -> str | None:
        """The language-model prompt of a caption request (BLIP-2: the user's text as is)."""
        return prompt

    def _texts(self, images: list, prompts: list[str | None], recipe: dict, options: dict) -> list[str]:
        """The engine's texts for (image, prompt) rows, with ``recipe`` resolved against the user's ``options``."""
        opts = resolve_recipe(recipe, options)
        rows = [Row(image=im, prompt=p) for im, p in zip(images, prompts)]
        # Several sequences per row (num_return_sequences) come back one after another, as transformers returns them.
        return [c.text for row in self.engine.generate(rows, opts) for c in row]

    def caption(self, images, prompt: str | None = None, **generate_kwargs) -> str | list[str]:
        """Caption one image (returns a str) or a list of images (returns a list of str).

        Images may be paths, bytes, PIL images or arrays. ``prompt`` is a text the caption continues ("a photo
        of"). Defaults follow LAVIS's captioning recipe (``CAPTION_DEFAULTS``: 5 beams, 1 to 30 new tokens); any
        ``generate`` option overrides them, and a sampling option (``temperature``, ``top_p``...) samples instead.
        """
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        if not batch:
            return []
        out = self._texts(batch, [self.caption_prompt(prompt)] * len(batch), self.caption_defaults,
                            generate_kwargs)
        return out[0] if single else out

    def ask(self, image, question: str | Sequence[str], template: str | None = None, **generate_kwargs):
        """Answer a question about an image; a list of questions returns a list of answers (one image encoding).

        Defaults follow LAVIS's VQA recipe (``VQA_DEFAULTS``: 5 beams, at most 10 new tokens, length penalty 0,
        so answers stay short).
        """
        single = isinstance(question, str)
        questions = [question] if single else list(question)
        if not questions:
            return []
        image = open_image(image)
        template = template or self.vqa_template
        out = self._texts([image] * len(questions), [template.format(q) for q in questions], self.vqa_defaults,
                            generate_kwargs)
        return out[0] if single else out
