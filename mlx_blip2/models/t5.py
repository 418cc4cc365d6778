"""T5 / Flan-T5, the encoder-decoder language model of the blip2-flan-t5 checkpoints (transformers'
``T5ForConditionalGeneration``).

Pre-norm blocks with RMS norms (no mean, no bias, float32 variance), no biases anywhere, no attention scaling (T5
folds it into the initialisation) and a learned relative position bias: bucketed distances, bidirectional in the
encoder and causal in the decoder, computed by the first block of each stack and shared by all of its blocks.
Flan-T5 (T5 v1.1) has a gated-GELU feed-forward and its own ``lm_head``; original T5 ties ``lm_head`` to the
embeddings and rescales the decoder output by ``d_model**-0.5`` first.

BLIP-2 feeds the encoder ``inputs_embeds`` (prompt embeddings with the projected image queries in the ``<image>``
slots); generation then runs the decoder from ``decoder_start_token_id`` with a cache (:meth:`make_cache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from .base import ACT, BaseConfig, ConfigError
from .quant import compute_dtype

ACTIVATIONS = {**ACT, "gelu_pytorch_tanh": nn.gelu_approx}
# transformers keeps these weights in float32 when a T5 is loaded in half precision (``_keep_in_fp32_modules``);
# the model below computes ``wo`` in whatever dtype its weight has, so a loader that keeps them matches it.
FP32_SUFFIXES = ("DenseReluDense.wo.weight",)


@dataclass
class T5Config(BaseConfig):
    model_type: str = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    # Derived from feed_forward_proj unless the config names them; an explicit value wins, as in transformers (the
    # Hub's blip2-flan-t5 configs say "gelu", i.e. exact GELU, where "gated-gelu" alone would give "gelu_new").
    dense_act_fn: Optional[str] = None
    is_gated_act: Optional[bool] = None
    tie_word_embeddings: bool = True
    # Whether the decoder output is scaled by d_model**-0.5 before lm_head (original T5, not v1.1/Flan-T5).
    # transformers derives it from tie_word_embeddings unless saved explicitly (transformers 5 saves both).
    scale_decoder_outputs: Optional[bool] = None
    pad_token_id: int = 0
    eos_token_id: Any = 1
    bos_token_id: Optional[int] = None  # absent from T5; BLIP-2's configs set it (its default prompt)
    decoder_start_token_id: int = 0
    is_encoder_decoder: bool = True

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        act = self.feed_forward_proj.split("-")
        if len(act) > 2 or (len(act) == 2 and act[0] != "gated"):
            raise ConfigError(f"feed_forward_proj={self.feed_forward_proj!r}: expected 'ACT' or 'gated-ACT'")
        if self.dense_act_fn is None:
            self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else act[-1]
        if self.is_gated_act is None:
            self.is_gated_act = act[0] == "gated"
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings is not False
        if self.dense_act_fn not in ACTIVATIONS:
            raise ConfigError(f"dense_act_fn={self.dense_act_fn!r} is not supported (supported: {sorted(ACTIVATIONS)})")

    # transformers' attribute_map: BLIP-2's language_projection targets text_config.hidden_size.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers


def relative_position_bucket(relative_position: mx.array, bidirectional: bool, num_buckets: int, max_distance: int):
    """Bucket of each (key - query) distance: exact below num_buckets/2 (per direction), log-spaced up to
    max_distance, clamped beyond. The float steps follow transformers' float32 order so boundaries agree."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).astype(mx.int32) * num_buckets
        distance = mx.abs(relative_position)
    else:
        distance = -mx.minimum(relative_position, 0)  # a decoder query never sees later keys
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # max() only keeps log(0) out of the unused branch.
    scaled = mx.log(mx.maximum(distance, max_exact).astype(mx.float32) / max_exact)
    large = max_exact + (scaled / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(mx.int32)
    large = mx.minimum(large, num_buckets - 1)
    return buckets + mx.where(is_small, distance, large)


def keep_to_additive(keep: mx.array, values, dtype) -> mx.array:
    """Boolean keep-mask -> additive mask holding ``values`` (the position bias, or 0) where kept."""
    return mx.where(keep, values, mx.array(mx.finfo(dtype).min, dtype)).astype(dtype)


def clamp_fp16(x: mx.array) -> mx.array:
    """transformers' float16 guard after every sub-layer: once any value overflowed to inf, the whole tensor is clamped
    to +-(max - 1000) so the next norm sees large finite values instead of inf/nan. A no-op for other dtypes."""
    if x.dtype != mx.float16:
        return x
    big = float(mx.finfo(mx.float16).max)
    limit = mx.where(mx.isinf(x).any(), mx.array(big - 1000, mx.float16), mx.array(big, mx.float16))
    return mx.clip(x, -limit, limit)


class T5LayerNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        # Variance in float32 whatever the input; the result goes back to the weight's dtype only when that is a
        # half type (as transformers does, so a float32 residual stream meets float16 weights in float16).
        x = x.astype(mx.float32)
        x = x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + self.eps)
        if self.weight.dtype in (mx.float16, mx.bfloat16):
            x = x.astype(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def heads(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)

    def compute_bias(self, query_length: int, key_length: int, offset: int, bidirectional: bool) -> mx.array:
        """(1, heads, query_length, key_length) bias; queries sit at positions offset, offset + 1, ..."""
        context = mx.arange(offset, offset + query_length)[:, None]
        memory = mx.arange(key_length)[None, :]
        buckets = relative_position_bucket(memory - context, bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]

    def keys_values(self, memory: mx.array) -> tuple[mx.array, mx.array]:
        return self.heads(self.k(memory)), self.heads(self.v(memory))

    def __call__(self, x, mask, cache: KVCache | None = None, keys_values=None) -> mx.array:
        """Self-attention, or cross-attention when ``keys_values`` (from :meth:`keys_values`) is given."""
        B, L, _ = x.shape
        q = self.heads(self.q(x))
        if keys_values is None:
            k, v = self.keys_values(x)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
        else:
            k, v = keys_values
        # No 1/sqrt(d) scaling: T5 never had it (its initialisation absorbs it).
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x, mask, cache=None):
        return x + self.SelfAttention(self.layer_norm(x), mask, cache)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x, keys_values, mask):
        return x + self.EncDecAttention(self.layer_norm(x), mask, keys_values=keys_values)


