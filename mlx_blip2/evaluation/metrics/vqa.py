"""VQA accuracy exactly as the official evaluation (GT-Vision-Lab/VQA, vqaEvaluation/vqaEval.py) computes it.

Answers are normalized (punctuation, number words, articles, contractions) only when the ten human answers are not
all the same, as the official script does; a prediction scores min(#matching humans / 3, 1) averaged over the ten
leave-one-out subsets of the human answers. The official script's quirks are kept on purpose: its period regex is a
lookahead that reads like a lookbehind, and ``re.UNICODE`` lands in ``sub``'s ``count`` (at most 32 periods go).
"""

from __future__ import annotations

import re

from .vqa_words import CONTRACTIONS, NUMBER_WORDS

ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(\,)(\d)")
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, _PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    return process_digit_article(process_punctuation(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(prediction: str, human_answers: list[dict]) -> float:
    """Accuracy in [0, 1] of one prediction against the ``answers`` list of one official annotation."""
    answers = [dict(a, answer=_clean(a["answer"])) for a in human_answers]
    prediction = _clean(prediction)
    if len({a["answer"] for a in answers}) > 1:
        answers = [dict(a, answer=normalize_answer(a["answer"])) for a in answers]
        prediction = normalize_answer(prediction)
    scores = []
    for held_out in answers:
        # the official code leaves out every answer record equal to the held-out one (records differ by answer_id)
        others = [a for a in answers if a != held_out]
        scores.append(min(1.0, float(sum(1 for a in others if a["answer"] == prediction)) / 3))
    return float(sum(scores)) / len(scores)


def vqa_accuracy(predictions: dict, annotations: dict) -> dict:
    """Accuracy over ``{question_id: answer}`` against ``{question_id: official annotation}``.

    Returns ``overall``, ``per_answer_type`` and ``per_question_type`` in percent (unrounded; the official script
    rounds each to two places) and ``per_question`` in [0, 1].
    """
    per_question, by_answer_type, by_question_type = {}, {}, {}
    for qid, prediction in predictions.items():
        ann = annotations[qid]
        acc = question_accuracy(prediction, ann["answers"])
        per_question[qid] = acc
        by_answer_type.setdefault(ann.get("answer_type", "other"), []).append(acc)
        by_question_type.setdefault(ann.get("question_type", "other"), []).append(acc)

    def percent(values):
        return 100 * float(sum(values)) / len(values)

    return {"overall": percent(list(per_question.values())),
            "per_answer_type": {k: percent(v) for k, v in by_answer_type.items()},
            "per_question_type": {k: percent(v) for k, v in by_question_type.items()},
            "per_question": per_question}
