"""The high-level API: ``load(model).caption(images)`` and ``.ask(image, question)``."""

from __future__ import annotations

import os
from typing import Sequence

import mlx.core as mx

from .blip2 import Blip2ForConditionalGeneration
from .generate import check_options
from .loading import resolve_checkpoint
from .processing import Blip2Processor, load_image

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
VQA_TEMPLATE = "Question: {} Answer:"
# LAVIS's recipes (blip2_opt / blip2_t5 `generate` and `predict_answers`).
CAPTION_DEFAULTS = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1}
VQA_DEFAULTS = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": 0.0}


SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "min_p")


def generation_options(defaults: dict, options: dict) -> dict:
    """A task's recipe overridden by ``options``; a sampling option switches the recipe's beam search to sampling.

    Raises ValueError for out-of-range values, before any work is done.
    """
    kwargs = {**defaults, **options}
    if any(k in options for k in SAMPLING_OPTIONS):
        kwargs.setdefault("do_sample", True)
        if kwargs["do_sample"] and "num_beams" not in options:
            kwargs["num_beams"] = 1  # sampling replaces the beams of the recipe
    check_options(**kwargs)
    return kwargs


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

    def _generate(self, images: list, prompts: list[str] | None, defaults: dict, options: dict) -> list[str]:
        pil = [load_image(im) for im in images]
        # Several prompts on one image: preprocess and encode (ViT + Q-Former) it once.
        share = len(pil) > 1 and all(im is pil[0] for im in pil)
        inputs = self.processor(images=pil[:1] if share else pil, text=prompts, padding=True)
        kwargs = {"eos_token_id": self.eos_token_ids(), "pad_token_id": self.processor.tokenizer.pad_token_id,
                  **generation_options(defaults, options)}
        if share:
            features = self.model.encode_images(inputs["pixel_values"])
            kwargs["image_features"] = mx.repeat(features, len(pil), axis=0)
        else:
            kwargs["pixel_values"] = inputs["pixel_values"]
        ids = self.model.generate(input_ids=inputs.get("input_ids"), attention_mask=inputs.get("attention_mask"),
                                  **kwargs)
        return [t.strip() for t in self.processor.batch_decode(ids.tolist(), skip_special_tokens=True)]

    # --- tasks -----------------------------------------------------------------------------------------------------

    def caption(self, images, prompt: str | None = None, **generate_kwargs) -> str | list[str]:
        """Caption one image (returns a str) or a list of images (returns a list of str).

        Images may be paths, PIL images or arrays. ``prompt`` is a text the caption continues ("a photo of").
        Defaults follow LAVIS's captioning recipe (``CAPTION_DEFAULTS``: 5 beams, 1 to 30 new tokens); any
        ``generate`` option overrides them, and a sampling option (``temperature``, ``top_p``...) samples instead.
        """
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        if not batch:
            return []
        prompts = None if prompt is None else [prompt] * len(batch)
        out = self._generate(batch, prompts, CAPTION_DEFAULTS, generate_kwargs)
        return out[0] if single else out

    def ask(self, image, question: str | Sequence[str], template: str = VQA_TEMPLATE, **generate_kwargs):
        """Answer a question about an image; a list of questions returns a list of answers (one image encoding).

        Defaults follow LAVIS's VQA recipe (``VQA_DEFAULTS``: 5 beams, at most 10 new tokens, length penalty 0,
        so answers stay short).
        """
        single = isinstance(question, str)
        questions = [question] if single else list(question)
        if not questions:
            return []
        image = load_image(image)
        out = self._generate([image] * len(questions), [template.format(q) for q in questions], VQA_DEFAULTS,
                             generate_kwargs)
        return out[0] if single else out


def load(path_or_repo_id: str | os.PathLike = DEFAULT_MODEL, dtype: mx.Dtype | None = None) -> Blip2Pipeline:
    """Load a checkpoint (local directory or Hub repo id, original or converted) with its processor.

    Retrieval checkpoints (``Blip2ForImageTextRetrieval``, e.g. Salesforce/blip2-itm-vit-g) give a
    :class:`mlx_blip2.retrieval.Blip2RetrievalPipeline` (match, similarity, embed_images, embed_texts, rank).
    """
    directory = resolve_checkpoint(path_or_repo_id)
    from .retrieval import architectures  # lazily: captioning never needs the retrieval module

    if "Blip2ForImageTextRetrieval" in architectures(directory):
        from .retrieval import Blip2RetrievalPipeline

        return Blip2RetrievalPipeline.from_pretrained(directory, dtype=dtype)
    return Blip2Pipeline(
        Blip2ForConditionalGeneration.from_pretrained(directory, dtype=dtype),
        Blip2Processor.from_pretrained(directory),
    )
