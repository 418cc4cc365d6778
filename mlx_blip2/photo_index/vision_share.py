"""Whether a captioning model and a retrieval model can share one ViT pass: their vision encoders are equal by
content, checked when they are loaded.

BLIP-2 keeps its image encoder frozen in both training stages, so Salesforce's captioning and retrieval checkpoints
carry the same ViT-g weights. The digest covers the vision config and every vision tensor (name, dtype, shape and
bytes, SHA-256), as the models hold them after loading: a model loaded in another dtype or with its ViT quantized
has another digest, and then each model runs its own ViT.

When the encoders are equal the retrieval model is given the captioning model's ViT (the same object), so that one
copy of the ViT-g (4 GB in float32) is in memory: the retrieval model's own is hashed and dropped before the
captioning model is loaded, and loaded again only when the two differ.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np


def vision_digest(model) -> str:
    """SHA-256 of a model's vision encoder: its config and every parameter of ``model.vision_model``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    h = hashlib.sha256()
    h.update(json.dumps(model.config.vision_config.to_dict(), sort_keys=True, default=str).encode())
    for name, value in sorted(tree_flatten(model.vision_model.parameters()), key=lambda kv: kv[0]):
        h.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        data = value.view(mx.uint16) if value.dtype == mx.bfloat16 else value  # numpy has no bfloat16
        h.update(np.ascontiguousarray(np.array(data, copy=False)).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class VisionShare:
    shared: bool
    captioning: str  # digest
    retrieval: str
    reason: str  # why (not) shared, for the person running the job

    @property
    def message(self) -> str:
        return f"one pass: {self.reason}"


def decide(captioning_model, retrieval_digest: str) -> VisionShare:
    """Compare the captioning model's vision encoder with the retrieval model's (its :func:`vision_digest`)."""
    if getattr(captioning_model, "features_depend_on_prompt", False):
        return VisionShare(False, "", "", "the ViT runs twice: this captioning model's image features depend on "
                                          "the prompt (InstructBLIP), so they are computed by the model itself")
    if not hasattr(captioning_model, "encode_image_features"):
        return VisionShare(False, "", "", f"the ViT runs twice: {type(captioning_model).__name__} cannot take "
                                          "another model's ViT output")
    a, b = vision_digest(captioning_model), retrieval_digest
    if a == b:
        return VisionShare(True, a, b, f"one ViT pass serves both models (equal vision weights, sha256 {a[:12]})")
    return VisionShare(False, a, b, f"the ViT runs twice: the two checkpoints' vision weights differ (sha256 "
                                    f"{a[:12]} vs {b[:12]}: another checkpoint, dtype or quantization)")


def load_sharing(load_captioning, load_retrieval, log=None):
    """(captioning pipeline, retrieval pipeline, VisionShare), with one ViT in memory when they can share it."""
    retrieval = load_retrieval()
    digest = vision_digest(retrieval.model)
    del retrieval.model.vision_model  # freed while the captioning model loads
    captioning = load_captioning()
    share = decide(captioning.model, digest)
    if share.shared:
        retrieval.model.vision_model = captioning.model.vision_model
    else:
        retrieval = load_retrieval()
    if log is not None:
        print(share.message, file=log)
    return captioning, retrieval, share
