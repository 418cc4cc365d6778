"""Image-text retrieval with the BLIP-2 Q-Former (transformers' ``Blip2ForImageTextRetrieval``,
``Blip2TextModelWithProjection`` and ``Blip2VisionModelWithProjection``); the pipeline on top of them is
:mod:`mlx_blip2.pipelines.retrieval`.

Two scores, as in the BLIP-2 paper and LAVIS:

- ITC (image-text contrastive): the Q-Former's query outputs for an image and its [CLS] output for a text, each
  projected and L2-normalised; the score is the largest cosine similarity over the queries (no temperature).
  Image and text are encoded separately, so image embeddings can be computed once and stored.
- ITM (image-text matching): queries and text go through the Q-Former together (the text attends to the queries,
  the queries to the image); a 2-class head on each query output, averaged over the queries. Slower, more exact.

``rank`` combines them as LAVIS evaluates retrieval: ITC over everything, then the top candidates re-scored with
ITM (final score = ITM "match" logit + ITC similarity).

Checkpoints with ``image_token_index`` get ``num_query_tokens`` <image> tokens in front of the text from the
processor when images are passed along; the model drops them (as transformers does). Older ones do not.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .base import (BaseModelOutputWithPooling, BaseModelOutputWithPoolingAndCrossAttentions, as_array,
                   check_pixel_values)
from .blip2 import Blip2Config
from .loading import load_safetensors, load_weights, resolve_checkpoint
from .qformer import Blip2QFormerConfig, Blip2QFormerModel
from .quant import compute_dtype
from .vision import Blip2VisionModel

DEFAULT_RETRIEVAL_MODEL = "Salesforce/blip2-itm-vit-g"


# --- outputs (transformers' names) -----------------------------------------------------------------------------


@dataclass
class Blip2ImageTextMatchingModelOutput:
    logits_per_image: mx.array
    logits_per_text: mx.array
    text_embeds: mx.array
    image_embeds: mx.array
    text_model_output: BaseModelOutputWithPoolingAndCrossAttentions | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None


@dataclass
class Blip2TextModelOutput:
    text_embeds: mx.array
    last_hidden_state: mx.array


@dataclass
class Blip2VisionModelOutput:
    image_embeds: mx.array
    last_hidden_state: mx.array


# --- configuration and weights ---------------------------------------------------------------------------------


def with_text_input(config: Blip2QFormerConfig) -> Blip2QFormerConfig:
    """The Q-Former with its text feed-forward blocks (``intermediate``/``output``). transformers takes
    ``use_qformer_text_input`` from the config, where the retrieval checkpoints set it; a model that runs text
    through the Q-Former cannot work without those blocks, so they are always built here."""
    return dataclasses.replace(config, use_qformer_text_input=True)


def _from_pretrained(cls, path_or_repo_id: str | os.PathLike, dtype: mx.Dtype | None = None):
    """Load the weights ``cls`` needs from a checkpoint directory or Hub repo id.

    Follows :meth:`mlx_blip2.Blip2Model.from_pretrained`: float32 on the CPU and float16 on a GPU by default, the
    Q-Former and query tokens kept in float32. Weights the class has no use for (the ITM head for the vision
    model, the ViT for the text model) are skipped, as transformers does, and never read from disk.
    """
    directory = resolve_checkpoint(path_or_repo_id)
    model = cls(Blip2Config.from_file(directory / "config.json", require_text_config=False))
    return load_weights(model, directory, Blip2VisionModel.sanitize(load_safetensors(directory)), dtype,
                        drop_unused=True)


def normalize(x: mx.array, eps: float = 1e-12) -> mx.array:
    """L2-normalise the last axis (torch's F.normalize)."""
    norm = mx.sqrt(mx.sum(x.astype(mx.float32) ** 2, axis=-1, keepdims=True))
    return (x / mx.maximum(norm, eps).astype(x.dtype)).astype(x.dtype)


# --- modules -----------------------------------------------------------------------------------------------------


class Blip2TextEmbeddings(nn.Module):
    """Word + absolute position embeddings for the Q-Former's text, optionally after the query tokens.

    No LayerNorm here: the Q-Former's own ``layernorm`` normalises queries and text together.
    """

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids: mx.array | None = None, position_ids: mx.array | None = None,
                 query_embeds: mx.array | None = None) -> mx.array:
        if input_ids is None:
            return query_embeds
        T = input_ids.shape[1]
        if T > self.position_embeddings.weight.shape[0]:
            raise ValueError(f"text of {T} tokens is longer than the Q-Former's "
                             f"{self.position_embeddings.weight.shape[0]} positions; truncate it")
        if position_ids is None:
            position_ids = mx.arange(T)[None]
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if query_embeds is not None:
            # The query tokens are float32; transformers casts them to the embeddings' dtype before joining.
            embeddings = mx.concatenate([query_embeds.astype(embeddings.dtype), embeddings], axis=1)
        return embeddings


