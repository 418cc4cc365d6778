"""Predictions against a task's references, with the official scorers' rules: one prediction per id, every
predicted id in the references, the images (or questions) scored being the predicted ones."""

from __future__ import annotations

from .metrics import gqa_accuracy, score_captions, vqa_accuracy
from .metrics.caption import JAVA_METRICS
from .tasks.data import TaskData, read_json

KEYS = {"caption": ("image_id", "caption"), "vqa": ("question_id", "answer"), "gqa": ("question_id", "answer")}


def _unique(pairs: list[tuple], what: str, source: str) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{source}: two predictions for {what} {key!r}")
        out[key] = value
    return out


def read_predictions(path: str, kind: str) -> dict:
    """``{id: text}`` from a results file: COCO's ``[{"image_id", "caption"}]``, VQA's ``[{"question_id",
    "answer"}]`` or, for GQA, also the official ``[{"questionId", "prediction"}]``."""
    data = read_json(path, "predictions")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of predictions")
    id_key, text_key = KEYS[kind]
    pairs = []
    for i, entry in enumerate(data):
        if kind == "gqa" and isinstance(entry, dict) and "questionId" in entry:
            entry = {"question_id": entry["questionId"], "answer": entry.get("prediction")}
        if not isinstance(entry, dict) or id_key not in entry or not isinstance(entry.get(text_key), str):
            raise ValueError(f"{path}: prediction {i} needs {id_key!r} and a string {text_key!r}")
        pairs.append((str(entry[id_key]) if kind == "gqa" else entry[id_key], entry[text_key]))
    return _unique(pairs, id_key, path)


def _check_known(predictions: dict, references: dict, what: str) -> None:
    unknown = [k for k in predictions if k not in references]
    if unknown:
        raise ValueError(f"prediction for {what} {unknown[0]!r} is not in the annotations")


def score_caption_task(data: TaskData, predictions: dict, java_metrics=JAVA_METRICS) -> dict:
    """Caption metrics over the predicted images; with subsets (NoCaps domains) each is also scored on its own."""
    _check_known(predictions, data.references, "image_id")
    result = score_captions(data.references, predictions, java_metrics)
    out = {"metrics": result["metrics"], "skipped": result["skipped"], "scored": len(predictions)}
    if data.groups:
        out["subsets"] = {}
        for name in sorted(set(data.groups.values())):
            subset = {k: v for k, v in predictions.items() if data.groups.get(k) == name}
            if subset:
                sub = score_captions(data.references, subset, java_metrics)
                out["subsets"][name] = {"metrics": sub["metrics"], "scored": len(subset)}
    return out


def score_task(data: TaskData, predictions: dict, java_metrics: bool = True) -> dict | None:
    """Metrics of ``predictions`` (keyed by the dataset's ids); None where there is nothing to score against (a
    test split whose answers are not public). ``java_metrics``: try METEOR and SPICE (pycocoevalcap, Java)."""
    if not predictions:
        raise ValueError("no predictions to score")
    if data.kind == "caption":
        return score_caption_task(data, predictions, JAVA_METRICS if java_metrics else ())
    if not data.references:
        return None
    if data.kind == "vqa":
        _check_known(predictions, data.references, "question_id")
        result = vqa_accuracy(predictions, data.references)
        return {"metrics": {"overall": result["overall"]}, "per_answer_type": result["per_answer_type"],
                "scored": len(predictions)}
    if data.kind == "gqa":
        _check_known(predictions, data.references, "question_id")
        result = gqa_accuracy(predictions, data.references)
        return {"metrics": {"overall": result["overall"]}, "scored": len(predictions)}
    raise ValueError(f"cannot score a {data.kind} task from a predictions file")


def submission(data: TaskData, predictions: dict) -> list[dict]:
    """Predictions in the official results format of the task's benchmark."""
    if data.kind == "caption":
        return [{"image_id": k, "caption": v} for k, v in predictions.items()]
    if data.kind == "gqa":
        return [{"questionId": k, "prediction": v} for k, v in predictions.items()]
    return [{"question_id": k, "answer": v} for k, v in predictions.items()]
