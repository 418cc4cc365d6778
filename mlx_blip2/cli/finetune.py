"""``mlx-blip2 finetune DATA... --output DIR``: teach a captioning checkpoint your captions (an adapter)."""

from __future__ import annotations

import sys

SUMMARY = "fine-tune a captioning model on your captions (LoRA, Q-Former, ViT)"


def add_parser(sub):
    from .common import add_model_args

    p = sub.add_parser("finetune", help=SUMMARY, description=(
        "Train an adapter on captioned images: folders whose images have .txt or XMP (dc:description) sidecars, "
        ".jsonl/.csv tables of image,caption or image,question,answer rows, or COCO caption annotations. Use it "
        "with --adapter DIR on caption/ask/serve, or fuse it with mlx-blip2-convert --adapter DIR."))
    p.add_argument("data", nargs="+", metavar="DATA", help="folders, .jsonl, .csv or COCO .json files")
    p.add_argument("--output", "-o", required=True, help="the adapter directory (checkpoints go in DIR/checkpoints)")
    p.add_argument("--image-root", default=None, help="where relative image paths in tables start (default: the "
                   "table's folder)")
    p.add_argument("--val", nargs="+", default=None, metavar="DATA", help="validation data (else --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of the images held out for validation")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    add_model_args(p)
    _add_training_args(p)
    return p


def _add_training_args(p) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--train", default="qformer", help="what trains, comma-separated: qformer (query tokens, "
                   "Q-Former, projection), vit, lora (default: qformer)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning-rate", "--lr", type=float, default=None,
                   help="peak learning rate (default: 1e-4 with lora, else 1e-5)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--prompt", default=None, help="the caption prompt, as you will caption with ('a photo of')")
    g.add_argument("--max-target-tokens", type=int, default=64)
    g.add_argument("--train-on-prompt", action="store_true", help="score the prompt tokens too")
    g.add_argument("--eval-every", type=int, default=0, help="validation loss and sample captions every N steps")
    g.add_argument("--save-every", type=int, default=0, help="a resumable checkpoint every N steps")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--no-grad-checkpoint", dest="grad_checkpoint", action="store_false",
                   help="keep the activations of frozen stacks instead of recomputing them (faster, more memory)")
    g.add_argument("--quantize", dest="quantize_bits", type=int, default=None, choices=[4, 8],
                   help="QLoRA: quantize the frozen language model in memory to 4 or 8 bits")
    g.add_argument("--lora-rank", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-layers", type=int, default=None, help="LoRA on the last N blocks of each stack "
                   "(default: all)")
    g.add_argument("--lora-keys", default=None, help="comma-separated module paths inside a block (default: the "
                   "q and v attention projections)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def options_from_args(args):
    from ..training.options import TrainOptions
    from ..training.trainable import LoraOptions

    lora = LoraOptions(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                       keys=args.lora_keys.split(",") if args.lora_keys else None, num_layers=args.lora_layers)
    names = ("steps", "epochs", "batch_size", "grad_accumulation", "learning_rate", "warmup_steps", "weight_decay",
             "max_grad_norm", "seed", "prompt", "max_target_tokens", "train_on_prompt", "val_fraction",
             "eval_every", "save_every", "keep_checkpoints", "grad_checkpoint", "quantize_bits")
    return TrainOptions(train=args.train, lora=lora, progress=not args.quiet, **{n: getattr(args, n) for n in names})


def run(args) -> int:
    from ..models.loading import resolve_checkpoint
    from ..models.registry import require_kind
    from ..pipelines import DEFAULT_MODEL
    from ..training.api import finetune
    from .common import model_dtype

    options = options_from_args(args)
    model = args.model or DEFAULT_MODEL
    require_kind(resolve_checkpoint(model), "captioning", "finetune")

    def log(line):
        print(line, file=sys.stderr, flush=True)

    result = finetune(model, args.data, args.output, options, val_data=args.val, image_root=args.image_root,
                      resume=args.resume, log=log, dtype=model_dtype(args))
    for error in dict.fromkeys(result.errors):
        print(f"error: {error}", file=sys.stderr)
    loss = "-" if result.train_loss is None else f"{result.train_loss:.4f}"
    val = "" if result.val_loss is None else f", validation loss {result.val_loss:.4f}"
    state = "interrupted at" if result.interrupted else "trained"
    print(f"{state} step {result.steps}: loss {loss}{val}; adapter in {result.output}", file=sys.stderr)
    return 130 if result.interrupted else 0
