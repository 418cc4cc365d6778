"""The Querying Transformer (transformers' ``Blip2QFormerModel``).

A BERT encoder (post-LN) run over learned query tokens, optionally followed by text tokens. Every
``cross_attention_frequency``-th layer lets the queries attend to the image; queries and text have separate
feed-forward blocks (``intermediate_query``/``output_query`` versus ``intermediate``/``output``).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .base import ACT, BaseConfig, BaseModelOutputWithPoolingAndCrossAttentions, additive_mask
from .cpu_math import scaled_dot_product_attention


@dataclass
class Blip2QFormerConfig(BaseConfig):
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False


class Blip2QFormerMultiHeadAttention(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.scale = (config.hidden_size // self.num_heads) ** -0.5
        kv_dim = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_dim, config.hidden_size)
        self.value = nn.Linear(kv_dim, config.hidden_size)

    def __call__(self, x: mx.array, context: mx.array, mask: mx.array | None = None) -> mx.array:
        B, L, _ = x.shape

        def heads(t):
            return t.reshape(B, t.shape[1], self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(context)), heads(self.value(context))
        out = scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


class Blip2QFormerSelfOutput(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, in_dim: int | None = None):
        super().__init__()
        self.dense = nn.Linear(in_dim or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class Blip2QFormerAttention(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = Blip2QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = Blip2QFormerSelfOutput(config)

    def __call__(self, x: mx.array, context: mx.array | None = None, mask: mx.array | None = None) -> mx.array:
        return self.output(self.attention(x, x if context is None else context, mask), x)


class Blip2QFormerIntermediate(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT[config.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.intermediate_act_fn(self.dense(x))


class Blip2QFormerOutput(Blip2QFormerSelfOutput):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__(config, in_dim=config.intermediate_size)


class Blip2QFormerLayer(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = Blip2QFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Blip2QFormerAttention(config, is_cross_attention=True)
        if config.use_qformer_text_input:
            self.intermediate = Blip2QFormerIntermediate(config)
            self.output = Blip2QFormerOutput(config)
        self.intermediate_query = Blip2QFormerIntermediate(config)
        self.output_query = Blip2QFormerOutput(config)

    def __call__(self, x, mask, encoder_hidden_states, encoder_mask, query_length: int) -> mx.array:
        x = self.attention(x, mask=mask)
        parts = []
        if query_length > 0:
            queries = x[:, :query_length]
            if self.has_cross_attention:
                if encoder_hidden_states is None:
                    raise ValueError("encoder_hidden_states must be given for cross-attention layers")
                queries = self.crossattention(queries, encoder_hidden_states, encoder_mask)
            parts.append(self.output_query(self.intermediate_query(queries), queries))
        if x.shape[1] > query_length:
            text = x[:, query_length:]
            parts.append(self.output(self.intermediate(text), text))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)


class Blip2QFormerEncoder(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.layer = [Blip2QFormerLayer(config, i) for i in range(config.num_hidden_layers)]

    def __call__(self, x, mask=None, encoder_hidden_states=None, encoder_mask=None, query_length: int = 0):
        for layer in self.layer:
            x = layer(x, mask, encoder_hidden_states, encoder_mask, query_length)
        return x


class Blip2QFormerModel(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.config = config
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Blip2QFormerEncoder(config)

    def __call__(
        self,
        query_embeds: mx.array,
        query_length: int | None = None,
        attention_mask: mx.array | None = None,
        encoder_hidden_states: mx.array | None = None,
        encoder_attention_mask: mx.array | None = None,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        """``query_embeds`` is the queries, optionally followed by already embedded text tokens."""
        query_length = query_embeds.shape[1] if query_length is None else query_length
        x = self.layernorm(query_embeds)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.astype(x.dtype)
        x = self.encoder(
            x,
            additive_mask(attention_mask, x.dtype),
            encoder_hidden_states,
            additive_mask(encoder_attention_mask, x.dtype),
            query_length,
        )
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=x, pooler_output=x[:, 0])
