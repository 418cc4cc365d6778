"""Metric parity: our pure-Python scorers against the figures the official implementations gave the fixtures
(pycocoevalcap with Java, GT-Vision-Lab's VQA evaluation; tests/fixtures/eval/make_eval_fixtures.py made them)."""

import json
import random
import shutil
from pathlib import Path

import pytest

from mlx_blip2.evaluation.metrics import gqa_accuracy, score_captions, tokenize, tokenize_captions, vqa_accuracy
from mlx_blip2.evaluation.metrics.vqa import normalize_answer, question_accuracy

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
TOL = 1e-9


def load(name):
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def caption_inputs():
    refs = {}
    for ann in load("captions_annotations.json")["annotations"]:
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    return refs, {p["image_id"]: p["caption"] for p in load("captions_predictions.json")}


def test_ptb_tokenizer_matches_stanford_on_tricky_text():
    expected = load("ptb_expected.json")
    assert tokenize_captions(expected["cases"]) == expected["tokenized"]


def test_caption_tokenization_matches_pycocoevalcap():
    refs, preds = caption_inputs()
    expected = load("captions_expected.json")
    assert {str(k): v for k, v in tokenize(refs).items()} == expected["tokenized_references"]
    assert {str(k): v for k, v in tokenize({k: [v] for k, v in preds.items()}).items()} == \
        expected["tokenized_predictions"]


def test_caption_metrics_match_pycocoevalcap():
    refs, preds = caption_inputs()
    expected = load("captions_expected.json")
    out = score_captions(refs, preds, java_metrics=())
    assert set(out["metrics"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    for name, value in out["metrics"].items():
        assert value == pytest.approx(expected["metrics"][name], abs=TOL), name
    for image_id, scores in out["per_image"].items():
        for name, value in scores.items():
            assert value == pytest.approx(expected["per_image"][str(image_id)][name], abs=TOL), (image_id, name)


def test_caption_scores_cover_only_predicted_images():
    refs, preds = caption_inputs()
    subset = {k: preds[k] for k in list(preds)[:5]}
    full = score_captions(refs, preds, java_metrics=())
    part = score_captions(refs, subset, java_metrics=())
    assert set(part["per_image"]) == set(subset)
    # CIDEr's document frequencies come from the evaluated images' references, so a subset scores differently
    assert part["metrics"]["CIDEr"] != pytest.approx(sum(full["per_image"][k]["CIDEr"] for k in subset) / 5)
    with pytest.raises(ValueError, match="image_id 999"):
        score_captions(refs, {999: "a cat"}, java_metrics=())


def test_java_metrics_are_named_as_skipped_without_java(monkeypatch):
    refs, preds = caption_inputs()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = score_captions(refs, preds)
    assert out["skipped"] == {"METEOR": "skipped: java is not installed", "SPICE": "skipped: java is not installed"}
    assert "METEOR" not in out["metrics"]


def test_vqa_accuracy_matches_official_evaluation():
    expected = load("vqa_expected.json")
    annotations = {a["question_id"]: a for a in load("vqa_annotations.json")["annotations"]}
    preds = {p["question_id"]: p["answer"] for p in load("vqa_predictions.json")}
    out = vqa_accuracy(preds, annotations)
    assert out["overall"] == pytest.approx(expected["overall"], abs=TOL)
    assert round(out["overall"], 2) == expected["official_rounded"]["overall"]
    assert out["per_answer_type"] == pytest.approx(expected["per_answer_type"], abs=TOL)
    assert out["per_question_type"] == pytest.approx(expected["per_question_type"], abs=TOL)
    for qid, acc in out["per_question"].items():
        assert acc == pytest.approx(expected["per_question"][str(qid)], abs=TOL), qid


def test_vqa_normalization_rules():
    assert normalize_answer("The Two dogs!") == "2 dogs"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("1,000") == "1000"  # a comma between digits: every punctuation mark is deleted
    assert normalize_answer("hot-dog") == "hot dog"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("yes.") == "yes"
    # ten identical answers: the official code compares without normalizing, so case matters
    assert question_accuracy("Yes", [{"answer": "yes", "answer_id": i} for i in range(10)]) == 0.0
    assert question_accuracy("yes", [{"answer": "yes", "answer_id": i} for i in range(10)]) == 1.0
    two = [{"answer": "red", "answer_id": i} for i in range(2)] + \
        [{"answer": "blue", "answer_id": i} for i in range(2, 10)]
    assert question_accuracy("red", two) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)


def test_gqa_accuracy_matches_lavis():
    expected = load("gqa_expected.json")
    questions = load("gqa_testdev_balanced_questions.json")
    preds = {p["question_id"]: p["answer"] for p in load("gqa_predictions.json")}
    out = gqa_accuracy(preds, {q: v["answer"] for q, v in questions.items()})
    assert out["overall"] == pytest.approx(expected["overall"], abs=TOL)
    assert out["per_question"] == expected["per_question"]


def _official_available():
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


@pytest.mark.skipif(not _official_available(), reason="needs Java and pycocoevalcap (the official scorer)")
def test_random_captions_against_live_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    rng = random.Random(0)
    words = ["a", "man", "dog's", "isn't", "riding", "wave", "on", "the", "(red)", "bus", "2", "two", "café", "St.",
             "U.S.", "--", "...", "don't", "it's", "e-mail", "\"big\"", "surf-board", "1/2", "10:30", "!", ","]
    refs = {i: [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 5))]
            for i in range(40)}
    preds = {i: " ".join(rng.choice(words) for _ in range(rng.randint(0, 10))) for i in range(40)}
    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in r] for i, r in refs.items()})
    res = PTBTokenizer().tokenize({i: [{"caption": p}] for i, p in preds.items()})
    assert tokenize(refs) == gts and tokenize({i: [p] for i, p in preds.items()}) == res
    ours = score_captions(refs, preds, java_metrics=())["metrics"]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        assert ours[f"Bleu_{k + 1}"] == pytest.approx(bleu[k], abs=TOL)
    assert ours["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=TOL)
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=TOL)
