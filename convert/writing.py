"""The target side of a conversion: weights, support files, a model card, the move into place, the upload."""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

import mlx_blip2

from .options import PROG, ConvertOptions

# Support files copied from the source: tokenizer, processor, generation and chat-template files.
COPY_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
NOT_COPIED = {"config.json", "model.safetensors.index.json"}
# Support folders copied with the same patterns: InstructBLIP's second (Q-Former) tokenizer.
SUPPORT_FOLDERS = ("qformer_tokenizer",)


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


def command_line(hf_path, mlx_path: Path, options: ConvertOptions, dtype: str) -> str:
    group_size, bits = options.group_size_and_bits
    args = [PROG, "--hf-path", str(hf_path), "--mlx-path", Path(mlx_path).name, "--dtype", dtype]
    if options.quantize:
        args += ["-q", "--q-bits", str(bits), "--q-group-size", str(group_size), "--q-mode", options.q_mode]
        args += ["--quantize-vision"] if options.quantize_vision else []
        pred = options.quant_predicate
        args += ["--quant-predicate", pred] if isinstance(pred, str) else []
    if options.dequantize:
        args.append("--dequantize")
    if options.adapter is not None:
        args += ["--adapter", Path(options.adapter).name]
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


def card(hf_path, mlx_path: Path, options: ConvertOptions, dtype: str, config: dict, retrieval: bool) -> str:
    """The converted directory's README.md: how it was made, its precision, how to use it."""
    is_local = Path(hf_path).expanduser().is_dir()
    precision = describe_precision(dtype, config.get("quantization"), options.quantize_vision, retrieval)
    return model_card(mlx_path.name, None if is_local else str(hf_path), command_line(hf_path, mlx_path, options, dtype),
                      precision, options.upload_repo or str(mlx_path), retrieval)


def temporary_directory(mlx_path: Path) -> Path:
    """A hidden directory next to the target (same file system), with the permissions of any new directory."""
    mlx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mlx_path.name}.", suffix=".partial", dir=mlx_path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should be like any new directory
    return tmp
