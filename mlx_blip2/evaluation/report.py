"""What a run leaves in its folder: ``results.json`` (the benchmark's submission format), ``metrics.json`` (the
figures with the recipe, checkpoint, dtype, quantization, adapter and package version that produced them) and
``report.md`` (our figures beside the published ones, each with its source). All written atomically."""

from __future__ import annotations

import json
import os

from ..library.atomic import atomic_write

# pycocoevalcap reports caption metrics in [0, 1] (CIDEr in [0, 10]); papers print them times 100
PERCENT_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def write_json(path: str, value) -> None:
    atomic_write(path, (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _shown(name: str, value: float) -> str:
    return f"{value * 100:.1f}" if name in PERCENT_METRICS else f"{value:.2f}"


def markdown(task: str, recipe: dict, info: dict, scores: dict | None) -> str:
    """A table of our figures and the published ones (paper, LAVIS) for the task, sources cited below it."""
    if "version" in info:
        head = (f"Recipe: `{recipe['source']}`. Checkpoint: `{info.get('checkpoint')}` ({info.get('dtype')}, "
                f"quantization: {info.get('quantization') or 'none'}, adapter: {info.get('adapter') or 'none'}, "
                f"image size {info.get('image_size')}); mlx-blip2 {info['version']}.")
    else:
        head = f"Predictions: `{info.get('predictions')}`."
    lines = [f"# {task}", "", head, ""]
    if scores is None:
        lines += ["No answers to score against: submit `results.json` to the benchmark's server.", ""]
        ours = {}
    else:
        ours = scores["metrics"]
        lines += [f"Scored {scores['scored']} items.", ""]
    published = recipe.get("published", [])
    names = list(dict.fromkeys(list(ours) + [p["metric"] for p in published]))
    lines += ["| metric | ours | published | model (published) | source |", "|---|---|---|---|---|"]
    for name in names:
        rows = [p for p in published if p["metric"] == name] or [None]
        for p in rows:
            mine = _shown(name, ours[name]) if name in ours else ""
            lines.append(f"| {name} | {mine} | {p['value'] if p else ''} | {p['model'] if p else ''} | "
                         f"{p['source'] if p else ''} |")
    for name, subset in (scores or {}).get("subsets", {}).items():
        figures = ", ".join(f"{k} {_shown(k, v)}" for k, v in subset["metrics"].items())
        lines.append(f"\n{name} ({subset['scored']} images): {figures}")
    for name, reason in (scores or {}).get("skipped", {}).items():
        lines.append(f"\n{name}: {reason}")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str, task: str, recipe: dict, info: dict, results, scores: dict | None) -> dict:
    """results.json, metrics.json and report.md in ``out_dir``; returns what metrics.json holds."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "results.json"), results)
    metrics = {"task": task, "recipe": recipe, **info, "scores": scores}
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    atomic_write(os.path.join(out_dir, "report.md"), markdown(task, recipe, info, scores).encode("utf-8"))
    return metrics
