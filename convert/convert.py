"""Convert a BLIP-2 checkpoint (Hub repo id or local directory) to MLX format, optionally quantized.

What a converted directory holds:

- ``config.json``: the source configuration, with ``dtype`` set to the stored precision and, when quantized, a
  ``quantization`` entry in mlx-lm's format (see :mod:`mlx_blip2.quant`; mirrored as ``quantization_config`` as
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
"""

from __future__ import annotations

import mlx_blip2  # noqa: F401  (first: it loads the optimised BLAS before mlx.core)

import argparse
import copy
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_blip2.models.base import ConfigError
from mlx_blip2.models.loading import CheckpointError, resolve_checkpoint
from mlx_blip2.models.registry import RETRIEVAL, model_spec

PROG = "mlx-blip2-convert"
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# (group size, bits) when not given; the non-affine modes allow only these.
MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)
# mlx-lm's recipe names (``mlx_lm.convert.QUANT_RECIPES``: low and high bits), mapped onto BLIP-2's layers here
# since mlx-lm's builder looks for Llama-style ``down_proj`` layers; plus ``head_8``.
MIXED_RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}
QUANT_RECIPES = [*MIXED_RECIPES, "head_8"]
RECIPE_HELP = {
    "mixed_L_H": "L bits, H bits for the output head, the language projection, the Q-Former (and the ViT), "
                 "and the language model's v_proj and down projection (fc2) in the first and last eighths of "
                 "its layers and every third layer between (mlx-lm's choice, after llama.cpp's Q4_K_M)",
    "head_8": "the output head (token embedding) at 8 bits, everything else at --q-bits",
}
# Support files copied from the source: tokenizer, processor, generation and chat-template files.
COPY_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
NOT_COPIED = {"config.json", "model.safetensors.index.json"}
# Support folders copied with the same patterns: InstructBLIP's second (Q-Former) tokenizer.
SUPPORT_FOLDERS = ("qformer_tokenizer",)
# Retrieval models' ITC projections and ITM head, kept in float.
RETRIEVAL_HEADS = ("vision_projection", "text_projection", "itm_head")
# The language model's down projections, by architecture (OPT: fc2, T5: wo, Llama-style: down_proj).
DOWN_PROJECTIONS = ("fc2", "wo", "down_proj")

Predicate = Callable[[str, nn.Module], Union[bool, dict]]


def info(message: str) -> None:
    print(f"[INFO] {message}", flush=True)


def default_dtype(config: dict[str, Any]) -> str:
    """float16, or bfloat16 for a T5 language model (T5's activations overflow float16)."""
    text = config.get("text_config") or {}
    return "bfloat16" if isinstance(text, dict) and text.get("model_type") == "t5" else "float16"


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The language model's token embedding (its output head too when tied); None for retrieval models."""
    lm = getattr(model, "language_model", None)
    return None if lm is None else lm.get_input_embeddings()


def is_output_head(model: nn.Module, path: str, module: nn.Module) -> bool:
    return module is input_embeddings(model) or path.split(".")[-1] == "lm_head"


def base_predicate(model: nn.Module, quantize_vision: bool) -> Predicate:
    """Which layers are quantized at all (the group-size check is mlx-lm's ``quantize_model``'s)."""
    embed = input_embeddings(model)

    def predicate(path: str, module: nn.Module) -> bool:
        if path.startswith("vision_model."):
            return quantize_vision and isinstance(module, nn.Linear)
        if path.startswith("language_model."):
            # Linear layers and the token embedding (the output head when tied); not the position embeddings.
            return isinstance(module, nn.Linear) or module is embed
        if path.startswith(RETRIEVAL_HEADS):
            return False  # < 1M parameters, and the retrieval code casts activations to their weights' dtype
        return isinstance(module, nn.Linear)  # the Q-Former and the language projection

    return predicate


