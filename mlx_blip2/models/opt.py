"""OPT, the decoder-only language model of the blip2-opt checkpoints (transformers' ``OPTForCausalLM``).

Learned positions with OPT's offset of 2, computed from the attention mask so that left padding works; pre-LN
blocks (``do_layer_norm_before``), ReLU, optional ``project_in``/``project_out`` and a tied ``lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .base import ACT, BaseConfig, causal_padding_mask



@dataclass
class OPTConfig(BaseConfig):
    model_type: str = "opt"
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: Optional[int] = None
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: Any = 2
    is_encoder_decoder: bool = False

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size


POSITION_OFFSET = 2  # OPT's position table starts two rows in (a fairseq legacy).


def positions_from_mask(attention_mask: mx.array) -> mx.array:
    """Position ids that skip padding: 0, 1, 2, ... over the kept tokens, -1 on padding (as transformers)."""
    mask = attention_mask.astype(mx.int32)
    return mx.cumsum(mask, axis=1) * mask - 1


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        dim, bias = config.hidden_size, config.enable_bias
        self.num_heads = config.num_attention_heads
        self.scaling = (dim // self.num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def __call__(self, x: mx.array, mask: mx.array | None, cache=None) -> mx.array:
        B, L, D = x.shape

        def heads(t):
            return t.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)

        # OPT scales the queries before the product, not the scores; keep that order for bit-level parity.
        q, k, v = heads(self.q_proj(x) * self.scaling), heads(self.k_proj(x)), heads(self.v_proj(x))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        dim, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(dim, affine=affine)
        self.activation_fn = ACT[config.activation_function]
        self.fc1 = nn.Linear(dim, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, dim, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(dim, affine=affine)

    def __call__(self, x: mx.array, mask: mx.array | None, cache=None) -> mx.array:
        pre = self.do_layer_norm_before
        h = self.self_attn(self.self_attn_layer_norm(x) if pre else x, mask, cache)
        x = x + h
        if not pre:
            x = self.self_attn_layer_norm(x)
        h = self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(x) if pre else x)))
        x = x + h
        if not pre:
            x = self.final_layer_norm(x)
        return x


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size)
        if config.word_embed_proj_dim != config.hidden_size:
            self.project_in = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False)
            self.project_out = nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False)
        if config.do_layer_norm_before and not config._remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(config.hidden_size, affine=config.layer_norm_elementwise_affine)
        self.layers = [OPTDecoderLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, inputs_embeds, attention_mask=None, cache=None, position_ids=None) -> mx.array:
        B, L, _ = inputs_embeds.shape
        past = cache[0].offset if cache is not None else 0
        if attention_mask is None and L == 1 and position_ids is not None:
            mask = None  # one new token without padding anywhere attends to every key
        else:
            if attention_mask is None:
                attention_mask = mx.ones((B, past + L), dtype=mx.int32)
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask)[:, past:]
            mask = causal_padding_mask(attention_mask, L, inputs_embeds.dtype)
        x = self.project_in(inputs_embeds) if "project_in" in self else inputs_embeds
        x = x + self.embed_positions(position_ids + POSITION_OFFSET).astype(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, cache[i] if cache is not None else None)
        if "final_layer_norm" in self:
            x = self.final_layer_norm(x)
        if "project_out" in self:
            x = self.project_out(x)
        return x


class OPTModel(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    @property
    def layers(self):
        return self.model.decoder.layers

    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None, position_ids=None,
                 logits_to_keep: int = 0):
        """Logits for every position, or for the last ``logits_to_keep`` (transformers' argument; 0 keeps all)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        h = self.model.decoder(inputs_embeds, attention_mask, cache, position_ids)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]  # a prefill needs only the last position's logits: skip the rest of lm_head
        if "lm_head" in self:
            return self.lm_head(h)
        return self.model.decoder.embed_tokens.as_linear(h)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        if self.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
