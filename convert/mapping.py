"""The source side of a conversion: its config.json, the class that holds its weights (from the model registry),
loaded in the target precision, and the config written beside the converted weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import mlx.nn as nn

from mlx_blip2.models.base import ConfigError
from mlx_blip2.models.loading import CheckpointError, resolve_checkpoint
from mlx_blip2.models.registry import RETRIEVAL, ModelSpec, model_spec

from .options import DTYPES, ConvertOptions


def default_dtype(config: dict[str, Any]) -> str:
    """float16, or bfloat16 for a T5 language model (T5's activations overflow float16)."""
    text = config.get("text_config") or {}
    return "bfloat16" if isinstance(text, dict) and text.get("model_type") == "t5" else "float16"


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json; is this a BLIP-2 checkpoint?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    if config.get("model_type", "blip-2") not in ("blip-2", "instructblip"):
        raise ConfigError(f"{path}: model_type is {config['model_type']!r}; expected a BLIP-2 checkpoint ('blip-2') "
                          "or an InstructBLIP one ('instructblip')")
    return config


def open_source(hf_path, mlx_path: Path, options: ConvertOptions) -> tuple[Path, dict[str, Any], ModelSpec]:
    """(checkpoint directory, its config, its spec), after checking that ``options`` can apply to it."""
    source = resolve_checkpoint(hf_path)
    config = read_config(source)
    if options.force and mlx_path.exists() and source.resolve().is_relative_to(mlx_path.resolve()) \
            and source.resolve() != mlx_path.resolve():
        raise ValueError(f"--force would delete {mlx_path}, which holds the source checkpoint {source}")
    quantized = bool(config.get("quantization"))
    if options.quantize and quantized:
        raise ValueError(f"{hf_path} is already quantized; convert the original checkpoint, or dequantize first (-d)")
    if options.dequantize and not quantized:
        raise ValueError(f"{hf_path} is not quantized; there is nothing to dequantize")
    return source, config, model_spec(config)


def load_model(source: Path, spec: ModelSpec, dtype: str) -> nn.Module:
    return spec.model_class.from_pretrained(source, dtype=DTYPES[dtype])


def is_retrieval(spec: ModelSpec) -> bool:
    return spec.kind == RETRIEVAL


def target_config(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The source config with the stored precision."""
    config = copy.deepcopy(config)
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype
    return config


def dequantize(model: nn.Module, config: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    from mlx_lm.utils import dequantize_model

    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return dequantize_model(model), config
