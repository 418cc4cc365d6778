"""What several subcommands share: the model flags, the generation flags (generated from the one declaration of
generation options) and loading a checkpoint of the kind a command needs."""

from __future__ import annotations

import argparse

from ..generation.options import OPTION_FIELDS, PUBLIC_OPTIONS, option_kind

# Flags that would only confuse a command line: several sequences per image, and beam search's stopping rule.
CLI_EXCLUDED = ("num_return_sequences", "early_stopping")
CLI_OPTIONS = tuple(name for name in PUBLIC_OPTIONS if name not in CLI_EXCLUDED)


def add_model_args(p: argparse.ArgumentParser, default_hint: str = "Salesforce/blip2-opt-2.7b") -> None:
    p.add_argument("--model", "-m", default=None, help=f"checkpoint directory or Hub repo id (default: {default_hint})")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute precision (default: float32 on the CPU, float16 on a GPU)")


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """One flag per public generation option; unset ones keep the task's recipe (LAVIS's)."""
    g = p.add_argument_group("generation (defaults: LAVIS's recipe for the task)")
    for name in CLI_OPTIONS:
        kind = option_kind(name)
        flag = "--" + name.replace("_", "-")
        g.add_argument(flag, dest=name, type=_bool if kind is bool else kind, metavar=name.upper() if kind is not bool
                       else "{true,false}", help=OPTION_FIELDS[name].metadata["help"])


def generation_kwargs(args) -> dict:
    """The generation flags that were given."""
    return {k: getattr(args, k) for k in CLI_OPTIONS if getattr(args, k, None) is not None}


def load_pipeline(args, kind: str, command: str, default: str | None = None):
    """The checkpoint of ``--model`` (or ``default``) as a pipeline of ``kind`` ("captioning" or "retrieval");
    a checkpoint of another kind is a usage error that says which kind ``command`` needs."""
    import mlx.core as mx

    from ..models.loading import resolve_checkpoint
    from ..models.registry import require_kind
    from ..pipelines import DEFAULT_MODEL, load

    model = args.model or default or DEFAULT_MODEL
    require_kind(resolve_checkpoint(model), kind, command)
    return load(model, dtype=getattr(mx, args.dtype) if args.dtype else None)
