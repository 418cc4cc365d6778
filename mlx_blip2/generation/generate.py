"""Generation over tensors (pixel values or image features, prompt ids, mask): the inputs prepared once, then the
lazy decode loop of :mod:`.decoding`; and :class:`GenerationMixin`, transformers' ``model.generate`` built on them.

Options are those of :class:`~mlx_blip2.generation.options.GenerationOptions`, validated before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_sampler

from ..models.base import check_pixel_values
from .decoding import CancellableRunner, LogitsProcessors, beam_search, generate_step, greedy, make_runner
from .options import GenerationOptions, eos_id_list


def eos_ids(model, eos_token_id) -> list[int]:
    """The ids that end generation: ``eos_token_id``, or the language model's when it is None."""
    return eos_id_list(model.config.text_config.eos_token_id if eos_token_id is None else eos_token_id)


@dataclass
class PreparedInputs:
    inputs_embeds: mx.array
    attention_mask: mx.array
    prompt_ids: list[list[int]]  # what transformers' logits processors see as input_ids


def prepare_inputs(model, pixel_values=None, input_ids=None, attention_mask=None, image_features=None,
                   interpolate_pos_encoding: bool = False, **model_inputs) -> PreparedInputs:
    """Language-model input embeddings: the image's projected queries merged with the prompt's embeddings.

    ``model_inputs`` are passed on to ``encode_images`` (InstructBLIP's ``qformer_input_ids`` and mask).
    """
    if image_features is None:
        if pixel_values is None:
            raise ValueError("pass pixel_values (or image_features from model.encode_images)")
        pixel_values = check_pixel_values(pixel_values, model.config.vision_config.num_channels)
        image_features = model.encode_images(pixel_values, interpolate_pos_encoding, **model_inputs)
    embeds, mask = model.merge_image_features(image_features, input_ids, attention_mask)
    if not model.config.use_decoder_only_language_model:
        # One list per row: the penalties append each row's tokens to its own history.
        prompt = [[model.language_model.config.decoder_start_token_id] for _ in range(embeds.shape[0])]
    elif model.config.image_token_index is None:
        prompt = [[] for _ in range(embeds.shape[0])]  # transformers 4.45 generated from embeddings alone
    else:
        ids = model.default_input_ids(embeds.shape[0]) if input_ids is None else input_ids
        prompt = np.asarray(ids).tolist()
    return PreparedInputs(embeds, mask, prompt)


def start_decoding(model, inputs: PreparedInputs, options: GenerationOptions):
    """Prefill the language model and build the sampler and logits processors: (runner, sampler, processors)."""
    o = options
    processors = LogitsProcessors(o.min_new_tokens, o.repetition_penalty, o.no_repeat_ngram_size,
                                  eos_ids(model, o.eos_token_id))
    if processors.needs_history:
        processors.history = inputs.prompt_ids
    sampler = greedy
    if o.do_sample:
        if o.seed is not None:
            mx.random.seed(o.seed)
        sampler = make_sampler(o.temperature, top_p=o.top_p, min_p=o.min_p, top_k=o.top_k)
    return make_runner(model, inputs.inputs_embeds, inputs.attention_mask), sampler, processors


def decode(model, inputs: PreparedInputs, options: GenerationOptions,
           should_stop: Callable[[], bool] | None = None) -> mx.array:
    """New token ids (B * num_return_sequences, T) for prepared inputs."""
    pad_token_id = options.pad_token_id
    if pad_token_id is None:
        pad_token_id = model.config.text_config.pad_token_id
    runner, sampler, processors = start_decoding(model, inputs, options)
    if should_stop is not None:
        runner = CancellableRunner(runner, should_stop)
    if options.num_beams > 1:
        rows = beam_search(runner, num_beams=options.num_beams, max_new_tokens=options.max_new_tokens,
                           processors=processors, pad_token_id=pad_token_id, length_penalty=options.length_penalty,
                           early_stopping=options.early_stopping, num_return_sequences=options.num_return_sequences)
        return mx.array(rows, dtype=mx.int32)
    steps = list(generate_step(runner, max_new_tokens=options.max_new_tokens, sampler=sampler,
                               processors=processors, pad_token_id=pad_token_id or 0))
    return mx.array(steps, dtype=mx.int32).T


class GenerationMixin:
    """transformers' ``generate`` for a network of :mod:`mlx_blip2.models` (``encode_images``,
    ``merge_image_features``, ``language_model``): see :mod:`.conditional`."""

    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, *, image_features=None,
                 should_stop: Callable[[], bool] | None = None, qformer_input_ids=None, qformer_attention_mask=None,
                 **options) -> mx.array:
        """New token ids only, (B * num_return_sequences, T); rows that ended early are padded with the pad id.

        Options follow transformers' ``generate`` (see ``GenerationOptions``): greedy by default, beam search with
        ``num_beams > 1``, sampling (temperature, top-k, top-p, min-p; reproducible with ``seed``) with
        ``do_sample=True``. ``image_features`` (from ``encode_images``) may replace ``pixel_values`` so that
        several prompts on one image encode it once. ``should_stop()``, checked before every decode step, cancels
        the generation with ``GenerationCancelled``.
        """
        opts = GenerationOptions(**options)
        extra = {}
        if qformer_input_ids is not None:  # InstructBLIP: the instruction reaches the Q-Former too
            extra = {"qformer_input_ids": qformer_input_ids, "qformer_attention_mask": qformer_attention_mask}
        inputs = prepare_inputs(self, pixel_values, input_ids, attention_mask, image_features,
                                opts.interpolate_pos_encoding, **extra)
        return decode(self, inputs, opts, should_stop)
