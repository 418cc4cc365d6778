"""BLIP-2: image -> ViT-g -> Q-Former -> projection -> language model (transformers' ``Blip2*`` classes).

Two checkpoint generations exist. Current Hub checkpoints set ``image_token_index``: the prompt holds
``num_query_tokens`` ``<image>`` tokens whose embeddings are replaced by the projected query outputs. Older ones do
not: the projected queries are prepended to the prompt embeddings, and the logits cover the whole sequence.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .base import (BaseConfig, BaseModelOutputWithPooling, BaseModelOutputWithPoolingAndCrossAttentions,
                   ConfigError, as_array, check_pixel_values)
from .loading import load_safetensors, load_weights, resolve_checkpoint
from .loss import causal_lm_loss, seq2seq_loss, shift_tokens_right
from .opt import OPTConfig, OPTForCausalLM
from .qformer import Blip2QFormerConfig, Blip2QFormerModel
from .t5 import T5Config, T5ForConditionalGeneration
from .vision import Blip2VisionConfig, Blip2VisionModel

LANGUAGE_MODELS = {"opt": OPTForCausalLM, "t5": T5ForConditionalGeneration}
TEXT_CONFIGS = {"opt": OPTConfig, "t5": T5Config}


@dataclass
class Blip2Config(BaseConfig):
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
        if cls is Blip2Config and params.get("model_type") == "instructblip":
            raise ConfigError(f"{source} is an InstructBLIP checkpoint: load it with mlx_blip2.load() or "
                              "InstructBlipForConditionalGeneration.from_pretrained()")
        text = params.get("text_config")
        if not require_text_config and not isinstance(text, dict):
            text = {"model_type": "opt"}
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: missing required key 'text_config' (the language model's configuration)")
        text_type = text.get("model_type", "opt")
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



@dataclass
class CausalLMOutput:
    logits: mx.array


@dataclass
class Blip2ForConditionalGenerationModelOutput:
    logits: mx.array
    vision_outputs: BaseModelOutputWithPooling | None = None
    qformer_outputs: BaseModelOutputWithPoolingAndCrossAttentions | None = None
    language_model_outputs: Any = None
    loss: mx.array | None = None  # with ``labels``: the language-modelling loss (see models/loss.py)


class Blip2Model(nn.Module):
    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = mx.zeros((1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.language_model = LANGUAGE_MODELS[config.text_config.model_type](config.text_config)

    # --- the image path -------------------------------------------------------------------------------------------

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False) -> BaseModelOutputWithPooling:
        pixel_values = check_pixel_values(pixel_values, self.config.vision_config.num_channels)
        return self.vision_model(pixel_values, interpolate_pos_encoding)

    def get_qformer_features(self, pixel_values, interpolate_pos_encoding: bool = False):
        image_embeds = self.get_image_features(pixel_values, interpolate_pos_encoding).last_hidden_state
        return self._qformer(image_embeds)

    def _qformer(self, image_embeds: mx.array) -> BaseModelOutputWithPoolingAndCrossAttentions:
        queries = mx.broadcast_to(self.query_tokens, (image_embeds.shape[0], *self.query_tokens.shape[1:]))
        return self.qformer(queries, encoder_hidden_states=image_embeds)

    def encode_images(self, pixel_values, interpolate_pos_encoding: bool = False) -> mx.array:
        """Projected query outputs, the language model's view of each image: (B, num_query_tokens, hidden)."""
        image_embeds = self.get_image_features(pixel_values, interpolate_pos_encoding).last_hidden_state
        return self.encode_image_features(image_embeds)

    def encode_image_features(self, image_embeds: mx.array) -> mx.array:
        """:meth:`encode_images` from the ViT's output (B, P, C): lets another model's Q-Former share one ViT pass."""
        query_output = self._qformer(image_embeds).last_hidden_state.astype(image_embeds.dtype)
        return self.language_projection(query_output)

    # --- joining image and text ----------------------------------------------------------------------------------

    def default_input_ids(self, batch_size: int) -> mx.array:
        """The prompt transformers generates from when none is given: (image tokens,) BOS."""
        ids = [self.config.text_config.bos_token_id]
        if self.config.image_token_index is not None:
            ids = [self.config.image_token_index] * self.config.num_query_tokens + ids
        return mx.broadcast_to(mx.array([ids]), (batch_size, len(ids)))

    def merge_image_features(self, image_features: mx.array, input_ids, attention_mask=None):
        """Language-model input embeddings and attention mask for a prompt and its images' features."""
        B, Q, _ = image_features.shape
        input_ids = self.default_input_ids(B) if input_ids is None else as_array(input_ids, "input_ids", 2, mx.int32)
        if input_ids.shape[0] != B:
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows but there are {B} images")
        if attention_mask is None:
            attention_mask = mx.ones(input_ids.shape, dtype=mx.int32)
        attention_mask = as_array(attention_mask, "attention_mask", 2, mx.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids {input_ids.shape}")
        embeds = self.language_model.get_input_embeddings()(input_ids)
        image_features = image_features.astype(embeds.dtype)
        if self.config.image_token_index is None:
            embeds = mx.concatenate([image_features, embeds], axis=1)
            attention_mask = mx.concatenate([mx.ones((B, Q), dtype=mx.int32), attention_mask], axis=1)
            return embeds, attention_mask
        is_image = input_ids == self.config.image_token_index
        counts = is_image.sum(axis=1).tolist()
        if any(c != Q for c in counts):
            raise ValueError(
                f"each prompt must hold {Q} <image> tokens (id {self.config.image_token_index}), found {counts}; "
                "build input_ids with Blip2Processor and images"
            )
        # The k-th <image> token of a row takes the k-th query output of that row's image.
        slot = mx.maximum(mx.cumsum(is_image.astype(mx.int32), axis=1) - 1, 0)
        gathered = mx.take_along_axis(image_features, slot[..., None], axis=1)
        return mx.where(is_image[..., None], gathered, embeds), attention_mask

    # --- forward passes ------------------------------------------------------------------------------------------

    def _language_model(self, decoder_input_ids, decoder_attention_mask, labels=None, **inputs) -> mx.array:
        if self.config.use_decoder_only_language_model:
            return self.language_model(**inputs)
        if decoder_input_ids is None and labels is not None:
            text = self.config.text_config  # as T5 with labels: the decoder reads them shifted right
            labels = as_array(labels, "labels", 2, mx.int32)
            decoder_input_ids = shift_tokens_right(labels, text.decoder_start_token_id, text.pad_token_id)
        return self.language_model(
            **inputs,
            decoder_input_ids=as_array(decoder_input_ids, "decoder_input_ids", 2, mx.int32),
            decoder_attention_mask=as_array(decoder_attention_mask, "decoder_attention_mask", 2, mx.int32),
        )

    def get_text_features(self, input_ids, attention_mask=None, decoder_input_ids=None,
                          decoder_attention_mask=None) -> CausalLMOutput:
        """The language model alone on text (T5 needs ``decoder_input_ids``), as transformers 4.45 returned it."""
        input_ids = as_array(input_ids, "input_ids", 2, mx.int32)
        mask = None if attention_mask is None else as_array(attention_mask, "attention_mask", 2, mx.int32)
        return CausalLMOutput(self._language_model(decoder_input_ids, decoder_attention_mask, input_ids=input_ids,
                                                   attention_mask=mask))

    def __call__(self, pixel_values, input_ids, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None, interpolate_pos_encoding: bool = False, labels=None):
        """Logits over the prompt (decoder-only; legacy checkpoints: queries + prompt) or over
        ``decoder_input_ids`` (T5); with ``labels`` (-100 ignored) also ``.loss``, as transformers computes it."""
        vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding)
        image_embeds = vision_outputs.last_hidden_state
        qformer_outputs = self._qformer(image_embeds)
        image_features = self.language_projection(qformer_outputs.last_hidden_state.astype(image_embeds.dtype))
        embeds, mask = self.merge_image_features(image_features, input_ids, attention_mask)
        logits = self._language_model(decoder_input_ids, decoder_attention_mask, labels, inputs_embeds=embeds,
                                      attention_mask=mask)
        return Blip2ForConditionalGenerationModelOutput(
            logits=logits,
            vision_outputs=vision_outputs,
            qformer_outputs=qformer_outputs,
            language_model_outputs=CausalLMOutput(logits),
            loss=self.language_model_loss(logits, labels),
        )

    def language_model_loss(self, logits: mx.array, labels) -> mx.array | None:
        """Decoder-only: shifted next-token loss over the labels' (last) positions; T5: the labels in place."""
        if labels is None:
            return None
        labels = as_array(labels, "labels", 2, mx.int32)
        if self.config.use_decoder_only_language_model:
            return causal_lm_loss(logits, labels)
        return seq2seq_loss(logits, labels)

    # --- weights -------------------------------------------------------------------------------------------------

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = Blip2VisionModel.sanitize(weights)
        lm = {k[len("language_model."):]: v for k, v in weights.items() if k.startswith("language_model.")}
        rest = {k: v for k, v in weights.items() if not k.startswith("language_model.")}
        rest.update({f"language_model.{k}": v for k, v in self.language_model.sanitize(lm).items()})
        return rest

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, dtype: mx.Dtype | None = None):
        """Load a Hub checkpoint or a converted one, from a local directory or a Hub repo id.

        ``dtype`` defaults to float32 on the CPU (its fast path) and float16 on a GPU. The Q-Former and the query
        tokens stay in float32, as in transformers.
        """
        directory = resolve_checkpoint(path_or_repo_id)
        model = cls(Blip2Config.from_file(directory / "config.json"))
        return load_weights(model, directory, model.sanitize(load_safetensors(directory)), dtype)
