"""The language-modelling loss with transformers' meaning (``ForCausalLMLoss``, T5's ``labels=``).

Labels of -100 are ignored. Decoder-only models predict token ``t + 1`` from position ``t`` (the labels are shifted
left by one, the last position predicts nothing); the loss is the mean over the labels that count, computed in
float32 whatever the logits' dtype. An encoder-decoder model is fed the labels shifted right behind
``decoder_start_token_id`` (-100 replaced by the pad id) and scores every unmasked label in place.
"""

from __future__ import annotations

import mlx.core as mx

IGNORE_INDEX = -100


def token_cross_entropy(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the targets that are not -100, and how many there are."""
    keep = targets != IGNORE_INDEX
    logits = logits.astype(mx.float32)
    safe = mx.where(keep, targets, 0)
    picked = mx.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    losses = (mx.logsumexp(logits, axis=-1) - picked) * keep
    return losses.sum(), keep.sum()


def causal_lm_loss(logits: mx.array, labels: mx.array) -> mx.array:
    """Mean next-token cross-entropy; ``logits`` cover the labels' positions (the last ``labels.shape[1]``)."""
    logits = logits[:, -labels.shape[1]:]
    shifted = mx.concatenate([labels[:, 1:], mx.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)], axis=1)
    total, count = token_cross_entropy(logits, shifted)
    return total / count  # no labels at all gives nan, as in torch


def seq2seq_loss(logits: mx.array, labels: mx.array) -> mx.array:
    total, count = token_cross_entropy(logits, labels)
    return total / count


def shift_tokens_right(labels: mx.array, decoder_start_token_id: int, pad_token_id: int) -> mx.array:
    """T5's decoder inputs for ``labels``: the start token, then the labels but the last, -100 read as padding."""
    start = mx.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype)
    shifted = mx.concatenate([start, labels[:, :-1]], axis=1)
    return mx.where(shifted == IGNORE_INDEX, pad_token_id, shifted)
