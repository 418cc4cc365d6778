"""Writing what training produces, crash-safe: the adapter, and resumable checkpoints.

The adapter (see :mod:`mlx_blip2.models.adapters` for the layout) is written file by file, each replaced
atomically, its config last. A checkpoint is a directory ``checkpoints/step-NNNNNNN`` holding the adapter files, the
optimizer state and ``trainer_state.json`` (the step, the options); it is assembled under a temporary name and
renamed into place, so a kill at any moment leaves only complete checkpoints behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..library.atomic import atomic_write, fsync_dir
from ..models.adapters import CONFIG_FILE, LORA_FILE, MODULES_FILE

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"


def save_tensors(path: Path, arrays: dict[str, mx.array]) -> None:
    """``mx.save_safetensors`` to a temporary file beside ``path``, fsynced, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(str(path.parent))


def write_json(path: Path, data: dict) -> None:
    atomic_write(str(path), (json.dumps(data, indent=2) + "\n").encode())


def adapter_weights(model) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """(LoRA weights keyed inside the language model, trained full-module weights keyed from the model's root)."""
    lora, modules = {}, {}
    for k, v in tree_flatten(model.trainable_parameters()):
        if k.endswith((".lora_a", ".lora_b")):
            lora[k[len("language_model."):]] = v
        else:
            modules[k] = v
    return lora, modules


def save_adapter(model, directory: str | Path, adapter_config: dict) -> Path:
    """Write the trained weights and ``adapter_config.json`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora, modules = adapter_weights(model)
    for name, arrays in ((LORA_FILE, lora), (MODULES_FILE, modules)):
        if arrays:
            save_tensors(directory / name, arrays)
        elif (directory / name).exists():
            (directory / name).unlink()
    write_json(directory / CONFIG_FILE, adapter_config)
    return directory


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def save_checkpoint(model, optimizer, run_dir: str | Path, step: int, adapter_config: dict, state: dict,
                    keep: int = 2) -> Path:
    """A complete resumable checkpoint at ``step``; older ones beyond the newest ``keep`` are removed."""
    final = step_dir(Path(run_dir), step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, adapter_config)
    save_tensors(tmp / OPTIMIZER_FILE, dict(tree_flatten(optimizer.state)))
    write_json(tmp / STATE_FILE, {**state, "step": step})
    if final.exists():  # the same step saved again (Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(str(final.parent))
    for old in checkpoint_dirs(run_dir)[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary ones, left by a kill, start with a dot and are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file())


def load_checkpoint(model, optimizer, path: Path) -> dict:
    """Restore trained weights and optimizer state from ``path``; returns its trainer state."""
    state = json.loads((path / STATE_FILE).read_text())
    weights = []
    if (path / LORA_FILE).exists():
        weights += [(f"language_model.{k}", v) for k, v in mx.load(str(path / LORA_FILE)).items()]
    if (path / MODULES_FILE).exists():
        weights += list(mx.load(str(path / MODULES_FILE)).items())
    model.update(tree_unflatten(weights))
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_FILE)).items()))
    mx.eval(model.parameters(), optimizer.state)
    return state
