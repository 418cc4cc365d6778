"""``mlx-blip2 ask IMAGE QUESTION``: visual question answering, optionally streamed."""

from __future__ import annotations

import sys

from .common import (add_adapter_arg, add_generation_args, add_model_args, generation_kwargs, load_pipeline,
                     peak_memory_text)


def add_parser(sub):
    p = sub.add_parser("ask", help="answer a question about an image")
    p.add_argument("image", help="image file")
    p.add_argument("question", help="the question")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated (greedy or sampling)")
    add_model_args(p)
    add_adapter_arg(p)
    add_generation_args(p)
    return p


def run(args) -> int:
    kwargs = generation_kwargs(args)  # checked before the model loads
    pipe = load_pipeline(args, "captioning", "ask")
    if not args.stream:
        print(pipe.ask(args.image, args.question, **kwargs))
        return 0
    from ..pipelines.engine import Row
    from ..generation.options import OPTION_FLAGS
    from ..generation.recipes import resolve_recipe

    options = resolve_recipe(pipe.vqa_defaults, kwargs, stream=True, names=OPTION_FLAGS)
    response = None
    for response in pipe.engine.stream(Row(image=args.image, prompt=pipe.vqa_template.format(args.question)),
                                       options):
        print(response.text, end="", flush=True)
    print()
    if response is not None:
        print(f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s; generation: "
              f"{response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s; "
              f"{peak_memory_text(response.peak_memory * 1e9)}", file=sys.stderr)
    return 0
