"""Configuration dataclasses read from a Hub ``config.json``.

Hub configs are sparse (``Salesforce/blip2-opt-2.7b`` lists almost nothing under ``vision_config``), so every field
defaults to transformers' default. Unknown keys are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A config.json that cannot describe a BLIP-2 model."""


class _FromDict:
    @classmethod
    def from_dict(cls, params: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Blip2VisionConfig(_FromDict):
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


@dataclass
class Blip2QFormerConfig(_FromDict):
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


@dataclass
class OPTConfig(_FromDict):
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


TEXT_CONFIGS = {"opt": OPTConfig}


@dataclass
class Blip2Config(_FromDict):
    vision_config: Blip2VisionConfig = field(default_factory=Blip2VisionConfig)
    qformer_config: Blip2QFormerConfig = field(default_factory=Blip2QFormerConfig)
    text_config: Any = field(default_factory=OPTConfig)
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_index: Optional[int] = None
    model_type: str = "blip-2"
    quantization: Optional[dict] = None

    @classmethod
    def from_dict(cls, params: dict[str, Any], source: str = "config.json",
                  require_text_config: bool = True) -> "Blip2Config":
        """``require_text_config=False`` for retrieval checkpoints, which have no language model."""
        params = dict(params)
        text = params.get("text_config")
        if not require_text_config and not isinstance(text, dict):
            text = {"model_type": "opt"}
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: missing required key 'text_config' (the language model's configuration)")
        text_type = text.get("model_type", "opt")
        if text_type == "t5" and "t5" not in TEXT_CONFIGS:
            from .t5 import T5Config  # t5.py builds on this module

            TEXT_CONFIGS["t5"] = T5Config
        if text_type not in TEXT_CONFIGS:
            raise ConfigError(
                f"{source}: text_config.model_type={text_type!r} is not supported (supported: opt, t5)"
            )
        params["text_config"] = TEXT_CONFIGS[text_type].from_dict(text)
        params["vision_config"] = Blip2VisionConfig.from_dict(params.get("vision_config") or {})
        qformer = dict(params.get("qformer_config") or {})
        # transformers overrides the Q-Former's cross-attention width with the vision width.
        qformer["encoder_hidden_size"] = params["vision_config"].hidden_size
        params["qformer_config"] = Blip2QFormerConfig.from_dict(qformer)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    @classmethod
    def from_file(cls, path: str | Path, require_text_config: bool = True) -> "Blip2Config":
        path = Path(path)
        try:
            params = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(params, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(params, source=str(path), require_text_config=require_text_config)

    @property
    def use_decoder_only_language_model(self) -> bool:
        return not getattr(self.text_config, "is_encoder_decoder", False)