class _QFormerImageSide:
    """Image -> ViT -> query outputs -> projected, normalised embeddings (needs vision_model, query_tokens,
    qformer, vision_projection)."""

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False) -> BaseModelOutputWithPooling:
        pixel_values = check_pixel_values(pixel_values, self.config.vision_config.num_channels)
        return self.vision_model(pixel_values, interpolate_pos_encoding)

    def _query_outputs(self, image_features: mx.array) -> BaseModelOutputWithPoolingAndCrossAttentions:
        queries = mx.broadcast_to(self.query_tokens, (image_features.shape[0], *self.query_tokens.shape[1:]))
        return self.qformer(queries, encoder_hidden_states=image_features)

    def image_embeds_from_features(self, image_features: mx.array) -> mx.array:
        """ViT features (B, P, C) -> normalised projected query outputs (B, num_query_tokens, embed_dim)."""
        query_output = self._query_outputs(image_features).last_hidden_state
        return normalize(self.vision_projection(query_output.astype(compute_dtype(self.vision_projection))))

    def get_image_embeds(self, pixel_values, interpolate_pos_encoding: bool = False) -> mx.array:
        features = self.get_image_features(pixel_values, interpolate_pos_encoding).last_hidden_state
        return self.image_embeds_from_features(features)


class _QFormerTextSide:
    """Text -> Q-Former (no image) -> projected, normalised outputs (needs embeddings, qformer, text_projection)."""

    def _text_outputs(self, input_ids, attention_mask=None, position_ids=None):
        input_ids = as_array(input_ids, "input_ids", 2, mx.int32)
        mask = None if attention_mask is None else as_array(attention_mask, "attention_mask", 2, mx.int32)
        if mask is not None and mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids {input_ids.shape}")
        embeds = self.embeddings(input_ids=input_ids, position_ids=position_ids)
        # The Q-Former runs in float32 whatever the model dtype.
        embeds = embeds.astype(self.qformer.layernorm.weight.dtype)
        return self.qformer(embeds, query_length=0, attention_mask=mask)

    def get_text_embeds(self, input_ids, attention_mask=None) -> mx.array:
        """Plain text ids ([CLS] first, no <image> tokens) -> normalised projected [CLS] outputs (B, embed_dim)."""
        cls = self._text_outputs(input_ids, attention_mask).last_hidden_state[:, 0]
        return normalize(self.text_projection(cls.astype(compute_dtype(self.text_projection))))


def itc_scores(image_embeds: mx.array, text_embeds: mx.array) -> mx.array:
    """(N, Q, D) image and (M, D) text embeddings -> (N, M): the best cosine similarity over the queries."""
    return (image_embeds @ text_embeds.T.astype(image_embeds.dtype)).max(axis=1)


