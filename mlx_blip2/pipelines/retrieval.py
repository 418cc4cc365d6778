"""The retrieval pipeline: ITM probabilities, ITC similarities, embeddings and ranking over images and texts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..models.loading import resolve_checkpoint
from ..models.retrieval import (DEFAULT_RETRIEVAL_MODEL, Blip2ForImageTextRetrieval, Blip2TextModelWithProjection,
                                Blip2VisionModelWithProjection)
from ..processing import Blip2ImageProcessor, Blip2Processor

# --- the pipeline ------------------------------------------------------------------------------------------------


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """BERT ids for the Q-Former's text path: [CLS] text [SEP], padded on the right (the [CLS] output is the text
    embedding and positions count from 0, so left padding would change the results), truncated to the Q-Former's
    positions. No <image> tokens: those only exist in the processor's image+text inputs."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                        return_token_type_ids=False, return_attention_mask=True)
    finally:
        tokenizer.padding_side = side
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


@dataclass
class _ImageOnlyProcessor:
    image_processor: object
    tokenizer: None = None


@dataclass
class RankedImage:
    """One result of :meth:`Blip2RetrievalPipeline.rank`. ``score`` is ``itc`` alone, or ``itm_logit + itc`` for
    re-scored candidates (LAVIS's retrieval score); ``itm`` is the ITM match probability when re-scored."""

    index: int
    score: float
    itc: float
    itm: float | None = None
    itm_logit: float | None = None


