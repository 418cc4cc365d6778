"""The ``mlx-blip2`` command: caption images and answer questions about them."""

from __future__ import annotations

import argparse
import sys

from . import _blas


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="checkpoint directory or Hub repo id "
                   "(default: Salesforce/blip2-opt-2.7b)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="most tokens to generate (default: 30)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="fewest tokens to generate (default: 0)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute precision (default: float32 on the CPU, float16 on a GPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-blip2", description="BLIP-2 captioning and VQA with MLX")
    sub = parser.add_subparsers(dest="command", required=True)

    cap = sub.add_parser("caption", help="caption images")
    cap.add_argument("images", nargs="+", help="image files")
    cap.add_argument("--prompt", default=None, help="text the caption continues, e.g. 'a photo of'")
    _add_generation_args(cap)

    ask = sub.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", help="image file")
    ask.add_argument("question", help="the question")
    _add_generation_args(ask)

    sub.add_parser("doctor", help="report the MLX device and which BLAS the CPU backend uses")
    return parser


def _load(args):
    import mlx.core as mx

    from .pipeline import DEFAULT_MODEL, load

    dtype = getattr(mx, args.dtype) if args.dtype else None
    return load(args.model or DEFAULT_MODEL, dtype=dtype)


def _generation_kwargs(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens}


def cmd_caption(args) -> int:
    from .processing import load_image

    pipe = _load(args)
    failed = 0
    for path in args.images:
        # One unreadable file must not stop the rest.
        try:
            image = load_image(path)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        text = pipe.caption(image, prompt=args.prompt, **_generation_kwargs(args))
        print(f"{path}: {text}" if len(args.images) > 1 else text, flush=True)
    return 1 if failed else 0


def cmd_ask(args) -> int:
    pipe = _load(args)
    print(pipe.ask(args.image, args.question, **_generation_kwargs(args)))
    return 0


def cmd_doctor(args) -> int:
    import mlx.core as mx

    library, reason = _blas.status
    print(f"mlx {mx.__version__}, default device: {mx.default_device()}")
    print(f"BLAS: {library or 'reference (slow)' if sys.platform != 'darwin' else 'Accelerate'} ({reason})")
    return 0


def main(argv: list[str] | None = None) -> int:
    _blas.preload()
    args = build_parser().parse_args(argv)
    handler = {"caption": cmd_caption, "ask": cmd_ask, "doctor": cmd_doctor}[args.command]
    try:
        return handler(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
