"""The ``mlx-blip2`` command; one module per subcommand, each with ``add_parser(subparsers)`` and ``run(args)``.

Only the subcommand being run is imported (``mlx-blip2 --help`` imports none): a command line answers its help and
usage errors at once, without loading MLX, the web stack or the library machinery.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> the one-line summary `mlx-blip2 --help` lists (each module's add_parser says the same; a test checks).
COMMANDS = {
    "caption": "caption images, folders and photo libraries",
    "ask": "answer a question about an image",
    "index": "add folders of photos to a searchable index",
    "search": "find indexed photos matching a text",
    "duplicates": "list groups of near-duplicate photos in an index",
    "serve": "serve captioning, VQA and retrieval over HTTP (needs the server extra)",
    "finetune": "fine-tune a captioning model on your captions (LoRA, Q-Former, ViT)",
    "eval": "score a checkpoint on COCO, NoCaps, Flickr30k, VQAv2, OK-VQA, GQA or retrieval",
    "doctor": "report the MLX device and which BLAS the CPU backend uses",
}


class Parser(argparse.ArgumentParser):
    """A usage error is one line (the mistake and where the help is), not the whole usage first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def command_module(name: str):
    return importlib.import_module(f".{name}", __name__)


def build_parser(only=None) -> argparse.ArgumentParser:
    """The parser: the subcommands named in ``only`` (all when None) in full, the others' names alone (their
    modules not imported)."""
    parser = Parser(prog="mlx-blip2", description="BLIP-2 captioning, VQA and photo search with MLX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, summary in COMMANDS.items():
        if only is None or name in only:
            module = command_module(name)
            module.add_parser(sub).set_defaults(func=module.run)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand a command line names (the first word that is one), if any."""
    for word in argv:
        if word in COMMANDS:
            return word
        if not word.startswith("-"):
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = chosen_command(argv)
    args = build_parser([command] if command else []).parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # bad input, options or checkpoint: a message, never a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