class T5DenseActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATIONS[config.dense_act_fn]

    def __call__(self, x):
        return self.wo(self.act(self.wi(x)).astype(compute_dtype(self.wo)))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATIONS[config.dense_act_fn]

    def __call__(self, x):
        # Cast to wo's dtype: a float32 wo (see FP32_SUFFIXES) then turns the residual stream float32.
        return self.wo((self.act(self.wi_0(x)) * self.wi_1(x)).astype(compute_dtype(self.wo)))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated_act else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5LayerCache:
    """One decoder block's cache: its self-attention keys/values (grown each step) and the cross-attention
    keys/values, which depend only on the encoder output and are computed on the first decode call."""

    def __init__(self):
        self.self_attention = KVCache()
        self.cross_attention: tuple[mx.array, mx.array] | None = None

    @property
    def offset(self) -> int:
        return self.self_attention.offset

    def select(self, index: mx.array) -> None:
        """Keep/reorder batch rows (beam search): row i becomes row ``index[i]``."""
        kv = self.self_attention
        if kv.keys is not None:
            kv.keys, kv.values = kv.keys[index], kv.values[index]
        if self.cross_attention is not None:
            self.cross_attention = tuple(t[index] for t in self.cross_attention)


class T5Block(nn.Module):
    def __init__(self, config: T5Config, is_decoder: bool, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = [T5LayerSelfAttention(config, has_relative_attention_bias)]
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))

    def __call__(self, x, mask, memory=None, memory_mask=None, cache: T5LayerCache | None = None):
        x = clamp_fp16(self.layer[0](x, mask, cache.self_attention if cache is not None else None))
        if len(self.layer) == 3:
            keys_values = cache.cross_attention if cache is not None else None
            if keys_values is None:
                keys_values = self.layer[1].EncDecAttention.keys_values(memory)
                if cache is not None:
                    cache.cross_attention = keys_values
            x = clamp_fp16(self.layer[1](x, keys_values, memory_mask))
        return clamp_fp16(self.layer[-1](x))


