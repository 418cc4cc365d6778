"""What several subcommands share: the model flags, the generation flags (generated from the one declaration of
generation options) and loading a checkpoint of the kind a command needs."""

from __future__ import annotations

import argparse
import re
import sys

from ..generation.options import (OPTION_FIELDS, PUBLIC_OPTIONS, GenerationOptions, check_value, option_flag,
                                  option_kind)

# Flags that would only confuse a command line: several sequences per image, and beam search's stopping rule.
CLI_EXCLUDED = ("num_return_sequences", "early_stopping")
CLI_OPTIONS = tuple(name for name in PUBLIC_OPTIONS if name not in CLI_EXCLUDED)


def add_model_args(p: argparse.ArgumentParser, default_hint: str = "Salesforce/blip2-opt-2.7b") -> None:
    p.add_argument("--model", "-m", default=None, help=f"checkpoint directory or Hub repo id (default: {default_hint})")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute precision (default: float32 on the CPU, float16 on a GPU)")


def model_dtype(args):
    """The ``mx.Dtype`` that ``--dtype`` names, or None for the default."""
    if not args.dtype:
        return None
    import mlx.core as mx

    return getattr(mx, args.dtype)


def add_adapter_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a fine-tuned adapter directory (from mlx-blip2 finetune) applied to the model")


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def flag(name: str) -> str:
    return option_flag(name)


def option_type(name: str):
    """The argparse type of an option's flag: its value converted and checked against the option's range, so that a
    mistake is reported by the flag the user typed (``argument --max-new-tokens: must be in [1, inf), got 0``)."""
    kind = option_kind(name)
    convert = _bool if kind is bool else kind

    def parse(text: str):
        value = convert(text)
        try:
            check_value(name, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(name + " ")) from None
        return value

    parse.__name__ = "true/false" if kind is bool else kind.__name__  # argparse: "invalid float value: 'hot'"
    return parse


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """One flag per public generation option; unset ones keep the task's recipe (LAVIS's)."""
    g = p.add_argument_group("generation (defaults: LAVIS's recipe for the task)")
    for name in CLI_OPTIONS:
        g.add_argument(flag(name), dest=name, type=option_type(name), metavar=name.upper()
                       if option_kind(name) is not bool else "{true,false}", help=OPTION_FIELDS[name].metadata["help"])


def with_flags(message: str) -> str:
    """A generation options message with each option named by its flag."""
    return re.sub(r"\b(" + "|".join(sorted(OPTION_FIELDS, key=len, reverse=True)) + r")\b",
                  lambda m: flag(m.group(1)), message)


def generation_kwargs(args) -> dict:
    """The generation flags that were given; ValueError naming the flags of a combination that cannot work."""
    given = {k: getattr(args, k) for k in CLI_OPTIONS if getattr(args, k, None) is not None}
    try:
        GenerationOptions(**given)
    except ValueError as e:
        raise ValueError(with_flags(str(e))) from None
    return given


def size_text(n_bytes: float) -> str:
    """A memory size a person reads at a glance: MB below a GB (a tiny model's 3 MB is not "0.00 GB")."""
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def peak_memory_text(mlx_peak_bytes: float) -> str:
    """MLX's own peak (``mx.get_peak_memory``: its arrays) and the process's peak resident size (``ru_maxrss``:
    everything, the interpreter and memory-mapped weights included), each named."""
    text = f"peak memory: {size_text(mlx_peak_bytes)} in MLX arrays"
    try:
        import resource
    except ImportError:  # not on Windows
        return text
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return text + f", {size_text(rss if sys.platform == 'darwin' else rss * 1024)} process peak (max RSS)"


def load_pipeline(args, kind: str, command: str, default: str | None = None):
    """The checkpoint of ``--model`` (or ``default``) as a pipeline of ``kind`` ("captioning" or "retrieval");
    a checkpoint of another kind is a usage error that says which kind ``command`` needs."""
    from ..models.loading import resolve_checkpoint
    from ..models.registry import require_kind
    from ..pipelines import DEFAULT_MODEL, load

    model = args.model or default or DEFAULT_MODEL
    require_kind(resolve_checkpoint(model), kind, command)
    with precision_at_load(args):
        return load(model, dtype=model_dtype(args),
                    adapter_path=getattr(args, "adapter", None))


def precision_at_load(args):
    """``--dtype float32`` on a quantized checkpoint: dequantized once at load (float speed on the CPU)."""
    import contextlib

    from ..models.quant import dequantize_at_load

    return dequantize_at_load() if args.dtype == "float32" else contextlib.nullcontext()
