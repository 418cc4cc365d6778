"""Convert a BLIP-2 checkpoint (Hub repo id or local directory) to MLX format, optionally quantized.

What a converted directory holds:

- ``config.json``: the source configuration, with ``dtype`` set to the stored precision and, when quantized, a
  ``quantization`` entry in mlx-lm's format (see :mod:`mlx_blip2.models.quant`; mirrored as ``quantization_config`` as
  mlx-lm writes it);
- ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards (at most 5 GiB each, mlx-lm's limit) and
  ``model.safetensors.index.json``, in the library's own (MLX) weight layout;
- the source's tokenizer, processor and generation files, copied unchanged;
- ``README.md``, a short model card saying how it was made.

Precision: the vision model and the language model are stored in ``dtype`` (float16 by default, bfloat16 when the
language model is T5, which overflows in float16). The Q-Former and the query tokens are kept in float32 (their
non-quantized parameters), as transformers keeps them (``_keep_in_fp32_modules``) and as
``Blip2ForConditionalGeneration.from_pretrained`` computes them whatever its ``dtype``: a float16 conversion then
computes exactly what the source checkpoint loaded with ``dtype=mx.float16`` computes, at a small cost in size
(the Q-Former is ~4% of blip2-opt-2.7b's parameters, and its linear layers are quantized by default).

Quantization (``-q``) covers the language model's linear layers and its token embedding (the output head when tied),
the Q-Former's linear layers and the language projection; the ViT only with ``--quantize-vision``. Layers whose
input dimension is not a multiple of the group size are left in float. ``--quant-predicate`` picks a mixed-bit
recipe; its per-layer choices are written into the ``quantization`` entry. Retrieval checkpoints
(``Blip2ForImageTextRetrieval``) convert too: there the Q-Former is quantized, its small heads stay float.
T5 checkpoints follow the loader's rules (in float16, T5's ``wo`` weights stay float32, as in transformers).

The conversion is written to a hidden temporary directory next to the target and moved into place at the end
(``config.json`` is written last), so an interrupted conversion leaves nothing that loads as a model.

The steps live in their own modules: :mod:`.options` (what to do, checked up front), :mod:`.mapping` (the source:
its config, the registry's class for it, loading in the target precision), :mod:`.quantize` (which layers, how many
bits), :mod:`.writing` (weights, support files, model card, move into place, upload) and :mod:`.cli` (the flags).
``--adapter DIR`` fuses a fine-tuned adapter (:func:`mlx_blip2.models.adapters.fuse_adapter`) into the weights
before any quantization.
"""

from __future__ import annotations

import mlx_blip2  # noqa: F401  (first: it loads the optimised BLAS before mlx.core)

import os
import shutil
import sys
import time
from pathlib import Path

from mlx_blip2.models.adapters import fuse_adapter

from .cli import build_parser
from .mapping import (default_dtype, dequantize, is_retrieval, load_model, open_source,  # noqa: F401 (re-exported)
                      read_config, target_config)
from .options import PROG, QUANT_RECIPES, ConvertOptions  # noqa: F401 (re-exported)
from .quantize import quantize
from .writing import (UploadError, card, copy_support_files, directory_size, move_into_place,  # noqa: F401
                      save_weights, temporary_directory, upload)


def info(message: str) -> None:
    print(f"[INFO] {message}", flush=True)


def convert(hf_path: str | os.PathLike, mlx_path: str | os.PathLike = "mlx_model",
            options: ConvertOptions | None = None, **settings) -> Path:
    """Convert ``hf_path`` (a Hub repo id or a local directory, original or converted) into ``mlx_path``.

    ``options`` (or the same fields as keyword arguments: ``quantize=True, q_bits=8, dtype="float16"``...) say how;
    see :class:`~.options.ConvertOptions`. Everything that can be checked is checked before the (long) load.
    Returns ``mlx_path``.
    """
    start = time.perf_counter()
    options = options.replace(**settings) if options is not None else ConvertOptions(**settings)
    mlx_path = Path(mlx_path).expanduser()
    if (mlx_path.exists() or mlx_path.is_symlink()) and not options.force:
        raise FileExistsError(f"{mlx_path} already exists; choose another --mlx-path or pass --force to replace it")
    source, config, spec = open_source(hf_path, mlx_path, options)
    dtype = options.dtype or default_dtype(config)

    info(f"Loading {hf_path} in {dtype}")
    model = load_model(source, spec, dtype)
    config = target_config(config, dtype)
    if options.adapter is not None:
        info(f"Fusing the adapter {options.adapter}")
        model = fuse_adapter(model, options.adapter)
    if options.dequantize:
        info("Dequantizing")
        model, config = dequantize(model, config)
    if options.quantize:
        model, config = quantize(model, config, options, info)

    readme = card(hf_path, mlx_path, options, dtype, config, is_retrieval(spec))
    write(mlx_path, source, model, config, readme)
    del model
    info(f"Wrote {mlx_path} ({directory_size(mlx_path) / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    if options.upload_repo is not None:
        info(f"Uploading to {options.upload_repo}")
        info(f"Uploaded: {upload(mlx_path, options.upload_repo)}")
    return mlx_path


def write(mlx_path: Path, source: Path, model, config: dict, readme: str) -> None:
    """Weights, support files, model card and (last, so that a partial directory never loads) config.json, into a
    temporary directory moved into place at the end; on any failure nothing is left behind."""
    from mlx_lm.utils import save_config

    tmp = temporary_directory(mlx_path)
    try:
        info(f"Saving to {mlx_path}")
        save_weights(tmp, model)
        copy_support_files(source, tmp)
        (tmp / "README.md").write_text(readme)
        save_config(config, tmp / "config.json", keep_vision_config=True)
        move_into_place(tmp, mlx_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = vars(args)
    try:
        convert(settings.pop("hf_path"), settings.pop("mlx_path"), ConvertOptions(**settings))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, UploadError) as e:  # CheckpointError and ConfigError are ValueErrors
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
