"""`mlx-blip2 eval` end to end on tiny datasets (images made here) with the tiny checkpoints, and `eval score`."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_blip2
from mlx_blip2.cli import main
from mlx_blip2.evaluation.evaluate import EvalInputs, evaluate, read_task
from mlx_blip2.evaluation.metrics import score_captions, vqa_accuracy
from mlx_blip2.evaluation.store import records_path

FIXTURES = Path(__file__).parent / "fixtures"
EVAL = FIXTURES / "eval"
OPT, T5 = FIXTURES / "tiny-blip2-opt", FIXTURES / "tiny-blip2-flan-t5"
FAST = ["--max-new-tokens", "4", "--num-beams", "1", "--no-progress", "--no-java-metrics"]


def save_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(path)


def karpathy_set(root: Path, n: int, missing: int = 0) -> Path:
    """LAVIS's coco_karpathy_test.json layout; ``missing`` entries name images that do not exist."""
    entries = []
    for i in range(n + missing):
        name = f"val2014/COCO_val2014_{i + 1:012d}.jpg"
        if i < n:
            save_image(root / "images" / name, i)
        entries.append({"image": name, "caption": [f"a photo of thing {i}", "a random picture", "Dots, colours!"]})
    path = root / "coco_karpathy_test.json"
    path.write_text(json.dumps(entries))
    return path


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def test_caption_run_writes_results_metrics_and_report(tmp_path):
    ann = karpathy_set(tmp_path, 4, missing=1)
    out = tmp_path / "out"
    rc = main(["eval", "coco_caption", "--annotations", str(ann), "--images", str(tmp_path / "images"), "-m", str(OPT),
               "--out", str(out), *FAST])
    assert rc == 1  # the missing image is a failed item, named in metrics.json
    results = read_json(out / "results.json")
    assert sorted(r["image_id"] for r in results) == [1, 2, 3, 4]
    assert all(isinstance(r["caption"], str) for r in results)
    metrics = read_json(out / "metrics.json")
    assert list(metrics["failed"]) == ["5"] and "no such image file" in metrics["failed"]["5"]
    assert metrics["checkpoint"] == str(OPT) and metrics["dtype"] == "float32" and metrics["adapter"] is None
    assert metrics["version"] == mlx_blip2.__version__ and metrics["image_size"] == 56
    assert metrics["recipe"]["source"].endswith("caption_coco_opt2.7b_eval.yaml")
    assert metrics["generation"]["max_new_tokens"] == 4 and metrics["generation"]["num_beams"] == 1
    refs = {i + 1: [f"a photo of thing {i}", "a random picture", "Dots, colours!"] for i in range(4)}
    again = score_captions(refs, {r["image_id"]: r["caption"] for r in results}, java_metrics=())
    assert metrics["scores"]["metrics"] == pytest.approx(again["metrics"], abs=1e-12)
    report = (out / "report.md").read_text()
    assert "| CIDEr |" in report and "Table 3" in report


def test_killed_run_resumes_without_redoing_finished_items(tmp_path):
    ann = karpathy_set(tmp_path, 5)
    pipe = mlx_blip2.load(OPT)
    calls = []
    generate = pipe.engine.generate
    pipe.engine.generate = lambda rows, options, *a: calls.append(len(rows)) or generate(rows, options, *a)
    inputs = EvalInputs(str(tmp_path / "images"), str(ann))
    task_data = lambda: read_task("coco_caption", inputs)  # noqa: E731
    run = dict(checkpoint=str(OPT), overrides={"max_new_tokens": 4, "num_beams": 1}, batch_size=2, progress=False,
               java_metrics=False)
    out = str(tmp_path / "out")
    evaluate(pipe, "coco_caption", task_data(), out, limit=3, **run)
    assert calls == [2, 1]
    first = Path(records_path(out)).read_bytes()
    Path(records_path(out)).write_bytes(first + b'{"key": "4", "outp')  # killed mid-write
    metrics = evaluate(pipe, "coco_caption", task_data(), out, **run)
    assert calls == [2, 1, 2]  # only items 4 and 5
    data = Path(records_path(out)).read_bytes()
    assert data.startswith(first) and data.endswith(b"\n")
    assert [json.loads(line)["key"] for line in data.splitlines()] == ["1", "2", "3", "4", "5"]
    assert metrics["predicted"] == 5 and metrics["scores"]["scored"] == 5
    from mlx_blip2.library.launch import open_lock_file

    with open_lock_file(records_path(out), RuntimeError("held")):  # another run is writing there
        with pytest.raises(ValueError, match="another eval run is writing to"):
            evaluate(pipe, "coco_caption", task_data(), out, **run)