class Blip2RetrievalPipeline:
    """A retrieval model (or one of its halves) with its processor.

    Built by :func:`mlx_blip2.load` for retrieval checkpoints. ``part`` says which model is loaded:
    ``"full"`` (Blip2ForImageTextRetrieval: everything), ``"vision"`` (Blip2VisionModelWithProjection: image
    embeddings only) or ``"text"`` (Blip2TextModelWithProjection: text embeddings only, no ViT weights read).
    """

    kind = "retrieval"

    def __init__(self, model, processor, batch_size: int = 8):
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.max_text_length = model.config.qformer_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, path_or_repo_id=DEFAULT_RETRIEVAL_MODEL, dtype: mx.Dtype | None = None,
                        part: str = "full", **kwargs) -> Blip2RetrievalPipeline:
        classes = {"full": Blip2ForImageTextRetrieval, "vision": Blip2VisionModelWithProjection,
                   "text": Blip2TextModelWithProjection}
        if part not in classes:
            raise ValueError(f"part must be one of {sorted(classes)}, got {part!r}")
        directory = resolve_checkpoint(path_or_repo_id)
        model = classes[part].from_pretrained(directory, dtype=dtype)
        if part == "vision":
            # Images only: skip the tokenizer, and with it the slow transformers import.
            processor = _ImageOnlyProcessor(Blip2ImageProcessor.from_pretrained(directory))
        else:
            processor = Blip2Processor.from_pretrained(directory)
        return cls(model, processor, **kwargs)

    def _need(self, method: str, what: str):
        if not hasattr(self.model, method):
            raise TypeError(f"{type(self.model).__name__} cannot compute {what}; load the full retrieval model")

    # --- encoders ----------------------------------------------------------------------------------------------

    def preprocess(self, image) -> np.ndarray:
        """One image (path, bytes, PIL image, array) -> float32 (C, H, W); thread-safe, so callers can decode the
        next images in threads while the model embeds (see ``embed_images(..., preprocessed=True)``)."""
        return self.processor.image_processor.preprocess(image)

    def _pixel_values(self, images, preprocessed: bool = False) -> np.ndarray:
        if preprocessed:
            return np.stack(list(images))
        return self.processor.image_processor(list(images))["pixel_values"]

    def image_features(self, images) -> mx.array:
        """ViT features of a list of images (paths, PIL images or arrays), for ITM."""
        self._need("get_image_features", "image features")
        out = [self.model.get_image_features(self._pixel_values(images[i:i + self.batch_size])).last_hidden_state
               for i in range(0, len(images), self.batch_size)]
        return mx.concatenate(out) if len(out) > 1 else out[0]

    def embed_images(self, images, preprocessed: bool = False) -> np.ndarray:
        """Normalised projected query outputs: (num_query_tokens, D) for one image, (N, num_query_tokens, D) for a
        list. These are what ITC compares (and what the photo index, the server and Ray store). ``preprocessed``:
        the images are (C, H, W) arrays from :meth:`preprocess`."""
        self._need("get_image_embeds", "image embeddings")
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        if not batch:
            raise ValueError("got an empty list of images")
        chunks = []
        for i in range(0, len(batch), self.batch_size):
            pixels = self._pixel_values(batch[i:i + self.batch_size], preprocessed)
            embeds = self.model.get_image_embeds(pixels)
            chunks.append(np.array(embeds.astype(mx.float32)))
        out = np.concatenate(chunks)
        return out[0] if single else out

    def _text_ids(self, texts: Sequence[str]):
        return tokenize_texts(self.processor.tokenizer, texts, self.max_text_length)

    def embed_texts(self, texts) -> np.ndarray:
        """Normalised projected [CLS] outputs: (D,) for one text, (M, D) for a list."""
        self._need("get_text_embeds", "text embeddings")
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        if not batch:
            raise ValueError("got an empty list of texts")
        chunks = []
        for i in range(0, len(batch), 64):
            ids, mask = self._text_ids(batch[i:i + 64])
            chunks.append(np.array(self.model.get_text_embeds(ids, mask).astype(mx.float32)))
        out = np.concatenate(chunks)
        return out[0] if single else out

    # --- scores ------------------------------------------------------------------------------------------------

    def similarity(self, images, texts) -> np.ndarray:
        """ITC similarity matrix (images, texts), always 2-D: the best cosine similarity over the queries."""
        images = images if isinstance(images, (list, tuple)) else [images]
        texts = [texts] if isinstance(texts, str) else list(texts)
        image_embeds, text_embeds = self.embed_images(list(images)), self.embed_texts(texts)
        return (image_embeds @ text_embeds.T).max(axis=1)

    def itm_scores(self, image_features: mx.array, texts: list[str], chunk: int = 32):
        """ITM "match" logits and probabilities for features (1 or len(texts), P, C) against texts."""
        self._need("itm_logits", "ITM scores")
        logits = []
        for i in range(0, len(texts), chunk):
            ids, mask = self._text_ids(texts[i:i + chunk])
            feats = image_features if image_features.shape[0] == 1 else image_features[i:i + chunk]
            logits.append(np.array(self.model.itm_logits(feats, ids, mask).astype(mx.float32)))
        logits = np.concatenate(logits)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return logits[:, 1], (shifted / shifted.sum(axis=1, keepdims=True))[:, 1]

    def match(self, image, texts) -> float | np.ndarray:
        """ITM probability that ``image`` shows each text: a float for one text, an array for a list.
        The image is encoded once for all the texts."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        if not batch:
            raise ValueError("got an empty list of texts")
        _, probs = self.itm_scores(self.image_features([image]), batch)
        return float(probs[0]) if single else probs

    def rerank(self, query: str, images, itc: Sequence[float]) -> list[RankedImage]:
        """Re-score candidate images for a text with ITM, best first (LAVIS: ITM match logit + ITC similarity)."""
        images = list(images)
        results = []
        for i in range(0, len(images), self.batch_size):
            feats = self.image_features(images[i:i + self.batch_size])
            logit, prob = self.itm_scores(feats, [query] * feats.shape[0])
            for j in range(feats.shape[0]):
                s = float(itc[i + j])
                results.append(RankedImage(i + j, float(logit[j]) + s, s, float(prob[j]), float(logit[j])))
        return sorted(results, key=lambda r: -r.score)

    def rank(self, query: str, images, top_k: int = 10, rerank: bool = True,
             candidates: int | None = None) -> list[RankedImage]:
        """Rank ``images`` for a text ``query``, best first; at most ``top_k`` results.

        ITC scores every image; with ``rerank`` the best ``candidates`` (default ``top_k``) are re-scored with ITM,
        whose pass needs the ViT features again (they are not kept, so memory stays flat for long lists).
        """
        if not isinstance(query, str):
            raise TypeError("query must be a str")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images or top_k <= 0:
            return []
        itc = self.embed_images(images) @ self.embed_texts(query)  # (N, Q)
        itc = itc.max(axis=1)
        n = min(len(images), max(top_k, candidates or 0))
        order = np.argsort(-itc, kind="stable")[:n]
        if not rerank:
            return [RankedImage(int(i), float(itc[i]), float(itc[i])) for i in order[:top_k]]
        reranked = self.rerank(query, [images[i] for i in order], itc[order])
        for r in reranked:
            r.index = int(order[r.index])
        return reranked[:top_k]


def load_retrieval(path_or_repo_id=DEFAULT_RETRIEVAL_MODEL, dtype: mx.Dtype | None = None,
                   part: str = "full") -> Blip2RetrievalPipeline:
    """The retrieval pipeline for a checkpoint (see :class:`Blip2RetrievalPipeline`)."""
    return Blip2RetrievalPipeline.from_pretrained(path_or_repo_id, dtype=dtype, part=part)
