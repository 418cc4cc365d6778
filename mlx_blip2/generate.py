"""Token generation for BLIP-2: the image is encoded once, then a lazy decode loop with a KV cache.

Each step builds one graph and queues the next step with ``mx.async_eval`` before the current token is read, so
the host never waits on the device between steps (as mlx-lm does).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .blip2 import Blip2Model, check_pixel_values


def _eos_ids(model: Blip2Model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = model.config.text_config.eos_token_id
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def generate_step(
    model: Blip2Model,
    inputs_embeds: mx.array,
    attention_mask: mx.array,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    eos_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    sampler: Callable[[mx.array], mx.array] = greedy,
) -> Iterator[list[int]]:
    """Yield the batch's next tokens (a list of B ids) until every row ended or ``max_new_tokens`` were made.

    Rows that ended get ``pad_token_id``, as transformers does.
    """
    lm = model.language_model
    B = inputs_embeds.shape[0]
    cache = [KVCache() for _ in lm.layers]
    eos = mx.array(list(eos_ids) or [-1])
    embed = lm.get_input_embeddings()
    # The next token's position is the number of kept tokens before it; padding takes no position.
    next_position = attention_mask.astype(mx.int32).sum(axis=1)[:, None]
    has_padding = not bool(attention_mask.all().item())

    def step(logits: mx.array, finished: mx.array, n: int):
        logits = logits[:, -1, :].astype(mx.float32)
        if n < min_new_tokens and eos_ids:
            logits[:, eos] = -float("inf")
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = mx.where(finished, pad_token_id, sampler(logprobs))
        return tokens, finished | (tokens[:, None] == eos[None]).any(axis=1)

    logits = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache)
    tokens, finished = step(logits, mx.zeros((B,), dtype=mx.bool_), 0)
    mx.async_eval(tokens, finished)
    mask = attention_mask
    for n in range(1, max_new_tokens + 1):
        if n < max_new_tokens:
            if has_padding:
                mask = mx.concatenate([mask, mx.ones((B, 1), dtype=mask.dtype)], axis=1)
            logits = lm(
                inputs_embeds=embed(tokens[:, None]),
                attention_mask=mask if has_padding else None,
                cache=cache,
                position_ids=next_position,
            )
            next_position = next_position + 1
            next_tokens, next_finished = step(logits, finished, n)
            mx.async_eval(next_tokens, next_finished)
        yield tokens.tolist()
        if finished.all().item() or n == max_new_tokens:
            return
        tokens, finished = next_tokens, next_finished


def generate(
    model: Blip2Model,
    pixel_values=None,
    input_ids=None,
    attention_mask=None,
    *,
    image_features: mx.array | None = None,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    interpolate_pos_encoding: bool = False,
) -> mx.array:
    """Generate new token ids for a batch of images and (optional) prompts; returns (B, T) new ids only.

    ``image_features`` (from ``model.encode_images``) may replace ``pixel_values`` so that several prompts on one
    image encode it once.
    """
    if num_beams != 1:
        raise NotImplementedError("beam search is not implemented yet; use num_beams=1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if image_features is None:
        if pixel_values is None:
            raise ValueError("pass pixel_values (or image_features from model.encode_images)")
        pixel_values = check_pixel_values(pixel_values, model.config.vision_config.num_channels)
        image_features = model.encode_images(pixel_values, interpolate_pos_encoding)
    embeds, mask = model.merge_image_features(image_features, input_ids, attention_mask)
    if pad_token_id is None:
        pad_token_id = model.config.text_config.pad_token_id or 0
    rows = list(
        generate_step(
            model,
            embeds,
            mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            eos_ids=_eos_ids(model, eos_token_id),
            pad_token_id=pad_token_id,
        )
    )
    return mx.array(rows, dtype=mx.int32).T
