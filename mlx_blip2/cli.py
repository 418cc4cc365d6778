"""The ``mlx-blip2`` command: caption images and answer questions about them."""

from __future__ import annotations

import argparse
import sys

from . import _blas  # importing the package already preloaded the BLAS (mlx_blip2/__init__.py)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="checkpoint directory or Hub repo id "
                   "(default: Salesforce/blip2-opt-2.7b)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute precision (default: float32 on the CPU, float16 on a GPU)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Options of ``generate``; unset ones keep the task's recipe (see ``mlx_blip2.pipeline``)."""
    g = p.add_argument_group("generation (defaults: LAVIS's recipe for the task)")
    g.add_argument("--max-new-tokens", type=int, help="most tokens to generate")
    g.add_argument("--min-new-tokens", type=int, help="fewest tokens to generate")
    g.add_argument("--num-beams", type=int, help="beam width (1 = greedy)")
    g.add_argument("--length-penalty", type=float, help="beam score length exponent")
    g.add_argument("--temperature", type=float, help="sample with this temperature instead of beam search")
    g.add_argument("--top-p", type=float, help="sample from the smallest set of tokens with this probability")
    g.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    g.add_argument("--repetition-penalty", type=float, help="penalise tokens already in the text (>1)")
    g.add_argument("--no-repeat-ngram-size", type=int, help="forbid repeating n-grams of this size")
    g.add_argument("--seed", type=int, help="random seed for sampling")


GENERATION_OPTIONS = ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "temperature", "top_p",
                      "top_k", "repetition_penalty", "no_repeat_ngram_size", "seed")


def generation_kwargs(args) -> dict:
    return {k: getattr(args, k) for k in GENERATION_OPTIONS if getattr(args, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-blip2", description="BLIP-2 captioning and VQA with MLX")
    sub = parser.add_subparsers(dest="command", required=True)

    from .library import add_caption_parser

    add_caption_parser(sub)  # files, folders, photo libraries: see mlx_blip2/library.py

    ask = sub.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", help="image file")
    ask.add_argument("question", help="the question")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated (greedy or "
                     "sampling)")
    add_model_args(ask)
    add_generation_args(ask)

    sub.add_parser("doctor", help="report the MLX device and which BLAS the CPU backend uses")

    from .photo_index import add_index_parser, add_search_parser

    add_index_parser(sub)
    add_search_parser(sub)

    from .server import add_serve_parser

    add_serve_parser(sub)  # HTTP server: see mlx_blip2/server.py (needs the `server` extra)
    return parser


def _load(args):
    import mlx.core as mx

    from .pipelines import DEFAULT_MODEL, load

    dtype = getattr(mx, args.dtype) if args.dtype else None
    return load(args.model or DEFAULT_MODEL, dtype=dtype)


def cmd_ask(args) -> int:
    pipe = _load(args)
    if not args.stream:
        print(pipe.ask(args.image, args.question, **generation_kwargs(args)))
        return 0
    from .generation.engine import stream_generate
    from .generation.options import VQA_DEFAULTS, VQA_TEMPLATE

    options = {**VQA_DEFAULTS, "num_beams": 1, **generation_kwargs(args)}
    options.pop("length_penalty", None)
    if "temperature" in options or "top_p" in options or "top_k" in options:
        options["do_sample"] = True
    response = None
    for response in stream_generate(pipe.model, pipe.processor, args.image, VQA_TEMPLATE.format(args.question),
                                    eos_token_id=pipe.eos_token_ids(), **options):
        print(response.text, end="", flush=True)
    print()
    if response is not None:
        print(f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s; generation: "
              f"{response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s; peak memory: "
              f"{response.peak_memory:.2f} GB", file=sys.stderr)
    return 0


def cmd_doctor(args) -> int:
    import mlx.core as mx

    library, reason = _blas.status
    print(f"mlx {mx.__version__}, default device: {mx.default_device()}")
    print(f"BLAS: {library or 'reference (slow)' if sys.platform != 'darwin' else 'Accelerate'} ({reason})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = getattr(args, "func", None)  # subcommands registered with set_defaults(func=...)
    if handler is None:
        handler = {"ask": cmd_ask, "doctor": cmd_doctor}[args.command]
    try:
        return handler(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
