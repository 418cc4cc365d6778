"""``mlx-blip2 eval TASK ...``: a benchmark run with LAVIS's recipe; ``mlx-blip2 eval score --task KIND PRED ANN``:
score an existing predictions file (anyone's) with the same scorers."""

from __future__ import annotations

import json
import os
import sys

from .common import add_adapter_arg, add_generation_args, add_model_args, generation_kwargs, load_pipeline

HELP = "score a checkpoint on COCO, NoCaps, Flickr30k, VQAv2, OK-VQA, GQA or retrieval"
SCORE_KINDS = ("caption", "vqa", "gqa")


def add_parser(sub):
    from ..evaluation.recipes import TASKS

    p = sub.add_parser("eval", help=HELP, description=f"{HELP}. `eval score --task KIND PREDICTIONS ANNOTATIONS` "
                       "scores a results file instead of running a model.")
    p.add_argument("task", choices=TASKS + ("score",), help="the benchmark, or `score` to score a predictions file")
    p.add_argument("files", nargs="*", metavar="FILE", help="eval score: PREDICTIONS.json ANNOTATIONS.json")
    # nargs="+": `eval score --task caption PRED ANN` (the files after --task, which argparse would not give to the
    # positional FILE once it has matched `score`)
    p.add_argument("--task", dest="score_task", nargs="+", metavar="KIND",
                   help="eval score: caption (COCO results), vqa or gqa ({question_id, answer} results)")
    p.add_argument("--annotations", help="captions / VQA annotations / GQA questions / retrieval test file")
    p.add_argument("--questions", help="VQAv2 and OK-VQA: the official questions file")
    p.add_argument("--images", help="the folder of the dataset's images")
    p.add_argument("--out", help="output folder (default: eval-TASK); a run there resumes where it stopped")
    p.add_argument("--limit", type=int, help="only the first N items: a quick subset")
    p.add_argument("--batch-size", type=int, default=8, help="rows per engine call (default 8)")
    p.add_argument("--image-size", type=int, help="evaluate at this resolution (default: the checkpoint's)")
    p.add_argument("--k-test", type=int, help="retrieval: ITC candidates re-scored by ITM (default: LAVIS's 128)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-java-metrics", action="store_true",
                   help="leave out METEOR and SPICE (run through pycocoevalcap and Java when both are installed)")
    add_model_args(p)
    add_adapter_arg(p)
    add_generation_args(p)
    return p


def _score(args) -> int:
    from ..evaluation.report import markdown, write_json
    from ..evaluation.scoring import read_predictions, score_task
    from ..evaluation.tasks.captions import read_captions
    from ..evaluation.tasks.data import TaskData
    from ..evaluation.tasks.questions import read_gqa, read_vqa_annotations
    from ..library.atomic import atomic_write

    kind, *more = args.score_task or [None]
    files = more + args.files
    if kind not in SCORE_KINDS or len(files) != 2:
        raise ValueError("eval score needs --task {caption,vqa,gqa} PREDICTIONS.json ANNOTATIONS.json")
    predictions_path, annotations = files
    if kind == "caption":
        data = read_captions(annotations, args.images or "")
    elif kind == "vqa":
        data = TaskData("vqa", [], references=read_vqa_annotations(annotations))
    else:
        data = read_gqa(annotations, args.images or "")
    scores = score_task(data, read_predictions(predictions_path, kind), not args.no_java_metrics)
    print(json.dumps(scores, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        recipe = {"published": []}
        write_json(os.path.join(args.out, "metrics.json"), {"task": kind, "predictions": predictions_path,
                                                             "annotations": annotations, "scores": scores})
        atomic_write(os.path.join(args.out, "report.md"),
                     markdown(kind, recipe, {"predictions": predictions_path}, scores).encode("utf-8"))
    return 0


def run(args) -> int:
    if args.task == "score":
        return _score(args)
    from ..evaluation.evaluate import EvalInputs, evaluate, read_task
    from ..evaluation.recipes import recipe_for
    from ..pipelines import DEFAULT_MODEL

    if args.files or args.score_task:
        raise ValueError("--task and files belong to `eval score`; a run names its task first: eval TASK ...")
    if not args.images:
        raise ValueError(f"eval {args.task} needs --images")
    overrides = generation_kwargs(args)
    kind = "retrieval" if recipe_for(args.task)["kind"] == "retrieval" else "captioning"
    data = read_task(args.task, EvalInputs(args.images, args.annotations, args.questions))  # bad files: before loading
    pipe = load_pipeline(args, kind, f"eval {args.task}")
    checkpoint = args.model or DEFAULT_MODEL
    out = args.out or f"eval-{args.task}"
    metrics = evaluate(pipe, args.task, data, out, checkpoint=checkpoint, adapter=args.adapter, limit=args.limit,
                       overrides=overrides, image_size=args.image_size, k_test=args.k_test, batch_size=args.batch_size,
                       progress=False if args.no_progress else None, java_metrics=not args.no_java_metrics)
    if metrics is None:  # a launched rank other than 0: rank 0 reports
        return 0
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        sys.stdout.write(f.read())
    failed = metrics.get("failed") or {}
    if failed:
        print(f"{len(failed)} item(s) failed (listed in {os.path.join(out, 'metrics.json')}); rerun to retry them",
              file=sys.stderr)
    return 1 if failed else 0
