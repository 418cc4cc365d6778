"""``mlx-blip2-convert``'s command line: its flags, each one a :class:`~.options.ConvertOptions` field."""

from __future__ import annotations

import argparse

from .options import AFFINE_BITS, AFFINE_GROUP_SIZES, DTYPES, MODE_DEFAULTS, PROG, QUANT_RECIPES, RECIPE_HELP


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a BLIP-2 checkpoint (Hub repo id or local directory) to MLX format, "
                    "in float16/bfloat16/float32 or quantized. Load the result with "
                    "mlx_blip2.load(PATH) or Blip2ForConditionalGeneration.from_pretrained(PATH).",
        epilog="Recipes for --quant-predicate: " + "; ".join(f"{k}: {v}" for k, v in RECIPE_HELP.items()) + ".",
    )
    p.add_argument("--hf-path", "--model", required=True,
                   help="the checkpoint to convert: a Hub repo id or a local directory")
    p.add_argument("--mlx-path", default="mlx_model", help="where to write the converted model (default: mlx_model)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, choices=AFFINE_BITS, default=None,
                   help="bits per weight (default: 4, or the --q-mode's)")
    p.add_argument("--q-group-size", type=int, choices=(16, *AFFINE_GROUP_SIZES), default=None,
                   help="weights per quantization group (default: 64, or the --q-mode's)")
    p.add_argument("--q-mode", choices=list(MODE_DEFAULTS), default="affine",
                   help="quantization mode (default: affine)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="precision of the weights not quantized (default: float16; bfloat16 for T5). "
                        "The Q-Former stays in float32")
    p.add_argument("--quantize-vision", action="store_true",
                   help="quantize the ViT's linear layers too (default: keep the ViT in --dtype)")
    p.add_argument("--quant-predicate", choices=QUANT_RECIPES, default=None,
                   help="mixed-bit quantization recipe (see below)")
    p.add_argument("-d", "--dequantize", action="store_true",
                   help="turn a quantized MLX checkpoint back into float weights")
    p.add_argument("--upload-repo", default=None, help="Hub repo to upload the converted model to")
    p.add_argument("--force", action="store_true", help="replace --mlx-path if it exists")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="fuse a fine-tuned adapter (from mlx-blip2 finetune) into the weights; with -q, quantized after")
    return p
