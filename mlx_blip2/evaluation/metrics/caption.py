"""Caption metrics over a set of images, as pycocoevalcap's COCOEvalCap reports them.

BLEU-1..4, ROUGE-L and CIDEr-D are computed here in pure Python on pycocoevalcap's tokenization. METEOR and SPICE
need Java programs; they run through pycocoevalcap when it and ``java`` are installed, and are otherwise reported as
skipped with the reason.
"""

from __future__ import annotations

import contextlib
import shutil
import sys

from .bleu import bleu
from .cider import cider_d
from .ptb_tokenizer import tokenize
from .rouge import rouge_l

JAVA_METRICS = ("METEOR", "SPICE")


def _java_metric(name: str, gts: dict, res: dict) -> tuple[float | None, str | None]:
    if shutil.which("java") is None:
        return None, "skipped: java is not installed"
    try:
        if name == "METEOR":
            from pycocoevalcap.meteor.meteor import Meteor as scorer_class
        else:
            from pycocoevalcap.spice.spice import Spice as scorer_class
    except ImportError:
        return None, "skipped: pycocoevalcap is not installed (pip install pycocoevalcap)"
    try:
        with contextlib.redirect_stdout(sys.stderr):  # SPICE prints its model download; keep stdout for results
            score, _ = scorer_class().compute_score(gts, res)
    except Exception as e:  # SPICE fetches Stanford CoreNLP models on first use; offline that fails
        return None, f"skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'failed'}"
    return float(score), None


def score_captions(references: dict, predictions: dict, java_metrics=JAVA_METRICS) -> dict:
    """Scores ``{image_id: caption}`` against ``{image_id: [reference captions]}`` over the predicted images.

    Returns ``{"metrics": {name: value}, "skipped": {name: reason}, "per_image": {image_id: {name: value}}}``.
    """
    missing = [key for key in predictions if key not in references]
    if missing:
        raise ValueError(f"prediction for image_id {missing[0]!r} has no reference captions")
    keys = list(predictions)
    gts = tokenize({key: list(references[key]) for key in keys})
    res = tokenize({key: [predictions[key]] for key in keys})
    (b, per_bleu), (r, per_rouge), (c, per_cider) = bleu(gts, res), rouge_l(gts, res), cider_d(gts, res)
    metrics = {f"Bleu_{k + 1}": b[k] for k in range(4)}
    metrics.update({"ROUGE_L": r, "CIDEr": c})
    per_image = {key: {**{f"Bleu_{k + 1}": per_bleu[k][i] for k in range(4)}, "ROUGE_L": per_rouge[i],
                       "CIDEr": per_cider[i]} for i, key in enumerate(keys)}
    skipped = {}
    for name in java_metrics:
        value, reason = _java_metric(name, gts, res)
        if value is None:
            skipped[name] = reason
        else:
            metrics[name] = value
    return {"metrics": metrics, "skipped": skipped, "per_image": per_image}
