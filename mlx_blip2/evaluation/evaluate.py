"""One benchmark run: read the task's files, generate (or retrieve) for every item not yet recorded, score, write the
outputs. ``mlx-blip2 eval`` calls :func:`read_task` then :func:`evaluate`; so can a script, with a pipeline from
``mlx_blip2.load``."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import __version__
from ..library import launch
from .recipes import model_recipe, recipe_for, resolve_options
from .report import write_outputs
from .retrieval import run_retrieval
from .runner import run_generation
from .scoring import score_task, submission
from .store import records_path
from .tasks.captions import read_captions
from .tasks.data import TaskData, limited
from .tasks.questions import read_gqa, read_vqa
from .tasks.retrieval_data import read_retrieval


@dataclass
class EvalInputs:
    """The dataset files of a run: ``annotations`` (captions, VQA annotations, GQA questions or the retrieval test
    file), ``questions`` (VQAv2/OK-VQA questions) and the ``images`` folder."""

    images: str
    annotations: str | None = None
    questions: str | None = None


def read_task(task: str, inputs: EvalInputs) -> TaskData:
    kind = recipe_for(task)["kind"]
    if kind == "caption":
        return read_captions(_need(inputs.annotations, "--annotations", task), inputs.images)
    if kind == "vqa":
        if task == "vqav2_test_dev":
            return read_vqa(_need(inputs.questions, "--questions", task), inputs.images)
        return read_vqa(_need(inputs.questions, "--questions", task), inputs.images,
                        _need(inputs.annotations, "--annotations", task))
    if kind == "gqa":
        return read_gqa(_need(inputs.annotations or inputs.questions, "--annotations", task), inputs.images)
    return read_retrieval(_need(inputs.annotations, "--annotations", task), inputs.images)


def _need(value, flag: str, task: str):
    if not value:
        raise ValueError(f"task {task} needs {flag}")
    return value


def run_info(pipe, checkpoint: str, adapter: str | None, image_size: int) -> dict:
    """What produced the figures: checkpoint, dtype, quantization, adapter, image size, package version."""
    from mlx.utils import tree_flatten

    params = tree_flatten(pipe.model.parameters())
    quantization = getattr(pipe.model.config, "quantization", None) or None
    if quantization:
        quantization = {k: quantization[k] for k in ("bits", "group_size", "mode") if k in quantization}
    return {"checkpoint": checkpoint, "dtype": str(params[0][1].dtype).removeprefix("mlx.core.") if params else None,
            "quantization": quantization, "adapter": adapter, "image_size": image_size, "version": __version__}


def _image_size(pipe, requested: int | None, kind: str) -> tuple[int, bool]:
    """The image size the run uses, and whether the ViT must interpolate its position grid for it."""
    size = pipe.processor.image_processor.size
    native = int(size["height"])
    if requested is None or requested == native:
        return native, False
    if kind == "retrieval":
        raise ValueError(f"--image-size {requested}: retrieval runs at the checkpoint's own size ({native})")
    pipe.processor.image_processor.size = {"height": requested, "width": requested}
    return requested, True


def _generate(pipe, recipe: dict, data: TaskData, out_dir: str, overrides: dict, interpolate: bool, group, **kw):
    options = resolve_options(recipe, overrides)
    if interpolate:
        options = options.replace(interpolate_pos_encoding=True)
    if recipe["kind"] == "caption":
        prompt = pipe.caption_prompt(recipe.get("prompt"))

        def prompt_for(item):
            return prompt
    else:
        def prompt_for(item):
            return recipe["prompt"].format(item.question)
    records = run_generation(pipe.engine, data.items, prompt_for, options, out_dir, group=group, **kw)
    return records, options.to_dict(public_only=True)


def evaluate(pipe, task: str, data: TaskData, out_dir: str, *, checkpoint: str, adapter: str | None = None,
             limit: int | None = None, overrides: dict | None = None, image_size: int | None = None,
             k_test: int | None = None, batch_size: int = 8, progress: bool | None = None,
             java_metrics: bool = True) -> dict | None:
    """Run ``task`` on ``data`` (:func:`read_task`) and write the outputs to ``out_dir``; returns metrics.json's
    content (None on launched ranks other than 0, which leave the scoring to rank 0). ``overrides``: generation
    options over the recipe's; ``k_test``: retrieval candidates per query (LAVIS's 128); ``java_metrics``: try
    METEOR and SPICE. A second run on the same ``out_dir`` while this one goes is refused."""
    recipe_for(task)  # an unknown task fails here, before any file is written
    data.items = limited(data.items, limit)
    if not data.items:
        raise ValueError(f"{task}: the annotations hold no items")
    os.makedirs(out_dir, exist_ok=True)
    group = launch.current_group()
    lock = None
    if group is None or group.rank == 0:  # a second run on the same folder would interleave its records
        lock = launch.open_lock_file(records_path(out_dir), ValueError(f"another eval run is writing to {out_dir}"))
    try:
        return _run(pipe, task, data, out_dir, group, checkpoint=checkpoint, adapter=adapter, overrides=overrides,
                    image_size=image_size, k_test=k_test, batch_size=batch_size, progress=progress,
                    java_metrics=java_metrics)
    finally:
        if lock is not None:
            lock.close()


def _run(pipe, task: str, data: TaskData, out_dir: str, group, *, checkpoint, adapter, overrides, image_size, k_test,
         batch_size, progress, java_metrics) -> dict | None:
    recipe = recipe_for(task)
    size, interpolate = _image_size(pipe, image_size, recipe["kind"])
    info = run_info(pipe, checkpoint, adapter, size)
    if recipe["kind"] == "retrieval":
        k_test = k_test or recipe["k_test"]
        metrics, rankings = run_retrieval(pipe, data, out_dir, k_test, group, batch_size, progress)
        if group is not None and group.rank != 0:
            return None
        scores = {"metrics": metrics, "scored": len(data.items)}
        return write_outputs(out_dir, task, {**recipe, "k_test": k_test}, info, rankings, scores)
    recipe = model_recipe(task, pipe)
    records, options = _generate(pipe, recipe, data, out_dir, overrides or {}, interpolate, group,
                                 batch_size=batch_size, progress=progress)
    if group is not None and group.rank != 0:
        return None
    predictions = {data.ids[item.key]: records[item.key]["output"] for item in data.items
                   if "output" in records.get(item.key, {})}
    failed = {item.key: records[item.key]["error"] for item in data.items if "error" in records.get(item.key, {})}
    info.update(items=len(data.items), predicted=len(predictions), failed=failed, generation=options)
    scores = score_task(data, predictions, java_metrics) if predictions else None
    return write_outputs(out_dir, task, recipe, info, submission(data, predictions), scores)
