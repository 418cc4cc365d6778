"""InstructBLIP: BLIP-2 whose Q-Former also reads the instruction (transformers' ``InstructBlip*`` classes).

The learned queries are concatenated with the instruction's Q-Former tokens (word + position embeddings, then one
LayerNorm over both); the attention mask covers both, only the queries cross-attend to the image, and only the
query outputs are projected into the language model. Everything else is BLIP-2's: the ViT, the Q-Former layers
(with their text feed-forward blocks), the projection, and the two checkpoint generations (``image_token_index``:
the projected queries fill the ``<image>`` slots; without it, as in older Hub revisions, they are prepended).

Language models: Vicuna (LLaMA, run by mlx-lm; see :mod:`.llama`), Flan-T5 (:mod:`.t5`) and OPT (:mod:`.opt`).

One deliberate difference: transformers keeps only ``query_tokens`` in float32 for InstructBLIP
(``_keep_in_fp32_modules``); the shared loader keeps the whole Q-Former in float32, as for BLIP-2. In float32 (the
CPU default) the two are identical; in half precision ours is the closer to the float32 reference.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelOutputWithPoolingAndCrossAttentions, ConfigError, additive_mask, as_array
from .blip2 import Blip2Config, Blip2ForConditionalGenerationModelOutput, Blip2Model
from .blip2 import CausalLMOutput
from .llama import LlamaConfig, LlamaForCausalLM
from .loading import load_safetensors, load_weights, resolve_checkpoint
from .opt import OPTConfig, OPTForCausalLM
from .qformer import Blip2QFormerConfig, Blip2QFormerEncoder
from .t5 import T5Config, T5ForConditionalGeneration
from .vision import Blip2VisionConfig, Blip2VisionModel

LANGUAGE_MODELS = {"llama": (LlamaConfig, LlamaForCausalLM), "t5": (T5Config, T5ForConditionalGeneration),
                   "opt": (OPTConfig, OPTForCausalLM)}


@dataclass
class InstructBlipConfig(Blip2Config):
    text_config: Any = field(default_factory=LlamaConfig)
    model_type: str = "instructblip"

    @classmethod
    def from_dict(cls, params: dict[str, Any], source: str = "config.json",
                  require_text_config: bool = True) -> "InstructBlipConfig":
        params = dict(params)
        if params.get("model_type", "instructblip") != "instructblip":
            raise ConfigError(f"{source}: model_type is {params['model_type']!r}; expected an InstructBLIP "
                              "checkpoint ('instructblip')")
        text = params.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: missing required key 'text_config' (the language model's configuration)")
        text_type = text.get("model_type", "opt")
        if text_type not in LANGUAGE_MODELS:
            raise ConfigError(f"{source}: text_config.model_type={text_type!r} is not supported "
                              f"(supported: {', '.join(LANGUAGE_MODELS)})")
        params["text_config"] = LANGUAGE_MODELS[text_type][0].from_dict(text)
        params["vision_config"] = Blip2VisionConfig.from_dict(params.get("vision_config") or {})
        qformer = dict(params.get("qformer_config") or {})
        # As in transformers: cross-attention reads the vision width; every layer has the text feed-forward.
        qformer.update(encoder_hidden_size=params["vision_config"].hidden_size, use_qformer_text_input=True)
        params["qformer_config"] = Blip2QFormerConfig.from_dict(qformer)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})


class InstructBlipQFormerEmbeddings(nn.Module):
    """Instruction tokens: word + absolute position embeddings (positions 0.. whatever the padding), after the
    queries; one LayerNorm over the whole sequence."""

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, input_ids: mx.array | None, query_embeds: mx.array | None) -> mx.array:
        if input_ids is None:
            x = query_embeds
        else:
            x = self.word_embeddings(input_ids) + self.position_embeddings(mx.arange(input_ids.shape[1]))
            if query_embeds is not None:
                x = mx.concatenate([query_embeds.astype(x.dtype), x], axis=1)
        return self.layernorm(x.astype(self.layernorm.weight.dtype))


class InstructBlipQFormerModel(nn.Module):
    """transformers' ``InstructBlipQFormerModel``: BLIP-2's Q-Former layers over queries + instruction tokens."""

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.config = config
        self.embeddings = InstructBlipQFormerEmbeddings(config)
        self.encoder = Blip2QFormerEncoder(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def __call__(self, input_ids=None, attention_mask=None, query_embeds=None, encoder_hidden_states=None,
                 encoder_attention_mask=None) -> BaseModelOutputWithPoolingAndCrossAttentions:
        if input_ids is None and query_embeds is None:
            raise ValueError("pass query_embeds, input_ids or both")
        query_length = 0 if query_embeds is None else query_embeds.shape[1]
        x = self.embeddings(input_ids, query_embeds)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.astype(x.dtype)
        x = self.encoder(x, additive_mask(attention_mask, x.dtype), encoder_hidden_states,
                         additive_mask(encoder_attention_mask, x.dtype), query_length)
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=x, pooler_output=x[:, 0])


class InstructBlipModel(Blip2Model):
    """InstructBLIP's network: BLIP-2's, with the instruction read by the Q-Former too (``generate`` is added by
    :class:`mlx_blip2.InstructBlipForConditionalGeneration`)."""

    # The Q-Former reads the instruction, so an image's features depend on the prompt (the engine encodes each
    # (image, prompt) pair instead of each image).
    features_depend_on_prompt = True

    def __init__(self, config: InstructBlipConfig):
        nn.Module.__init__(self)  # Blip2Model's constructor builds BLIP-2's Q-Former and language models
        self.config = config
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = mx.zeros((1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = InstructBlipQFormerModel(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.language_model = LANGUAGE_MODELS[config.text_config.model_type][1](config.text_config)

    # --- the image path, read with the instruction ---------------------------------------------------------------

    def _qformer(self, image_embeds: mx.array, qformer_input_ids=None, qformer_attention_mask=None):
        B = image_embeds.shape[0]
        queries = mx.broadcast_to(self.query_tokens, (B, *self.query_tokens.shape[1:]))
        if qformer_input_ids is None:  # no instruction: the queries alone (transformers requires one)
            return self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds)
        ids = as_array(qformer_input_ids, "qformer_input_ids", 2, mx.int32)
        if ids.shape[0] != B:
            raise ValueError(f"qformer_input_ids has {ids.shape[0]} rows but there are {B} images")
        mask = mx.ones(ids.shape, mx.int32) if qformer_attention_mask is None else \
            as_array(qformer_attention_mask, "qformer_attention_mask", 2, mx.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"qformer_attention_mask shape {mask.shape} differs from qformer_input_ids {ids.shape}")
        mask = mx.concatenate([mx.ones(queries.shape[:2], mx.int32), mask], axis=1)
        return self.qformer(ids, mask, queries, encoder_hidden_states=image_embeds)

    def get_qformer_features(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None,
                             interpolate_pos_encoding: bool = False):
        """The Q-Former's output over queries and instruction tokens: (B, Q + T, hidden)."""
        image_embeds = self.get_image_features(pixel_values, interpolate_pos_encoding).last_hidden_state
        return self._qformer(image_embeds, qformer_input_ids, qformer_attention_mask)

    def _project(self, qformer_outputs, dtype) -> mx.array:
        Q = self.config.num_query_tokens
        return self.language_projection(qformer_outputs.last_hidden_state[:, :Q].astype(dtype))

    def encode_images(self, pixel_values, interpolate_pos_encoding: bool = False, qformer_input_ids=None,
                      qformer_attention_mask=None) -> mx.array:
        """Projected query outputs (B, num_query_tokens, hidden) of images read with their instructions."""
        image_embeds = self.get_image_features(pixel_values, interpolate_pos_encoding).last_hidden_state
        outputs = self._qformer(image_embeds, qformer_input_ids, qformer_attention_mask)
        return self._project(outputs, image_embeds.dtype)

    # --- forward passes ------------------------------------------------------------------------------------------

    def __call__(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None, input_ids=None,
                 attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 interpolate_pos_encoding: bool = False, labels=None):
        """Logits over the prompt (decoder-only; legacy checkpoints: queries + prompt) or over
        ``decoder_input_ids`` (T5); with ``labels`` also ``.loss``, as transformers computes it."""
        vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding)
        image_embeds = vision_outputs.last_hidden_state
        qformer_outputs = self._qformer(image_embeds, qformer_input_ids, qformer_attention_mask)
        image_features = self._project(qformer_outputs, image_embeds.dtype)
        embeds, mask = self.merge_image_features(image_features, input_ids, attention_mask)
        inputs = dict(inputs_embeds=embeds, attention_mask=mask)
        if isinstance(self.language_model, LlamaForCausalLM):
            # transformers' LLaMA forward numbers positions 0..S-1 whatever the padding (generate does not).
            inputs["position_ids"] = mx.broadcast_to(mx.arange(embeds.shape[1])[None], embeds.shape[:2])
        logits = self._language_model(decoder_input_ids, decoder_attention_mask, labels, **inputs)
        return Blip2ForConditionalGenerationModelOutput(logits=logits, vision_outputs=vision_outputs,
                                                        qformer_outputs=qformer_outputs,
                                                        language_model_outputs=CausalLMOutput(logits),
                                                        loss=self.language_model_loss(logits, labels))

    # --- weights -------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, dtype: mx.Dtype | None = None):
        """Load a Hub InstructBLIP checkpoint or a converted one (local directory or Hub repo id).

        ``dtype`` defaults to float32 on the CPU and float16 on a GPU (bfloat16 for Flan-T5).
        """
        directory = resolve_checkpoint(path_or_repo_id)
        model = cls(InstructBlipConfig.from_file(directory / "config.json"))
        return load_weights(model, directory, model.sanitize(load_safetensors(directory)), dtype)