def recipe_predicate(recipe: str, model: nn.Module, group_size: int, bits: int, mode: str) -> Predicate:
    """Per-layer bits for a named recipe; the dicts it returns become the config's per-layer overrides."""
    if recipe not in QUANT_RECIPES:
        raise ValueError(f"unknown quantization recipe {recipe!r}; choose one of {', '.join(QUANT_RECIPES)}")
    if mode != "affine":
        raise ValueError(f"quantization recipes need --q-mode affine, not {mode!r}")

    def params(b: int) -> dict:
        return {"group_size": group_size, "bits": b, "mode": mode}

    if recipe == "head_8":
        return lambda path, module: params(8) if is_output_head(model, path, module) else True

    low, high = MIXED_RECIPES[recipe]
    num_layers = len(getattr(getattr(model, "language_model", None), "layers", []))

    def predicate(path: str, module: nn.Module) -> dict:
        if is_output_head(model, path, module) or not path.startswith("language_model."):
            return params(high)
        parts = path.split(".")
        index = next((int(p) for p in parts if p.isdigit()), 0)
        more = index < num_layers // 8 or index >= 7 * num_layers // 8 or (index - num_layers // 8) % 3 == 2
        if more and parts[-1] in ("v_proj", *DOWN_PROJECTIONS):
            return params(high)
        return params(low)

    return predicate


def quantization_params(q_bits: int | None, q_group_size: int | None, q_mode: str) -> tuple[int, int]:
    """Resolve and check (group size, bits) for a mode."""
    if q_mode not in MODE_DEFAULTS:
        raise ValueError(f"unknown quantization mode {q_mode!r}; choose one of {', '.join(MODE_DEFAULTS)}")
    group_size, bits = MODE_DEFAULTS[q_mode]
    if q_mode == "affine":
        group_size, bits = q_group_size or group_size, q_bits or bits
        if bits not in AFFINE_BITS:
            raise ValueError(f"--q-bits must be one of {AFFINE_BITS} for affine quantization, not {bits}")
        if group_size not in AFFINE_GROUP_SIZES:
            raise ValueError(f"--q-group-size must be one of {AFFINE_GROUP_SIZES}, not {group_size}")
    elif (q_group_size or group_size, q_bits or bits) != (group_size, bits):
        raise ValueError(f"--q-mode {q_mode} quantizes {bits}-bit in groups of {group_size}; "
                         f"leave out --q-bits/--q-group-size or pass those")
    return group_size, bits


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json; is this a BLIP-2 checkpoint?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    if config.get("model_type", "blip-2") not in ("blip-2", "instructblip"):
        raise ConfigError(f"{path}: model_type is {config['model_type']!r}; expected a BLIP-2 checkpoint ('blip-2') "
                          "or an InstructBLIP one ('instructblip')")
    return config


def save_weights(directory: Path, model: nn.Module) -> None:
    """Safetensors shards and their index (mlx-lm's ``save_model``; the model's arrays are released as written)."""
    from mlx_lm.utils import save_model

    save_model(directory, model, donate_model=True)


def copy_support_files(source: Path, target: Path) -> list[str]:
    copied = []
    for pattern in COPY_PATTERNS:
        for f in sorted(source.glob(pattern)):
            if f.is_file() and f.name not in NOT_COPIED:
                shutil.copy2(f, target / f.name)
                copied.append(f.name)
    for folder in SUPPORT_FOLDERS:  # InstructBLIP's Q-Former tokenizer
        if (source / folder).is_dir():
            (target / folder).mkdir()
            for pattern in COPY_PATTERNS:
                for f in sorted((source / folder).glob(pattern)):
                    if f.is_file():
                        shutil.copy2(f, target / folder / f.name)
                        copied.append(f"{folder}/{f.name}")
    return copied


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("mlx-blip2")
    except Exception:
        return getattr(mlx_blip2, "__version__", "unknown")


def command_line(hf_path, mlx_path, quantize, q_bits, q_group_size, q_mode, dtype, quantize_vision,
                 quant_predicate, dequantize) -> str:
    args = [PROG, "--hf-path", str(hf_path), "--mlx-path", Path(mlx_path).name, "--dtype", dtype]
    if quantize:
        args += ["-q", "--q-bits", str(q_bits), "--q-group-size", str(q_group_size), "--q-mode", q_mode]
        args += ["--quantize-vision"] if quantize_vision else []
        args += ["--quant-predicate", quant_predicate] if isinstance(quant_predicate, str) else []
    if dequantize:
        args.append("--dequantize")
    return shlex.join(args)


