"""What a checkpoint holds, read from its config.json: the one place that maps a configuration to a model kind and
the class that holds its weights. ``load()``, the converter and the CLI's checkpoint checks all ask here.

Classes are named, not imported: asking what a checkpoint is (``mlx-blip2 search`` does, before loading anything)
then costs a JSON read, not the import of every language model.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from .loading import CheckpointError

CAPTIONING, RETRIEVAL = "captioning", "retrieval"
BLIP2, INSTRUCTBLIP = "blip-2", "instructblip"
# A checkpoint of each kind, for messages that say which one a command needs.
KIND_EXAMPLES = {CAPTIONING: "Salesforce/blip2-opt-2.7b or Salesforce/blip2-flan-t5-xl",
                 RETRIEVAL: "Salesforce/blip2-itm-vit-g"}


@dataclass(frozen=True)
class ModelSpec:
    """One architecture: the task ``kind`` ("captioning" or "retrieval"), the ``family`` ("blip-2" or
    "instructblip": which processor and recipes) and the class in :mod:`mlx_blip2.models` that holds its weights."""

    architecture: str
    kind: str
    family: str
    module: str
    class_name: str

    @property
    def model_class(self) -> type:
        return getattr(importlib.import_module(f"{__package__}.{self.module}"), self.class_name)


# transformers' ``architectures`` names -> what they are here. Captioning checkpoints are held by the networks
# (``Blip2Model``, ``InstructBlipModel``); mlx_blip2.generation adds ``generate`` to them.
ARCHITECTURES = {spec.architecture: spec for spec in (
    ModelSpec("Blip2ForConditionalGeneration", CAPTIONING, BLIP2, "blip2", "Blip2Model"),
    ModelSpec("InstructBlipForConditionalGeneration", CAPTIONING, INSTRUCTBLIP, "instructblip", "InstructBlipModel"),
    ModelSpec("Blip2ForImageTextRetrieval", RETRIEVAL, BLIP2, "retrieval", "Blip2ForImageTextRetrieval"),
    ModelSpec("Blip2TextModelWithProjection", RETRIEVAL, BLIP2, "retrieval", "Blip2TextModelWithProjection"),
    ModelSpec("Blip2VisionModelWithProjection", RETRIEVAL, BLIP2, "retrieval", "Blip2VisionModelWithProjection"),
)}
DEFAULT_ARCHITECTURE = {BLIP2: "Blip2ForConditionalGeneration", INSTRUCTBLIP: "InstructBlipForConditionalGeneration"}


def read_config(directory: str | Path) -> dict:
    """A checkpoint's config.json as a dict; {} when it is missing or unreadable (the loader then says why)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def architectures(config: dict) -> list[str]:
    value = config.get("architectures")
    return [a for a in value if isinstance(a, str)] if isinstance(value, list) else []


def model_spec(config: dict) -> ModelSpec:
    """The spec of a configuration: a retrieval architecture if one is listed; else InstructBLIP by ``model_type``
    (configs written without ``architectures``); else the first known architecture; else BLIP-2 captioning."""
    known = [ARCHITECTURES[a] for a in architectures(config) if a in ARCHITECTURES]
    retrieval = [spec for spec in known if spec.kind == RETRIEVAL]
    if retrieval:
        return retrieval[0]
    if config.get("model_type") == INSTRUCTBLIP:
        return ARCHITECTURES[DEFAULT_ARCHITECTURE[INSTRUCTBLIP]]
    return known[0] if known else ARCHITECTURES[DEFAULT_ARCHITECTURE[BLIP2]]


def checkpoint_spec(directory: str | Path) -> ModelSpec:
    """The spec of a checkpoint directory (see :func:`model_spec`)."""
    return model_spec(read_config(directory))


def require_kind(directory: str | Path, kind: str, command: str) -> ModelSpec:
    """The checkpoint's spec; CheckpointError (a ValueError) when it is not of the ``kind`` ``command`` needs."""
    config = read_config(directory)
    spec = model_spec(config)
    if spec.kind != kind:
        listed = ", ".join(architectures(config)) or "no architectures listed"
        raise CheckpointError(f"'{command}' needs a {kind} checkpoint (such as {KIND_EXAMPLES[kind]}); the one given "
                              f"is a {spec.kind} checkpoint ({listed})")
    return spec
