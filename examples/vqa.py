"""Ask BLIP-2 questions about an image. The image is encoded once for all the questions.

    python examples/vqa.py [--model Salesforce/blip2-opt-2.7b] [--image IMAGE]
"""

import argparse
from pathlib import Path

from mlx_blip2.pipelines import load

HERE = Path(__file__).resolve().parent
parser = argparse.ArgumentParser()
parser.add_argument("--model", default="Salesforce/blip2-opt-2.7b")
parser.add_argument("--image", default=str(HERE / "images" / "gradient.png"))
args = parser.parse_args()

pipe = load(args.model)
questions = ["what is in the picture?", "what colour is it?", "is it day or night?"]
for question, answer in zip(questions, pipe.ask(args.image, questions)):
    print(f"Q: {question}\nA: {answer}")