def model_card(name: str, base_model: str | None, command: str, precision: str, usage_path: str,
               retrieval: bool = False) -> str:
    from huggingface_hub import ModelCardData

    tags = ["mlx", "blip-2"] + (["image-text-retrieval"] if retrieval else
                                ["image-captioning", "visual-question-answering"])
    data = ModelCardData(library_name="mlx", pipeline_tag="zero-shot-image-classification" if retrieval
                         else "image-to-text", base_model=base_model, tags=tags)
    if retrieval:
        usage = f"""pipe = load("{usage_path}")   # a Blip2RetrievalPipeline
print(pipe.match("photo.jpg", "two cats on a couch"))            # ITM probability
print(pipe.rank("two cats", ["a.jpg", "b.jpg", "c.jpg"], top_k=2))"""
        shell = ""
    else:
        usage = f"""pipe = load("{usage_path}")
print(pipe.caption("photo.jpg"))
print(pipe.ask("photo.jpg", "how many cats are there?"))"""
        shell = f"mlx-blip2 caption photo.jpg --model {usage_path}\n"
    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a local checkpoint"
    return f"""---
{data.to_yaml()}
---

# {name}

BLIP-2 in MLX format, converted from {source} with mlx-blip2 {package_version()} (mlx {mx.__version__}):

```bash
{command}
```

Weights: {precision}

## Use with mlx-blip2

```bash
pip install mlx-blip2
{shell}```

```python
from mlx_blip2 import load

{usage}
```
"""


def describe_precision(dtype: str, quantization: dict | None, quantize_vision: bool, retrieval: bool) -> str:
    if not quantization:
        return f"{dtype} (the Q-Former and query tokens in float32)."
    overrides = {k: v for k, v in quantization.items() if isinstance(v, dict)}
    bits = sorted({quantization["bits"], *(v["bits"] for v in overrides.values())})
    parts = ("the Q-Former (the ITC projections and the ITM head stay float)" if retrieval
             else "the language model, the Q-Former and the projection") + (" and the ViT" if quantize_vision else "")
    mixed = f" (mixed: {', '.join(map(str, bits))} bits per layer)" if len(bits) > 1 else ""
    return (f"{quantization['bits']}-bit {quantization.get('mode', 'affine')} quantization in groups of "
            f"{quantization['group_size']}{mixed} for the linear layers of {parts}; the rest in {dtype} "
            f"(the Q-Former's other parameters in float32).")


def directory_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def move_into_place(tmp: Path, target: Path) -> None:
    """Replace ``target`` by ``tmp`` (same file system) leaving at no time a half-written directory there."""
    if not (target.exists() or target.is_symlink()):
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old / target.name, target)  # put the old one back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def validate_upload_repo(upload_repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(upload_repo)
    except HFValidationError as e:
        raise ValueError(f"--upload-repo {upload_repo!r} is not a valid Hub repo id: {e}") from None


class UploadError(RuntimeError):
    """The upload to the Hub failed (the converted directory is kept)."""


