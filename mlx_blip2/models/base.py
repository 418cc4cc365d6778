"""Pieces every model file shares: config loading, activations, attention masks, output types, input checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cpu_math import gelu


class ConfigError(ValueError):
    """A config.json that cannot describe a BLIP-2 model."""


class BaseConfig:
    """Hub configs are sparse, so every field defaults to transformers' default; unknown keys are ignored."""

    @classmethod
    def from_dict(cls, params: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# transformers' ACT2FN names; "gelu" is the exact (erf) GELU, computed by cpu_math on the CPU backend.
ACT = {"gelu": gelu, "gelu_new": nn.gelu_approx, "relu": nn.relu, "silu": nn.silu, "quick_gelu": nn.gelu_fast_approx}


@dataclass
class BaseModelOutputWithPooling:
    last_hidden_state: mx.array
    pooler_output: mx.array | None = None


@dataclass
class BaseModelOutputWithPoolingAndCrossAttentions:
    last_hidden_state: mx.array
    pooler_output: mx.array | None = None


def additive_mask(mask: mx.array | None, dtype) -> mx.array | None:
    """(B, S) keep-mask of 1/0 -> (B, 1, 1, S) additive mask."""
    if mask is None:
        return None
    return mx.where(mask[:, None, None, :].astype(mx.bool_), 0.0, mx.finfo(dtype).min).astype(dtype)


def causal_padding_mask(attention_mask: mx.array, query_length: int, dtype) -> mx.array:
    """(B, S) keep-mask -> (B, 1, L, S) additive mask, causal over the last L of the S keys."""
    S = attention_mask.shape[1]
    offset = S - query_length
    causal = mx.arange(S)[None, :] <= (mx.arange(query_length)[:, None] + offset)
    keep = causal[None, None] & attention_mask[:, None, None, :].astype(mx.bool_)
    return mx.where(keep, 0.0, mx.finfo(dtype).min).astype(dtype)


def as_array(x, name: str, ndim: int, dtype=None) -> mx.array:
    """numpy, mx, lists or torch tensors -> mx.array of the expected rank."""
    if x is None:
        return None
    if hasattr(x, "detach"):  # a torch tensor from a transformers processor
        x = x.detach().cpu().numpy()
    x = x if isinstance(x, mx.array) else mx.array(np.asarray(x))
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x if dtype is None else x.astype(dtype)


def check_pixel_values(pixel_values, num_channels: int) -> mx.array:
    pixel_values = as_array(pixel_values, "pixel_values", 4)
    if pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values must be (batch, {num_channels}, height, width) as the processor returns them, "
            f"got shape {tuple(pixel_values.shape)}"
        )
    return pixel_values
