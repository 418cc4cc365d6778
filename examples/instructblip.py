"""Caption, ask and give free-form instructions to InstructBLIP (Vicuna or Flan-T5).

    python examples/instructblip.py [--model Salesforce/instructblip-flan-t5-xl] [--image IMAGE]
        [--instruction "What is unusual about this image?"]

The Q-Former reads the instruction too, so each (image, instruction) pair is encoded on its own. Defaults follow
LAVIS's InstructBLIP recipes (see mlx_blip2/pipelines/instructblip.py).
"""

import argparse
from pathlib import Path

from mlx_blip2.pipelines import load

HERE = Path(__file__).resolve().parent
parser = argparse.ArgumentParser()
parser.add_argument("--model", default="Salesforce/instructblip-flan-t5-xl")
parser.add_argument("--image", default=str(HERE / "images" / "gradient.png"))
parser.add_argument("--instruction", default="What is unusual about this image?")
parser.add_argument("--max-new-tokens", type=int, default=None, help="override the recipes' lengths")
args = parser.parse_args()

pipe = load(args.model)
options = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
print("Caption:", pipe.caption(args.image, **options))
questions = ["what is in the picture?", "what colour is it?"]
for question, answer in zip(questions, pipe.ask(args.image, questions, **options)):
    print(f"Q: {question}\nA: {answer}")
print(f"{args.instruction}\n{pipe.describe(args.image, args.instruction, **options)}")