class Blip2ForImageTextRetrieval(nn.Module, _QFormerImageSide, _QFormerTextSide):
    """BLIP-2's Q-Former with its retrieval heads: ITM (``use_image_text_matching_head=True``) and ITC."""

    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        qformer_config = with_text_input(config.qformer_config)
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = mx.zeros((1, config.num_query_tokens, qformer_config.hidden_size))
        self.embeddings = Blip2TextEmbeddings(qformer_config)
        self.qformer = Blip2QFormerModel(qformer_config)
        self.vision_projection = nn.Linear(qformer_config.hidden_size, config.image_text_hidden_size)
        self.text_projection = nn.Linear(qformer_config.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(qformer_config.hidden_size, 2)

    from_pretrained = classmethod(_from_pretrained)

    def _itm(self, image_features: mx.array, input_ids: mx.array, attention_mask: mx.array):
        """Queries + plain text ids through the Q-Former together; (logits (B, 2), Q-Former output)."""
        B = image_features.shape[0]
        queries = mx.broadcast_to(self.query_tokens, (B, *self.query_tokens.shape[1:]))
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        embeds = embeds.astype(self.qformer.layernorm.weight.dtype)
        out = self.qformer(embeds, query_length=queries.shape[1], attention_mask=attention_mask,
                           encoder_hidden_states=image_features)
        hidden = out.last_hidden_state.astype(compute_dtype(self.itm_head))
        logits = self.itm_head(hidden[:, : queries.shape[1]]).mean(axis=1)
        return logits, hidden, out

    def itm_logits(self, image_features: mx.array, input_ids, attention_mask=None) -> mx.array:
        """ITM logits (B, 2) [no match, match] for ViT features (B, P, C) and plain text ids (B, T) (no <image>
        tokens). One image's features may be paired with several texts: a batch of 1 is broadcast."""
        input_ids = as_array(input_ids, "input_ids", 2, mx.int32)
        B = input_ids.shape[0]
        if image_features.shape[0] == 1 and B > 1:
            image_features = mx.broadcast_to(image_features, (B, *image_features.shape[1:]))
        mask = mx.ones(input_ids.shape, mx.int32) if attention_mask is None else as_array(
            attention_mask, "attention_mask", 2, mx.int32)
        mask = mx.concatenate([mx.ones((B, self.config.num_query_tokens), mx.int32), mask], axis=1)
        return self._itm(image_features, input_ids, mask)[0]

    def __call__(self, pixel_values, input_ids, attention_mask=None, use_image_text_matching_head: bool = False,
                 interpolate_pos_encoding: bool = False) -> Blip2ImageTextMatchingModelOutput:
        """transformers' forward: ``input_ids``/``attention_mask`` as Blip2Processor makes them with images.

        ITM pairs image i with text i: logits (B, 2). ITC scores every image against every text:
        ``logits_per_image`` (images, texts), ``logits_per_text`` its transpose.
        """
        vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding)
        image_features = vision_outputs.last_hidden_state
        input_ids = as_array(input_ids, "input_ids", 2, mx.int32)
        if attention_mask is None:
            attention_mask = mx.ones(input_ids.shape, mx.int32)
        attention_mask = as_array(attention_mask, "attention_mask", 2, mx.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids {input_ids.shape}")
        Q = self.config.num_query_tokens
        if self.config.image_token_index is not None:
            if input_ids.shape[1] <= Q or not bool(mx.all(input_ids[:, :Q] == self.config.image_token_index)):
                raise ValueError(f"input_ids must start with {Q} <image> tokens (id {self.config.image_token_index});"
                                 " build them with Blip2Processor and images")
        if use_image_text_matching_head:
            B = image_features.shape[0]
            if input_ids.shape[0] != B:
                raise ValueError(f"ITM pairs image i with text i: got {B} images and {input_ids.shape[0]} texts")
            if self.config.image_token_index is not None:
                # The <image> placeholders stand where the queries go; their mask entries (ones) are kept for them.
                input_ids = input_ids[:, Q:]
            else:
                attention_mask = mx.concatenate([mx.ones((B, Q), mx.int32), attention_mask], axis=1)
            logits, text_embeds, text_outputs = self._itm(image_features, input_ids, attention_mask)
            return Blip2ImageTextMatchingModelOutput(
                logits_per_image=logits, logits_per_text=logits.T, text_embeds=text_embeds,
                image_embeds=image_features, text_model_output=text_outputs, vision_model_output=vision_outputs,
            )
        if self.config.image_token_index is not None:
            input_ids, attention_mask = input_ids[:, Q:], attention_mask[:, Q:]
        image_embeds = self.image_embeds_from_features(image_features)
        text_outputs = self._text_outputs(input_ids, attention_mask)
        cls = text_outputs.last_hidden_state[:, 0].astype(compute_dtype(self.text_projection))
        text_embeds = normalize(self.text_projection(cls))
        logits = itc_scores(image_embeds, text_embeds)
        return Blip2ImageTextMatchingModelOutput(
            logits_per_image=logits, logits_per_text=logits.T, text_embeds=text_embeds, image_embeds=image_embeds,
            text_model_output=text_outputs, vision_model_output=vision_outputs,
        )


class Blip2TextModelWithProjection(nn.Module, _QFormerTextSide):
    """Text -> normalised projected Q-Former outputs for every token; ``text_embeds[:, 0]`` is the ITC embedding."""

    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        qformer_config = with_text_input(config.qformer_config)
        self.query_tokens = mx.zeros((1, config.num_query_tokens, qformer_config.hidden_size))
        self.embeddings = Blip2TextEmbeddings(qformer_config)
        self.qformer = Blip2QFormerModel(qformer_config)
        self.text_projection = nn.Linear(qformer_config.hidden_size, config.image_text_hidden_size)

    from_pretrained = classmethod(_from_pretrained)

    def __call__(self, input_ids, attention_mask=None, position_ids=None) -> Blip2TextModelOutput:
        out = self._text_outputs(input_ids, attention_mask, position_ids)
        hidden = out.last_hidden_state.astype(compute_dtype(self.text_projection))
        return Blip2TextModelOutput(text_embeds=normalize(self.text_projection(hidden)),
                                    last_hidden_state=out.last_hidden_state)


class Blip2VisionModelWithProjection(nn.Module, _QFormerImageSide):
    """Image -> normalised projected query outputs (B, num_query_tokens, embed_dim): what the photo index stores."""

    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = mx.zeros((1, config.num_query_tokens, config.qformer_config.hidden_size))
        # Only the queries go through this Q-Former: the text feed-forward blocks are left out (and not loaded).
        self.qformer = Blip2QFormerModel(dataclasses.replace(config.qformer_config, use_qformer_text_input=False))
        self.vision_projection = nn.Linear(config.qformer_config.hidden_size, config.image_text_hidden_size)

    from_pretrained = classmethod(_from_pretrained)

    def __call__(self, pixel_values, interpolate_pos_encoding: bool = False) -> Blip2VisionModelOutput:
        vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding)
        image_embeds = self.image_embeds_from_features(vision_outputs.last_hidden_state)
        return Blip2VisionModelOutput(image_embeds=image_embeds, last_hidden_state=vision_outputs.last_hidden_state)