class T5Stack(nn.Module):
    """Encoder or decoder blocks; token embeddings live in the parent's ``shared`` (the stacks' ``embed_tokens``
    are the same matrix in every checkpoint)."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = [T5Block(config, is_decoder, has_relative_attention_bias=i == 0) for i in range(n)]
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x, attention_mask=None, memory=None, memory_mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        offset = cache[0].offset if cache is not None else 0
        S = offset + L
        bias = self.block[0].layer[0].SelfAttention.compute_bias(L, S, offset, bidirectional=not self.is_decoder)
        keep = None
        if self.is_decoder and L > 1:
            keep = (mx.arange(S)[None, :] <= mx.arange(offset, S)[:, None])[None, None]
        if attention_mask is not None:
            pad = attention_mask[:, None, None, :].astype(mx.bool_)
            keep = pad if keep is None else keep & pad
        mask = bias if keep is None else keep_to_additive(keep, bias, bias.dtype)
        if memory_mask is not None:
            memory_mask = memory_mask[:, None, None, :].astype(mx.bool_)  # padded encoder positions get no attention
        for i, block in enumerate(self.block):
            x = block(x, mask, memory, memory_mask, cache[i] if cache is not None else None)
        return self.final_layer_norm(x)


class T5ForConditionalGeneration(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def make_cache(self) -> list[T5LayerCache]:
        return [T5LayerCache() for _ in self.decoder.block]

    def encode(self, inputs_embeds: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """Encoder hidden states (B, S, d_model); ``attention_mask`` is a (B, S) 1/0 keep-mask."""
        return self.encoder(inputs_embeds, attention_mask)

    def decode(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask=None, cache=None,
               decoder_attention_mask=None) -> mx.array:
        """Logits (B, T, vocab) for ``decoder_input_ids`` (B, T), which follow the ``cache``'s tokens if one is given.

        ``decoder_attention_mask`` (optional) covers the cached and the new tokens. With a cache, the cross-attention
        keys/values are made from ``encoder_hidden_states`` on the first call and reused after.
        """
        h = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, encoder_hidden_states,
                         encoder_attention_mask, cache)
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model**-0.5  # original T5 with tied embeddings; not Flan-T5
        return self.lm_head(h) if "lm_head" in self else self.shared.as_linear(h)

    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None) -> mx.array:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if decoder_input_ids is None:
            raise ValueError("T5 needs decoder_input_ids (start them with decoder_start_token_id)")
        if inputs_embeds is None:
            inputs_embeds = self.shared(input_ids)
        encoded = self.encode(inputs_embeds, attention_mask)
        return self.decode(decoder_input_ids, encoded, attention_mask, decoder_attention_mask=decoder_attention_mask)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop the duplicates checkpoints carry, and let the weights decide whether lm_head is tied.

        transformers 5 writes ``tie_word_embeddings: true`` for every T5, Flan-T5 included, and at load time ties
        lm_head only when the checkpoint has no separate (different) one; do the same.
        """
        for stack in ("encoder", "decoder"):
            for k in [k for k in weights if k.startswith(f"{stack}.embed_tokens.")]:
                w = weights.pop(k)
                weights.setdefault("shared." + k.split(".", 2)[2], w)  # some checkpoints keep only these names
        # transformers ignores this key (cross-attention has no position bias).
        weights.pop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)
        head, shared = weights.get("lm_head.weight"), weights.get("shared.weight")
        tied = head is None or (
            shared is not None and head.shape == shared.shape and head.dtype == shared.dtype
            and bool(mx.array_equal(head, shared).item())
        )
        if tied:
            for k in [k for k in weights if k.startswith("lm_head.")]:
                weights.pop(k)
            if "lm_head" in self:
                del self["lm_head"]
        elif "lm_head" not in self:
            self.lm_head = nn.Linear(self.config.d_model, self.config.vocab_size, bias=False)
        return weights
