"""GQA accuracy as LAVIS's ``gqa`` task scores generated answers.

The prediction goes through the VQA answer normalization (punctuation, then digits/articles/contractions); the
ground-truth answer is compared as stored; a question scores 1 on an exact match, else 0.
"""

from __future__ import annotations

from .vqa import process_digit_article, process_punctuation


def gqa_correct(prediction: str, answer: str) -> bool:
    return process_digit_article(process_punctuation(prediction)) == answer


def gqa_accuracy(predictions: dict, answers: dict) -> dict:
    """Percent exact matches over ``{question_id: prediction}`` against ``{question_id: answer}``."""
    per_question = {qid: 1 if gqa_correct(pred, answers[qid]) else 0 for qid, pred in predictions.items()}
    return {"overall": sum(per_question.values()) / len(per_question) * 100, "per_question": per_question}