def upload(mlx_path: Path, upload_repo: str) -> str:
    """Create the Hub repo if needed and upload the converted directory; returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id=upload_repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(mlx_path), repo_id=upload_repo, repo_type="model",
                          commit_message=f"Upload BLIP-2 converted to MLX with {PROG}")
    except Exception as e:
        raise UploadError(f"uploading {mlx_path} to the Hub repo {upload_repo!r} failed ({type(e).__name__}: "
                           f"{e}); the converted model is in {mlx_path}, upload it again with "
                           f"`hf upload {upload_repo} {mlx_path}`") from e
    return str(url)


def convert(
    hf_path: str | os.PathLike,
    mlx_path: str | os.PathLike = "mlx_model",
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    dtype: str | mx.Dtype | None = None,
    quantize_vision: bool = False,
    quant_predicate: str | Predicate | None = None,
    dequantize: bool = False,
    upload_repo: str | None = None,
    force: bool = False,
) -> Path:
    """Convert ``hf_path`` (a Hub repo id or a local directory, original or converted) into ``mlx_path``.

    ``q_bits``/``q_group_size`` default to the mode's (affine: 4 bits in groups of 64). ``dtype`` ("float16",
    "bfloat16", "float32" or an ``mx`` dtype) is the precision of everything not quantized outside the Q-Former;
    it defaults to float16 (bfloat16 for T5). ``quant_predicate`` is a recipe name (:data:`QUANT_RECIPES`) or, as
    in mlx-lm, a callable ``(path, module) -> bool | dict``. ``dequantize`` turns a quantized MLX checkpoint back
    into float weights. An existing ``mlx_path`` is an error unless ``force``. Returns ``mlx_path``.
    """
    start = time.perf_counter()
    # --- check everything that can be checked before the (long) load ---
    if quantize and dequantize:
        raise ValueError("choose either quantize or dequantize, not both")
    if not quantize and (quantize_vision or quant_predicate is not None):
        raise ValueError("--quantize-vision and --quant-predicate only apply with -q/--quantize")
    group_size, bits = quantization_params(q_bits, q_group_size, q_mode) if quantize else (None, None)
    if isinstance(quant_predicate, str) and quant_predicate not in QUANT_RECIPES:
        raise ValueError(f"unknown --quant-predicate {quant_predicate!r}; choose one of {', '.join(QUANT_RECIPES)}")
    if isinstance(quant_predicate, str) and q_mode != "affine":
        raise ValueError(f"quantization recipes need --q-mode affine, not {q_mode!r}")
    if isinstance(dtype, mx.Dtype):
        dtype = next((name for name, d in DTYPES.items() if d == dtype), str(dtype))
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if upload_repo is not None:
        validate_upload_repo(upload_repo)
    mlx_path = Path(mlx_path).expanduser()
    if (mlx_path.exists() or mlx_path.is_symlink()) and not force:
        raise FileExistsError(f"{mlx_path} already exists; choose another --mlx-path or pass --force to replace it")

    source = resolve_checkpoint(hf_path)
    config = read_config(source)
    if force and mlx_path.exists() and source.resolve().is_relative_to(mlx_path.resolve()) \
            and source.resolve() != mlx_path.resolve():
        raise ValueError(f"--force would delete {mlx_path}, which holds the source checkpoint {source}")
    quantized = bool(config.get("quantization"))
    if quantize and quantized:
        raise ValueError(f"{hf_path} is already quantized; convert the original checkpoint, or dequantize first (-d)")
    if dequantize and not quantized:
        raise ValueError(f"{hf_path} is not quantized; there is nothing to dequantize")
    dtype = dtype or default_dtype(config)

    # --- load, (de)quantize ---
    info(f"Loading {hf_path} in {dtype}")
    spec = model_spec(config)
    retrieval = spec.kind == RETRIEVAL
    model = spec.model_class.from_pretrained(source, dtype=DTYPES[dtype])
    config = copy.deepcopy(config)
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype
    if dequantize:
        from mlx_lm.utils import dequantize_model

        info("Dequantizing")
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if quantize:
        from mlx_lm.utils import quantize_model

        base = base_predicate(model, quantize_vision)
        if isinstance(quant_predicate, str):
            recipe = recipe_predicate(quant_predicate, model, group_size, bits, q_mode)
        else:
            recipe = quant_predicate

        def predicate(path: str, module: nn.Module):
            if not base(path, module):
                return False
            return True if recipe is None else recipe(path, module)

        info(f"Quantizing: {bits}-bit {q_mode}, group size {group_size}"
             + (f", recipe {quant_predicate}" if isinstance(quant_predicate, str) else ""))
        model, config = quantize_model(model, config, group_size, bits, mode=q_mode, quant_predicate=predicate)

    # --- write into a temporary directory next to the target, then move it into place ---
    mlx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mlx_path.name}.", suffix=".partial", dir=mlx_path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should be like any new directory
        info(f"Saving to {mlx_path}")
        save_weights(tmp, model)
        del model
        copy_support_files(source, tmp)
        is_local = Path(hf_path).expanduser().is_dir()
        command = command_line(hf_path, mlx_path, quantize, bits, group_size, q_mode, dtype, quantize_vision,
                               quant_predicate, dequantize)
        precision = describe_precision(dtype, config.get("quantization"), quantize_vision, retrieval)
        card = model_card(mlx_path.name, None if is_local else str(hf_path), command, precision,
                          upload_repo or str(mlx_path), retrieval)
        (tmp / "README.md").write_text(card)
        from mlx_lm.utils import save_config

        save_config(config, tmp / "config.json", keep_vision_config=True)  # last: a partial directory won't load
        move_into_place(tmp, mlx_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info(f"Wrote {mlx_path} ({directory_size(mlx_path) / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")

    if upload_repo is not None:
        info(f"Uploading to {upload_repo}")
        info(f"Uploaded: {upload(mlx_path, upload_repo)}")
    return mlx_path


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert(**vars(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, UploadError) as e:  # CheckpointError and ConfigError are ValueErrors
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
