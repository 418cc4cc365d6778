"""Finding a checkpoint (local directory or Hub repo id), reading its safetensors weights and loading them into a
model (quantized layers rebuilt, dtypes cast)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .quant import quantize_from_config, settle_cpu_precision
from .t5 import FP32_SUFFIXES as T5_FP32_SUFFIXES

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.md"]
# transformers keeps these in float32 whatever the model's dtype (``_keep_in_fp32_modules``).
FP32_PREFIXES = ("qformer.", "query_tokens")


class CheckpointError(ValueError):
    """A checkpoint that is missing files or holds the wrong weights."""


def resolve_checkpoint(path_or_repo_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hub repo id, downloaded to (or found in) the Hub cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory or a Hub repo id")
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise CheckpointError(
            f"'{repo_id}' is not in the Hugging Face cache and {why}; download it once with network access "
            f"(hf download {repo_id}) or pass a local directory"
        ) from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"'{repo_id}' is neither a local directory nor a Hub repository") from e


def load_safetensors(directory: Path) -> dict[str, mx.array]:
    """All weights of a checkpoint: one ``model.safetensors`` or the shards its index lists."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise CheckpointError(f"{directory}: shards listed in {index.name} are missing: {', '.join(missing)}")
        files = [directory / s for s in shards]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        hint = " (PyTorch .bin checkpoints are not supported; convert them to safetensors)" if any(
            directory.glob("*.bin")) else ""
        raise CheckpointError(f"{directory}: no *.safetensors weights found (the directory holds {found}){hint}")
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx reports a bare runtime error; say which file broke.
            raise CheckpointError(f"cannot read weights from {f}: {e}") from e
    return weights


def load_weights(model: nn.Module, directory, weights: dict[str, mx.array], dtype: mx.Dtype | None = None,
                 drop_unused: bool = False) -> nn.Module:
    """Rebuild quantized layers, cast and load ``weights`` strictly: the loading path of every BLIP-2 class.

    ``drop_unused`` lets a class that needs part of a checkpoint (retrieval's vision or text tower) skip the rest;
    ``mx.load`` is lazy, so skipped weights are never read.
    """
    config, asked = model.config, dtype
    quantize_from_config(model, config.quantization, weights)
    if drop_unused:
        wanted = {k for k, _ in tree_flatten(model.parameters())}
        missing = sorted(wanted - set(weights))
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise CheckpointError(f"{directory}: weights missing for {type(model).__name__}: {shown}")
        weights = {k: v for k, v in weights.items() if k in wanted}
    is_t5 = config.text_config.model_type == "t5"
    if dtype is None:
        # Flan-T5 overflows in float16 (known in LAVIS and transformers): bfloat16 is its half precision.
        dtype = mx.float32 if mx.default_device() == mx.cpu else (mx.bfloat16 if is_t5 else mx.float16)
    for k, v in weights.items():
        if mx.issubdtype(v.dtype, mx.floating):
            # In float16, transformers also keeps T5's feed-forward output weights in float32.
            keep32 = k.startswith(FP32_PREFIXES) or (is_t5 and dtype == mx.float16 and k.endswith(T5_FP32_SUFFIXES))
            weights[k] = v.astype(mx.float32 if keep32 else dtype)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{directory}: weights do not match the configuration: {e}") from None
    mx.eval(model.parameters())
    model.eval()
    model.dtype = dtype
    model.checkpoint_dir = directory
    return settle_cpu_precision(model, asked)  # quantized or half precision on the CPU: dequantized, or a note
