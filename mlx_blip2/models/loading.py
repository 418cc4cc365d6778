"""Finding a checkpoint (local directory or Hub repo id) and reading its safetensors weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.md"]


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
