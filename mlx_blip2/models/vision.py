"""The EVA ViT-g image encoder (transformers' ``Blip2VisionModel``).

Pre-LN transformer blocks over 14x14 patches plus a class token, with a fused qkv projection whose key part has no
bias, exact (erf) GELU and a final ``post_layernorm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .base import ACT, BaseConfig, BaseModelOutputWithPooling
from .cpu_math import attention_from_qkv_t, scaled_dot_product_attention


@dataclass
class Blip2VisionConfig(BaseConfig):
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    num_channels: int = 3


class Blip2VisionEmbeddings(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.class_embedding = mx.zeros((1, 1, config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = mx.zeros((1, num_positions, config.hidden_size))

    def interpolate_pos_encoding(self, height: int, width: int) -> mx.array:
        from .interpolate import bicubic_resize  # only needed off the checkpoint's resolution

        pos = self.position_embedding
        grid = int((pos.shape[1] - 1) ** 0.5)
        new_h, new_w = height // self.patch_size, width // self.patch_size
        if (new_h, new_w) == (grid, grid):
            return pos
        patch_pos = pos[:, 1:].reshape(1, grid, grid, -1)
        patch_pos = bicubic_resize(patch_pos, (new_h, new_w)).reshape(1, new_h * new_w, -1)
        return mx.concatenate([pos[:, :1], patch_pos.astype(pos.dtype)], axis=1)

    def __call__(self, pixel_values: mx.array, interpolate_pos_encoding: bool = False) -> mx.array:
        batch, _, height, width = pixel_values.shape
        # Checkpoints and processors are channels-first; MLX convolutions are channels-last.
        x = pixel_values.transpose(0, 2, 3, 1).astype(self.patch_embedding.weight.dtype)
        patches = self.patch_embedding(x).reshape(batch, -1, self.class_embedding.shape[-1])
        cls = mx.broadcast_to(self.class_embedding, (batch, 1, patches.shape[-1])).astype(patches.dtype)
        embeddings = mx.concatenate([cls, patches], axis=1)
        if interpolate_pos_encoding:
            pos = self.interpolate_pos_encoding(height, width)
        else:
            pos = self.position_embedding
            if pos.shape[1] != embeddings.shape[1]:
                raise ValueError(
                    f"pixel_values of size {height}x{width} give {embeddings.shape[1] - 1} patches but the checkpoint "
                    f"has position embeddings for {pos.shape[1] - 1}; resize the image or pass "
                    "interpolate_pos_encoding=True"
                )
        return embeddings + pos.astype(embeddings.dtype)


class Blip2Attention(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.scale = (config.hidden_size // self.num_heads) ** -0.5
        # The checkpoint's qkv bias is q_bias, zeros, v_bias; sanitize() builds it from older split checkpoints.
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.projection = nn.Linear(config.hidden_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() == mx.cpu and type(self.qkv) is nn.Linear and type(self.projection) is nn.Linear:
            return self.projection(self.attention_t(self.qkv_t(x)).swapaxes(-1, -2))
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        out = scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        return self.projection(out.transpose(0, 2, 1, 3).reshape(B, L, D))

    # The CPU path: the qkv projection computed transposed, (B, 3 D, L) = W x^T (+ bias), lays every head's q, k and v
    # out as contiguous (head_dim, L) matrices, so that the attention products and the output projection read them
    # in place where splitting heads, and merging them back, cost three and one strided copies (~3 ms on the ViT-g).
    def qkv_t(self, x: mx.array) -> mx.array:
        x_t = x.swapaxes(-1, -2)
        if "bias" in self.qkv:
            return mx.addmm(self.qkv.bias[:, None], self.qkv.weight, x_t)
        return self.qkv.weight @ x_t

    def attention_t(self, qkv_t: mx.array) -> mx.array:
        """(B, 3 D, L) transposed qkv -> (B, D, L) transposed attention output, before the output projection."""
        return attention_from_qkv_t(qkv_t, self.num_heads, self.scale)


class Blip2MLP(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.activation_fn = ACT[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation_fn(self.fc1(x)))


class Blip2EncoderLayer(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.self_attn = Blip2Attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Blip2MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Blip2Encoder(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.layers = [Blip2EncoderLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class Blip2VisionModel(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Blip2VisionEmbeddings(config)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, pixel_values: mx.array, interpolate_pos_encoding: bool = False) -> BaseModelOutputWithPooling:
        x = self.encoder(self.embeddings(pixel_values, interpolate_pos_encoding))
        x = self.post_layernorm(x)
        # transformers applies post_layernorm a second time to the pooled class token.
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=self.post_layernorm(x[:, 0]))

    @staticmethod
    def sanitize(weights: dict[str, mx.array], prefix: str = "vision_model.") -> dict[str, mx.array]:
        out = {}
        for k, v in weights.items():
            if k.endswith("patch_embedding.weight") and v.shape[1] < v.shape[-1]:
                v = v.transpose(0, 2, 3, 1)  # (out, in, kh, kw) -> (out, kh, kw, in)
            if k.endswith("self_attn.q_bias"):
                v_bias = weights[k.replace("q_bias", "v_bias")]
                k, v = k.replace("q_bias", "qkv.bias"), mx.concatenate([v, mx.zeros_like(v), v_bias])
            elif k.endswith("self_attn.v_bias"):
                continue
            out[k] = v
        return out
