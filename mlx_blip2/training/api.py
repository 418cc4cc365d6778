"""``finetune(model, data, output, ...)``: the Python API of ``mlx-blip2 finetune``."""

from __future__ import annotations

import os

from .datasets import Example, read_examples, split_validation
from .options import TrainOptions
from .trainer import Trainer, TrainResult


def load_examples(sources, image_root: str | None = None, errors: list[str] | None = None) -> list[Example]:
    """Examples from one or several sources (folders, .jsonl/.csv/COCO .json files)."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    out = []
    for source in sources:
        out += read_examples(source, image_root, errors)
    return out


def finetune(model, data, output, options: TrainOptions | None = None, val_data=None, image_root: str | None = None,
             resume: bool = False, log=print, dtype=None) -> TrainResult:
    """Fine-tune ``model`` (a checkpoint path / Hub id, or a loaded pipeline) on ``data``; the adapter goes to
    ``output`` (load it with ``mlx_blip2.load(model, adapter_path=output)``)."""
    from ..pipelines import load

    options = options or TrainOptions()
    errors: list[str] = []
    examples = load_examples(data, image_root, errors)
    if val_data is not None:
        train, val = examples, load_examples(val_data, image_root, errors)
    else:
        train, val = split_validation(examples, options.val_fraction, options.seed)
    if not train:
        raise ValueError(f"no usable training examples in {data}" + (f" ({errors[0]})" if errors else ""))
    pipeline = load(model, dtype=dtype) if isinstance(model, (str, os.PathLike)) else model
    log(f"{len(train)} training and {len(val)} validation examples")
    trainer = Trainer(pipeline, train, val, options, output, log=log)
    trainer.errors.extend(errors)
    log(trainer.collator.describe())
    return trainer.fit(resume=resume)
