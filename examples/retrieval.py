"""Image-text retrieval with BLIP-2: ITC similarity, ITM matching and ranking images for a text.

    python examples/retrieval.py [--model Salesforce/blip2-itm-vit-g] [IMAGE ...]
"""

import argparse
from pathlib import Path

from mlx_blip2.pipelines import load

HERE = Path(__file__).resolve().parent
parser = argparse.ArgumentParser()
parser.add_argument("--model", default="Salesforce/blip2-itm-vit-g")
parser.add_argument("images", nargs="*", default=sorted(str(p) for p in (HERE / "images").glob("*.png")))
args = parser.parse_args()

pipe = load(args.model)  # a retrieval checkpoint gives the retrieval pipeline
texts = ["a smooth colour gradient", "random coloured noise", "a photo of a cat"]

# ITC: cosine similarity of the best-matching query embedding, every image against every text.
similarity = pipe.similarity(args.images, texts)
for path, row in zip(args.images, similarity):
    print(Path(path).name, "ITC:", "  ".join(f"{t!r} {s:+.3f}" for t, s in zip(texts, row)))

# ITM: probability that the image shows the text (image and text attend to each other; slower, sharper).
for path in args.images:
    probs = pipe.match(path, texts)
    print(Path(path).name, "ITM:", "  ".join(f"{t!r} {p:.1%}" for t, p in zip(texts, probs)))

# Rank the images for a text: ITC for all, ITM re-scores the best candidates (as LAVIS evaluates retrieval).
for r in pipe.rank(texts[0], args.images, top_k=len(args.images)):
    print(f"{r.score:+.3f} (ITC {r.itc:+.3f}, ITM {r.itm:.1%})  {Path(args.images[r.index]).name}")

# Embeddings to store and compare later: (num_query_tokens, dim) per image, (dim,) per text.
image_embeds, text_embed = pipe.embed_images(args.images), pipe.embed_texts(texts[0])
print("image embeddings", image_embeds.shape, "text embedding", text_embed.shape)
