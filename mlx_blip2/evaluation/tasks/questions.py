"""Question-answering datasets from their official files.

VQAv2 and OK-VQA: the questions file (``{"questions": [{"question_id", "image_id", "question"}], "data_subtype"}``)
and, to score, the annotations file; images are COCO's ``COCO_<subtype>_<image id, 12 digits>.jpg``. GQA: the
balanced test-dev questions (``{question_id: {"imageId", "question", "answer"}}``), images ``<imageId>.jpg``.
"""

from __future__ import annotations

import os

from .data import Item, TaskData, image_path, read_json, require


def read_vqa(questions: str, images_root: str, annotations: str | None = None) -> TaskData:
    """VQAv2 / OK-VQA: the questions to answer, and the official annotations when given (val; test-dev has none)."""
    data = read_json(questions, "VQA questions")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(f"{questions}: not a VQA questions file (expected an object with a 'questions' list)")
    subtype = data.get("data_subtype", "val2014")
    items, ids = [], {}
    for i, q in enumerate(data["questions"]):
        require(q, ("question_id", "image_id", "question"), questions, f"questions[{i}]")
        name = f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"
        key = str(q["question_id"])
        items.append(Item(key, image_path(images_root, os.path.join(subtype, name)), q["question"]))
        ids[key] = q["question_id"]
    references = read_vqa_annotations(annotations) if annotations else {}
    missing = [item.key for item in items if references and ids[item.key] not in references]
    if missing:
        raise ValueError(f"{annotations}: no annotation for question_id {missing[0]}")
    return TaskData("vqa", items, ids=ids, references=references)


def read_vqa_annotations(path: str) -> dict:
    data = read_json(path, "VQA annotations")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: not a VQA annotations file (expected an object with an 'annotations' list)")
    out = {}
    for i, ann in enumerate(data["annotations"]):
        require(ann, ("question_id", "answers"), path, f"annotations[{i}]")
        out[ann["question_id"]] = ann
    return out


def read_gqa(questions: str, images_root: str) -> TaskData:
    data = read_json(questions, "GQA questions")
    if not isinstance(data, dict):
        raise ValueError(f"{questions}: not a GQA questions file (expected an object keyed by question id)")
    items, answers = [], {}
    for qid, q in data.items():
        require(q, ("imageId", "question"), questions, qid)
        items.append(Item(str(qid), image_path(images_root, f"{q['imageId']}.jpg"), q["question"]))
        if "answer" in q:
            answers[str(qid)] = q["answer"]
    return TaskData("gqa", items, ids={item.key: item.key for item in items}, references=answers)
