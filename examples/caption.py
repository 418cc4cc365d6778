"""Caption images with BLIP-2.

    python examples/caption.py [--model Salesforce/blip2-opt-2.7b] [IMAGE ...]
"""

import argparse
from pathlib import Path

from mlx_blip2.pipelines import load

HERE = Path(__file__).resolve().parent
parser = argparse.ArgumentParser()
parser.add_argument("--model", default="Salesforce/blip2-opt-2.7b")
parser.add_argument("images", nargs="*", default=sorted(str(p) for p in (HERE / "images").glob("*.png")))
args = parser.parse_args()

pipe = load(args.model)
for path, caption in zip(args.images, pipe.caption(args.images)):
    print(f"{path}: {caption}")
print("with a prompt:", pipe.caption(args.images[0], prompt="a photo of"))
