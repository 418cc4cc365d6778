"""LLaMA / Vicuna, InstructBLIP's decoder-only language model, run by mlx-lm's ``llama.Model`` (not copied here).

mlx-lm's LLaMA is built for one unpadded sequence (or its own ``BatchKVCache``): its mask comes from the cache
(``cache.make_mask``) and its rotary positions from ``cache.offset``, one start position per row. BLIP-2-style
prompts need more: the ``<image>`` tokens sit in front of any left padding (``[img]*Q, pad, pad, BOS, text``), so
transformers' positions (``cumsum(mask) - 1`` during generation) jump over the padding inside a row, and the
padding must be masked out of attention. This module bridges that without touching mlx-lm's layers:

- :class:`_Positioned`, a per-call view of each layer's cache, hands mlx-lm's attention our additive
  (causal + padding) mask through ``make_mask`` and our (B, L) position ids through ``offset``; the keys and values
  still go to the runner's ``KVCache``;
- :class:`TokenPositionRoPE` wraps each layer's RoPE so that (B, L) positions rotate every token at its own
  position (``mx.fast.rope`` takes one offset per row: the tokens are folded into the batch axis).

The wrapper presents the interface ``DecoderOnlyRunner`` drives (``layers``, ``get_input_embeddings``,
``__call__(inputs_embeds, attention_mask, cache, position_ids, logits_to_keep)``), like ``OPTForCausalLM``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama as mlx_llama

from .base import BaseConfig, ConfigError, causal_padding_mask


@dataclass
class LlamaConfig(BaseConfig):
    """transformers' ``LlamaConfig`` defaults (Vicuna-7B's shapes); transformers 5 writes ``rope_parameters``."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    rope_parameters: Optional[dict] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None
    bos_token_id: int = 1
    eos_token_id: Any = 2
    is_encoder_decoder: bool = False

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise ConfigError(f"text_config.hidden_act={self.hidden_act!r}: mlx-lm's LLaMA supports only 'silu'")
        rope = dict(self.rope_parameters or {})
        self.rope_theta = rope.pop("rope_theta", self.rope_theta)
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            self.rope_scaling = rope

    def model_args(self) -> mlx_llama.ModelArgs:
        return mlx_llama.ModelArgs(
            model_type="llama", hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            intermediate_size=self.intermediate_size, num_attention_heads=self.num_attention_heads,
            rms_norm_eps=self.rms_norm_eps, vocab_size=self.vocab_size, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, num_key_value_heads=self.num_key_value_heads,
            attention_bias=self.attention_bias, mlp_bias=self.mlp_bias, rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling, tie_word_embeddings=self.tie_word_embeddings,
        )


class TokenPositionRoPE(nn.Module):
    """mlx-lm's RoPE module, applied at per-token positions when ``offset`` is a (B, L) array."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.rope = rope

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        if not isinstance(offset, mx.array) or offset.ndim != 2:
            return self.rope(x, offset=offset)
        B, H, L, D = x.shape
        if L == 1:
            return self.rope(x, offset=offset[:, 0])
        folded = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)  # each token its own "row", with its own offset
        out = self.rope(folded, offset=offset.reshape(-1))
        return out.reshape(B, L, H, D).transpose(0, 2, 1, 3)


class _Positioned:
    """What mlx-lm's LLaMA reads off a layer's cache, for one call: positions, mask, and the key/value store."""

    def __init__(self, cache, positions: mx.array, mask: mx.array | None):
        self.cache, self.offset, self.mask = cache, positions, mask

    def make_mask(self, *args, **kwargs):
        return self.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return (keys, values) if self.cache is None else self.cache.update_and_fetch(keys, values)


class LlamaForCausalLM(mlx_llama.Model):
    """mlx-lm's LLaMA with transformers' inputs: embeddings, a padding mask and position ids.

    Parameter names are transformers' (``model.layers.N.self_attn.q_proj``, ``lm_head``), so Hub weights load as
    they are. ``position_ids`` default to the attention mask's running count (``cumsum(mask) - 1``, padding at 0),
    which is what transformers' ``generate`` passes; its plain forward uses ``arange`` instead, so
    ``InstructBlipForConditionalGeneration.__call__`` passes those explicitly.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__(config.model_args())
        self.config = config
        for layer in self.model.layers:
            layer.self_attn.rope = TokenPositionRoPE(layer.self_attn.rope)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None, position_ids=None,
                 logits_to_keep: int = 0):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        B, L, _ = inputs_embeds.shape
        past = cache[0].offset if cache is not None else 0
        if position_ids is None:
            if attention_mask is None:
                position_ids = mx.broadcast_to(mx.arange(past, past + L)[None], (B, L))
            else:
                keep = attention_mask.astype(mx.int32)
                position_ids = (mx.maximum(mx.cumsum(keep, axis=1) - 1, 0) * keep)[:, past:]
        position_ids = mx.broadcast_to(mx.array(position_ids).astype(mx.int32), (B, L))
        if attention_mask is None and L == 1:
            mask = None  # one new token, no padding anywhere: it sees every key
        else:
            if attention_mask is None:
                attention_mask = mx.ones((B, past + L), dtype=mx.int32)
            mask = causal_padding_mask(attention_mask, L, inputs_embeds.dtype)
        views = [_Positioned(c, position_ids, mask) for c in (cache or [None] * len(self.layers))]
        h = self.model(None, views, input_embeddings=inputs_embeds)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.model.embed_tokens.as_linear(h) if self.args.tie_word_embeddings else self.lm_head(h)
