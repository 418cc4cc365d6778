"""Which parameters train: the groups of ``--train`` (any combination), everything else frozen.

- ``qformer``: the query tokens, the Q-Former and the language projection (BLIP-2's second-stage recipe);
- ``vit``: the vision transformer (LAVIS's COCO captioning recipe);
- ``lora``: LoRA layers on the language model's attention projections (see :mod:`mlx_blip2.models.adapters`).

Frozen layers may stay quantized: only LoRA's own matrices need float weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..models.adapters import apply_lora, lora_layers

GROUPS = ("qformer", "vit", "lora")
MODULE_GROUPS = {"qformer": ("query_tokens", "qformer", "language_projection"), "vit": ("vision_model",)}


@dataclass
class LoraOptions:
    """PEFT's BLIP-2 example by default: rank 16, alpha 32 (scale alpha / rank), dropout 0.05, q and v."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    keys: list[str] | None = None
    num_layers: int | None = None  # the last N blocks of each stack; None: all

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_groups(text: str | list[str]) -> tuple[str, ...]:
    """``"qformer,lora"`` -> ("qformer", "lora"); an unknown group is a ValueError naming it."""
    parts = text.replace("+", ",").split(",") if isinstance(text, str) else list(text)
    groups = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise ValueError(f"--train {text!r}: expected one or more of {', '.join(GROUPS)} (comma-separated)")
    return groups


def set_trainable(model: nn.Module, groups, lora: LoraOptions | None = None) -> dict | None:
    """Freeze ``model`` but ``groups``; adds LoRA layers for "lora" and returns their config (else None)."""
    model.freeze()
    lora_config = None
    if "lora" in groups:
        lora = lora or LoraOptions()
        lora_config = apply_lora(model, rank=lora.rank, scale=lora.scale, dropout=lora.dropout, keys=lora.keys,
                                 num_layers=lora.num_layers)
        for _, layer in lora_layers(model):
            layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    names = [n for g in groups for n in MODULE_GROUPS.get(g, ())]
    if "query_tokens" in names:
        model.unfreeze(keys=["query_tokens"], recurse=False)
    for name in names:
        if name != "query_tokens":
            getattr(model, name).unfreeze()
    return lora_config


def trainable_names(model: nn.Module) -> list[str]:
    return [k for k, _ in tree_flatten(model.trainable_parameters())]


def group_of(name: str) -> str:
    """The report group of a parameter path: query_tokens, qformer, language_projection, vision_model, lora_a/b."""
    if name.endswith((".lora_a", ".lora_b")):
        return name.rsplit(".", 1)[1]
    return name.split(".", 1)[0]
