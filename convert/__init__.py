"""``mlx-blip2-convert``: Hub BLIP-2 checkpoints to MLX format (float16/bfloat16/float32, or 2-8-bit quantized).

Installed as ``mlx_blip2.convert`` (the source lives in the top-level ``convert/`` folder). Run it as
``mlx-blip2-convert --hf-path Salesforce/blip2-opt-2.7b --mlx-path blip2-4bit -q`` or ``python -m mlx_blip2.convert``;
from Python, ``from mlx_blip2.convert import convert``. Note that the ``convert`` attribute of this package is the
function; the module is ``importlib.import_module("mlx_blip2.convert.convert")``.
"""

from mlx_blip2.convert.convert import QUANT_RECIPES, convert, main

__all__ = ["QUANT_RECIPES", "convert", "main"]