def test_eval_score_reproduces_the_official_fixture_scores(tmp_path, capsys):
    assert main(["eval", "score", "--task", "caption", str(EVAL / "captions_predictions.json"),
                 str(EVAL / "captions_annotations.json"), "--no-java-metrics"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = read_json(EVAL / "captions_expected.json")["metrics"]
    for name, value in printed["metrics"].items():
        assert value == pytest.approx(expected[name], abs=1e-9), name
    assert main(["eval", "score", "--task", "vqa", str(EVAL / "vqa_predictions.json"),
                 str(EVAL / "vqa_annotations.json"), "--out", str(tmp_path / "vqa")]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = read_json(EVAL / "vqa_expected.json")
    assert printed["metrics"]["overall"] == pytest.approx(expected["overall"], abs=1e-9)
    assert printed["per_answer_type"] == pytest.approx(expected["per_answer_type"], abs=1e-9)
    assert read_json(tmp_path / "vqa" / "metrics.json")["scores"] == printed
    assert main(["eval", "score", "--task", "gqa", str(EVAL / "gqa_predictions.json"),
                 str(EVAL / "gqa_testdev_balanced_questions.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"]["overall"] == pytest.approx(read_json(EVAL / "gqa_expected.json")["overall"], abs=1e-9)


def test_eval_score_errors_are_one_line(tmp_path, capsys):
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]))
    assert main(["eval", "score", "--task", "caption", str(preds), str(EVAL / "captions_annotations.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {preds}: two predictions for image_id 1"
    preds.write_text(json.dumps([{"image_id": 999, "caption": "a"}]))
    assert main(["eval", "score", "--task", "caption", str(preds), str(EVAL / "captions_annotations.json")]) == 2
    assert "image_id 999" in capsys.readouterr().err
    assert main(["eval", "score", "--task", "vqa", str(preds), str(tmp_path / "none.json")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "vqav2", "--images", str(tmp_path)]) == 2
    assert "needs --questions" in capsys.readouterr().err


def vqa_set(root: Path, subtype: str, answers: bool) -> tuple[Path, Path | None]:
    questions, anns = [], []
    for i in range(3):
        save_image(root / "images" / subtype / f"COCO_{subtype}_{i + 7:012d}.jpg", i)
        for j in range(2):
            qid = 10 * i + j
            questions.append({"image_id": i + 7, "question": f"what is thing {j}?", "question_id": qid})
            anns.append({"question_id": qid, "image_id": i + 7, "answer_type": "other", "question_type": "what",
                         "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(["red"] * 6 + ["x"] * 4)]})
    qpath = root / "questions.json"
    qpath.write_text(json.dumps({"data_subtype": subtype, "questions": questions}))
    if not answers:
        return qpath, None
    apath = root / "annotations.json"
    apath.write_text(json.dumps({"annotations": anns}))
    return qpath, apath


def test_vqa_run_scores_with_the_official_accuracy(tmp_path):
    questions, annotations = vqa_set(tmp_path, "val2014", answers=True)
    out = tmp_path / "out"
    assert main(["eval", "vqav2", "--questions", str(questions), "--annotations", str(annotations), "--images",
                 str(tmp_path / "images"), "-m", str(T5), "--out", str(out), *FAST]) == 0
    results = read_json(out / "results.json")
    assert sorted(r["question_id"] for r in results) == [0, 1, 10, 11, 20, 21]
    metrics = read_json(out / "metrics.json")
    refs = {a["question_id"]: a for a in read_json(annotations)["annotations"]}
    expected = vqa_accuracy({r["question_id"]: r["answer"] for r in results}, refs)["overall"]
    assert metrics["scores"]["metrics"]["overall"] == pytest.approx(expected)
    assert metrics["generation"]["length_penalty"] == -1.0  # LAVIS's blip2_t5.predict_answers default
    assert metrics["recipe"]["prompt"] == "Question: {} Short answer:"


def test_instructblip_runs_with_its_own_recipe(tmp_path):
    questions, annotations = vqa_set(tmp_path, "val2014", answers=True)
    out = tmp_path / "out"
    assert main(["eval", "okvqa", "--questions", str(questions), "--annotations", str(annotations), "--images",
                 str(tmp_path / "images"), "-m", str(FIXTURES / "tiny-instructblip-flan-t5"), "--out", str(out),
                 "--limit", "2", *FAST]) == 0
    metrics = read_json(out / "metrics.json")
    assert metrics["recipe"]["prompt"] == "Question: {} Short Answer:"  # LAVIS's InstructBLIP VQA template
    assert "instructblip" in metrics["recipe"]["source"]
    assert metrics["generation"]["repetition_penalty"] == 1.5 and metrics["predicted"] == 2


def test_test_dev_run_writes_the_submission_file(tmp_path):
    questions, _ = vqa_set(tmp_path, "test2015", answers=False)
    out = tmp_path / "out"
    assert main(["eval", "vqav2_test_dev", "--questions", str(questions), "--images", str(tmp_path / "images"),
                 "-m", str(OPT), "--out", str(out), "--limit", "4", *FAST]) == 0
    assert [set(r) for r in read_json(out / "results.json")] == [{"question_id", "answer"}] * 4
    assert read_json(out / "metrics.json")["scores"] is None
    assert "No answers to score against" in (out / "report.md").read_text()


def test_gqa_and_nocaps_runs(tmp_path):
    gqa = {}
    for i in range(3):
        save_image(tmp_path / "gqa" / f"n{i}.jpg", i)
        gqa[f"20{i}"] = {"imageId": f"n{i}", "question": "what color?", "answer": "red"}
    (tmp_path / "gqa.json").write_text(json.dumps(gqa))
    out = tmp_path / "gqa_out"
    assert main(["eval", "gqa", "--annotations", str(tmp_path / "gqa.json"), "--images", str(tmp_path / "gqa"),
                 "-m", str(OPT), "--out", str(out), *FAST]) == 0
    assert sorted(r["questionId"] for r in read_json(out / "results.json")) == ["200", "201", "202"]
    images, anns = [], []
    for i, domain in enumerate(["in-domain", "near-domain", "out-domain", "in-domain"]):
        save_image(tmp_path / "nocaps" / f"{i:04d}.jpg", i)
        images.append({"id": i, "file_name": f"{i:04d}.jpg", "domain": domain})
        anns += [{"image_id": i, "id": 10 * i + k, "caption": c} for k, c in enumerate(["a dog", "a cat on a mat"])]
    (tmp_path / "nocaps.json").write_text(json.dumps({"images": images, "annotations": anns}))
    out = tmp_path / "nocaps_out"
    assert main(["eval", "nocaps", "--annotations", str(tmp_path / "nocaps.json"), "--images",
                 str(tmp_path / "nocaps"), "-m", str(OPT), "--out", str(out), *FAST]) == 0
    scores = read_json(out / "metrics.json")["scores"]
    assert {k: v["scored"] for k, v in scores["subsets"].items()} == {"in-domain": 2, "near-domain": 1,
                                                                       "out-domain": 1}


def test_recall_follows_lavis_ranks():
    from mlx_blip2.evaluation.metrics.retrieval import recall_at_k

    # 2 images, 3 texts (image 0: texts 0 and 1; image 1: text 2)
    i2t = np.array([[0.1, 0.9, 0.5], [0.8, 0.7, 0.6]])  # image 0: best is its text 1 (rank 0); image 1: rank 2
    t2i = np.array([[0.9, 0.1], [0.2, 0.3], [0.4, 0.6]])  # text 0 rank 0, text 1 rank 1, text 2 rank 0
    out = recall_at_k(i2t, t2i, [[0, 1], [2]], [0, 0, 1])
    assert (out["txt_r1"], out["txt_r5"], out["img_r1"], out["img_r5"]) == (50.0, 100.0, pytest.approx(200 / 3), 100.0)
    assert out["r_mean"] == pytest.approx(((50 + 100 + 100) / 3 + (200 / 3 + 100 + 100) / 3) / 2)


def test_retrieval_run_reranks_itc_candidates_with_itm(tmp_path):
    from mlx_blip2.evaluation.metrics.retrieval import recall_at_k

    entries = []
    for i in range(4):
        save_image(tmp_path / "images" / f"{1000 + i}.jpg", i)
        entries.append({"image": f"flickr30k-images/{1000 + i}.jpg", "caption": [f"A dog, number {i}.", "a CAT"]})
    ann = tmp_path / "flickr30k_test.json"
    ann.write_text(json.dumps(entries))
    itm = FIXTURES / "tiny-blip2-itm"
    runs = {}
    for k in (8, 2):
        out = tmp_path / f"k{k}"
        assert main(["eval", "flickr30k_retrieval", "--annotations", str(ann), "--images", str(tmp_path / "images"),
                     "-m", str(itm), "--out", str(out), "--k-test", str(k), "--no-progress"]) == 0
        runs[k] = read_json(out / "metrics.json")
        assert runs[k]["recipe"]["k_test"] == k
        rankings = read_json(out / "results.json")
        assert sorted(rankings["i2t"]) == ["1000", "1001", "1002", "1003"] and len(rankings["t2i"]) == 8
    # k_test covering every pair: LAVIS's score is ITM match logit + ITC similarity for all of them
    pipe = mlx_blip2.load(itm)
    images = [str(tmp_path / "images" / f"{1000 + i}.jpg") for i in range(4)]
    texts = [t for i in range(4) for t in (f"a dog, number {i}", "a cat")]  # LAVIS's caption processing
    itc = pipe.similarity(images, texts)
    logits = np.stack([pipe.itm_scores(pipe.image_features([im]), texts)[0] for im in images])
    full = logits + itc
    expected = recall_at_k(full, full.T, [[2 * i, 2 * i + 1] for i in range(4)], [i // 2 for i in range(8)])
    assert runs[8]["scores"]["metrics"] == pytest.approx(expected, abs=1e-4)
    # k_test 2: only each query's two best ITC candidates are re-scored, the rest score -100 (LAVIS)
    i2t = np.full_like(full, -100.0)
    for i, row in enumerate(np.argsort(-itc, axis=1, kind="stable")[:, :2]):
        i2t[i, row] = full[i, row]
    t2i = np.full_like(full.T, -100.0)
    for t, row in enumerate(np.argsort(-itc.T, axis=1, kind="stable")[:, :2]):
        t2i[t, row] = full.T[t, row]
    expected = recall_at_k(i2t, t2i, [[2 * i, 2 * i + 1] for i in range(4)], [i // 2 for i in range(8)])
    assert runs[2]["scores"]["metrics"] == pytest.approx(expected, abs=1e-4)


LAUNCH = Path(__import__("sys").executable).parent / "mlx.launch"


@pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed")
def test_two_ranks_give_the_results_of_one_process(tmp_path):
    import random
    import subprocess
    import sys

    ann = karpathy_set(tmp_path, 6)
    args = ["coco_caption", "--annotations", str(ann), "--images", str(tmp_path / "images"), "-m", str(OPT), *FAST]
    assert main(["eval", *args, "--out", str(tmp_path / "one")]) == 0
    port = str(random.randrange(20000, 60000, 16))
    proc = subprocess.run([str(LAUNCH), "-n", "2", "--starting-port", port, "--", sys.executable, "-m", "mlx_blip2",
                           "eval", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read_json(tmp_path / "two" / "results.json") == read_json(tmp_path / "one" / "results.json")
    assert not list((tmp_path / "two").glob(".records.jsonl.part-*"))  # merged into records.jsonl, then removed
    lines = (tmp_path / "two" / "records.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["key"] for line in lines) == [str(i) for i in range(1, 7)]
