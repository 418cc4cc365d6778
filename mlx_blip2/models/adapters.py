"""Fine-tuned adapters on a BLIP-2 / InstructBLIP model: LoRA on the language model, trained full modules.

An adapter is a directory::

    adapter_config.json    mlx-lm's fields (fine_tune_type, num_layers, lora_parameters: rank, scale, dropout,
                           keys), plus "trained" (the groups trained) and "base_model" (what it was trained on)
    adapters.safetensors   LoRA weights (lora_a, lora_b), keyed inside the language model as mlx-lm keys them
    modules.safetensors    trained full modules (query_tokens, qformer.*, language_projection.*, vision_model.*)

LoRA layers are mlx-lm's (``mlx_lm.tuner.lora.LoRALinear``), on the attention projections of the last
``num_layers`` blocks of each language-model stack. ``keys`` are module paths inside a block, as in mlx-lm.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

CONFIG_FILE = "adapter_config.json"
LORA_FILE = "adapters.safetensors"
MODULES_FILE = "modules.safetensors"
# PEFT's choice for BLIP-2 (q and v projections); T5 also has them in its cross-attention.
DEFAULT_LORA_KEYS = {
    "opt": ["self_attn.q_proj", "self_attn.v_proj"],
    "llama": ["self_attn.q_proj", "self_attn.v_proj"],
    "t5": ["layer.0.SelfAttention.q", "layer.0.SelfAttention.v", "layer.1.EncDecAttention.q",
           "layer.1.EncDecAttention.v"],
}
PROBE_SIZE = 16  # values of query_tokens recorded to tell one base checkpoint from another


class AdapterError(ValueError):
    """An adapter directory that is missing, malformed, or made for another base model."""


def block_stacks(language_model: nn.Module) -> list[list[nn.Module]]:
    """The language model's stacks of blocks: one for decoder-only models, encoder and decoder for T5."""
    if "encoder" in language_model and "decoder" in language_model:
        return [language_model.encoder.block, language_model.decoder.block]
    return [language_model.layers]


def apply_lora(model: nn.Module, rank: int = 16, scale: float = 2.0, dropout: float = 0.0,
               keys: list[str] | None = None, num_layers: int | None = None) -> dict:
    """Swap the language model's attention projections for LoRA layers; returns mlx-lm's config fields."""
    text_type = model.config.text_config.model_type
    keys = list(keys or DEFAULT_LORA_KEYS[text_type])
    stacks = block_stacks(model.language_model)
    depth = max(len(s) for s in stacks)
    num_layers = depth if num_layers is None or num_layers < 0 else min(num_layers, depth)
    found = set()
    for stack in stacks:
        for block in stack[len(stack) - num_layers:]:
            modules = dict(block.named_modules())
            swapped = [(k, LoRALinear.from_base(modules[k], r=rank, dropout=dropout, scale=scale))
                       for k in keys if k in modules]
            found.update(k for k, _ in swapped)
            if swapped:
                block.update_modules(tree_unflatten(swapped))
    missing = sorted(set(keys) - found)
    if missing:
        raise AdapterError(f"LoRA keys not found in the {text_type} language model's blocks: {', '.join(missing)}")
    return {"fine_tune_type": "lora", "num_layers": num_layers,
            "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": keys}}


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(k, m) for k, m in model.named_modules() if isinstance(m, LoRALinear)]


def fuse_lora(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold every LoRA layer into its base layer (requantized if it was quantized, unless ``dequantize``)."""
    fused = [(k, m.fuse(dequantize=dequantize)) for k, m in lora_layers(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def base_model_record(model: nn.Module) -> dict:
    """What an adapter must be applied to: the architecture, and a probe of the base model's query tokens."""
    config = model.config
    text = config.text_config
    return {
        "model_type": config.model_type,
        "text_model_type": text.model_type,
        "vision_hidden_size": config.vision_config.hidden_size,
        "vision_layers": config.vision_config.num_hidden_layers,
        "qformer_hidden_size": config.qformer_config.hidden_size,
        "num_query_tokens": config.num_query_tokens,
        "text_hidden_size": text.hidden_size,
        "text_layers": text.num_hidden_layers,
        "vocab_size": text.vocab_size,
        "image_token_index": config.image_token_index,
        "query_tokens_probe": np.array(model.query_tokens.reshape(-1)[:PROBE_SIZE].astype(mx.float32)).tolist(),
        "checkpoint": str(getattr(model, "checkpoint_dir", "")),
    }


def check_base_model(model: nn.Module, record: dict, adapter_dir: Path) -> None:
    """Raise :class:`AdapterError` when ``model`` is not the base the adapter was trained on."""
    ours = base_model_record(model)
    trained_on = record.get("checkpoint") or "another model"
    for key, value in record.items():
        if key in ("checkpoint", "query_tokens_probe"):
            continue
        if ours.get(key) != value:
            raise AdapterError(f"{adapter_dir}: adapter trained on {trained_on} ({key}={value!r}); this model has "
                               f"{key}={ours.get(key)!r}")
    probe = np.array(record.get("query_tokens_probe", []), dtype=np.float32)
    here = np.array(ours["query_tokens_probe"][:probe.size], dtype=np.float32)
    # bfloat16/float16 copies of the same base differ by rounding only.
    if probe.size and not np.allclose(here, probe, rtol=1e-2, atol=1e-3):
        raise AdapterError(f"{adapter_dir}: adapter trained on {trained_on}, whose query tokens differ from this "
                           "model's: load it onto the base checkpoint it was trained from")


def read_adapter_config(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{adapter_dir}: not an adapter directory (no {CONFIG_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return config


def _read_weights(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises bare RuntimeErrors for truncated or foreign files
        raise AdapterError(f"{path}: unreadable safetensors file ({e})") from None


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply a trained adapter to a loaded base model in place (LoRA layers, then trained module weights)."""
    adapter_dir = Path(adapter_dir).expanduser()
    config = read_adapter_config(adapter_dir)
    check_base_model(model, config.get("base_model", {}), adapter_dir)
    weights = []
    if config.get("lora_parameters"):
        p = config["lora_parameters"]
        apply_lora(model, rank=p["rank"], scale=p["scale"], dropout=0.0, keys=p.get("keys"),
                   num_layers=config.get("num_layers"))
        weights += [(f"language_model.{k}", v) for k, v in _read_weights(adapter_dir / LORA_FILE).items()]
    if (adapter_dir / MODULES_FILE).exists():
        weights += list(_read_weights(adapter_dir / MODULES_FILE).items())
    params = dict(tree_flatten(model.parameters()))
    for k, v in weights:
        if k not in params:
            raise AdapterError(f"{adapter_dir}: weight {k} has no place in this model")
        if params[k].shape != v.shape:
            raise AdapterError(f"{adapter_dir}: weight {k} has shape {tuple(v.shape)}, the model's is "
                               f"{tuple(params[k].shape)}")
        if params[k].dtype != v.dtype and mx.issubdtype(params[k].dtype, mx.floating):
            v = v.astype(params[k].dtype)
        params[k] = v
    model.update(tree_unflatten([(k, params[k]) for k, _ in weights]))
    mx.eval(model.parameters())
    model.adapter_dir = adapter_dir
    return model


def fuse_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """The model with the adapter's trained modules loaded and its LoRA layers folded into their base layers (a
    quantized base layer is requantized): a plain checkpoint's model again."""
    load_adapter(model, adapter_dir)
    fuse_lora(model)
    del model.adapter_dir
    return model
