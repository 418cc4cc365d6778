"""The training loop: AdamW with linear warmup and cosine decay, gradient accumulation, validation, checkpoints.

Runs are repeatable: the seed fixes LoRA's initial matrices, each epoch's order of the examples and each step's
dropout. Everything a step depends on is a function of the seed and the step number, so a run resumed from a
checkpoint (``resume=True``: the newest complete one under ``output/checkpoints``) ends at the same weights as
one that was never interrupted. The first Ctrl-C finishes the current step, saves a checkpoint and stops; the
trained adapter is written to ``output`` at the end (and on Ctrl-C).
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..models.adapters import base_model_record
from .checkpoints import checkpoint_dirs, load_checkpoint, save_adapter, save_checkpoint
from .collator import Collator
from .datasets import Example
from .memory import checkpoint_frozen_stacks, prepare_quantized_for_training, quantize_language_model
from .options import TrainOptions
from .progress import Progress
from .trainable import set_trainable, trainable_names


@dataclass
class TrainResult:
    output: Path
    steps: int
    train_loss: float | None = None
    val_loss: float | None = None
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (image, expected, generated)


def examples_digest(examples: list[Example]) -> str:
    """Identifies a training set, so that a resumed run checks it is given the same data."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.image, e.target, e.question]).encode())
    return h.hexdigest()[:16]


class Trainer:
    def __init__(self, pipeline, train: list[Example], val: list[Example], options: TrainOptions,
                 output: str | Path, log=print):
        if not train:
            raise ValueError("no training examples")
        self.pipeline, self.model, self.options = pipeline, pipeline.model, options
        self.train_examples, self.val_examples = train, val
        self.output, self.log = Path(output).expanduser(), log
        self.errors: list[str] = []
        self.base_record = base_model_record(self.model)  # before anything changes the model
        if options.quantize_bits:
            n = quantize_language_model(self.model, options.quantize_bits, options.quantize_group_size)
            log(f"language model quantized to {options.quantize_bits} bits in memory ({n} layers)")
        mx.random.seed(options.seed)  # LoRA's initial A matrices
        self.lora_config = set_trainable(self.model, options.train, options.lora)
        self._check_trainable()
        if options.grad_checkpoint:
            checkpoint_frozen_stacks(self.model, options.train)
        # Everywhere, not only where gradients pass: an evaluation inside the traced forward pass (inference's
        # quantized layers do one) keeps every activation before it alive until the backward pass.
        prepare_quantized_for_training(self.model)
        self.collator = Collator(pipeline, options.prompt, options.max_target_tokens, options.train_on_prompt)
        self.batches_per_epoch = math.ceil(len(train) / options.batch_size)
        self.total_steps = options.steps or max(
            1, math.ceil(options.epochs * self.batches_per_epoch / options.grad_accumulation))
        self.optimizer = optim.AdamW(learning_rate=self._schedule(), weight_decay=options.weight_decay)
        self.loss_and_grad = nn.value_and_grad(self.model, lambda m, b: m(**b).loss)
        self.step = 0
        self._stop = False

    def _check_trainable(self) -> None:
        names = trainable_names(self.model)
        quantized = [n for n, v in tree_flatten(self.model.trainable_parameters())
                     if not mx.issubdtype(v.dtype, mx.floating)]
        if quantized:
            raise ValueError(f"cannot train quantized weights ({quantized[0]}...): load a float checkpoint, or "
                             "train only LoRA on a quantized language model")
        count = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        self.log(f"training {', '.join(self.options.train)}: {count:,} parameters in {len(names)} tensors")

    def _schedule(self):
        o = self.options
        decay = optim.cosine_decay(o.lr, max(self.total_steps - o.warmup_steps, 1), o.min_learning_rate)
        if o.warmup_steps <= 0:
            return decay
        warmup = optim.linear_schedule(0.0, o.lr, o.warmup_steps)
        return optim.join_schedules([warmup, decay], [o.warmup_steps])

    def adapter_config(self) -> dict:
        config = dict(self.lora_config or {"fine_tune_type": "full"})
        config.update(trained=list(self.options.train), base_model=self.base_record,
                      prompt=self.options.prompt, training=self.options.to_dict())
        return config

    # --- data --------------------------------------------------------------------------------------------------

    def micro_batch(self, index: int) -> list[Example]:
        """The ``index``-th micro-batch of the run: epoch ``index // batches_per_epoch`` in its seeded order."""
        epoch, i = divmod(index, self.batches_per_epoch)
        order = np.random.default_rng([self.options.seed, epoch]).permutation(len(self.train_examples))
        size = self.options.batch_size
        return [self.train_examples[j] for j in order[i * size:(i + 1) * size]]

    # --- one optimizer step ------------------------------------------------------------------------------------

    def train_step(self) -> tuple[float | None, int]:
        """One optimizer step over ``grad_accumulation`` micro-batches; (mean loss, examples used)."""
        o = self.options
        mx.random.seed(o.seed * 1_000_003 + self.step)  # this step's dropout, whether resumed or not
        self.model.train()
        total, losses, used = None, [], 0
        for k in range(o.grad_accumulation):
            batch = self.collator(self.micro_batch(self.step * o.grad_accumulation + k), self.errors)
            if batch is None:
                continue
            loss, grads = self.loss_and_grad(self.model, {key: mx.array(v) for key, v in batch.items()})
            total = grads if total is None else tree_map(mx.add, total, grads)
            mx.eval(loss, total)
            losses.append(loss.item())
            used += len(batch["pixel_values"])
        if total is not None:
            total = tree_map(lambda g: g / len(losses), total)
            if o.max_grad_norm > 0:
                total, _ = optim.clip_grad_norm(total, o.max_grad_norm)
            self.optimizer.update(self.model, total)
            mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self.step += 1
        return (float(np.mean(losses)) if losses else None), used

    # --- validation --------------------------------------------------------------------------------------------

    def validation_loss(self) -> float | None:
        if not self.val_examples:
            return None
        self.model.eval()
        losses, weights = [], []
        size = self.options.batch_size
        for i in range(0, len(self.val_examples), size):
            batch = self.collator(self.val_examples[i:i + size], self.errors)
            if batch is not None:
                loss = self.model(**{k: mx.array(v) for k, v in batch.items()}).loss
                losses.append(loss.item())
                weights.append(int((batch["labels"] != -100).sum()))
        return float(np.average(losses, weights=weights)) if losses else None

    def sample_captions(self, count: int | None = None) -> list[tuple[str, str, str]]:
        """Greedy outputs for the first validation (else training) examples: (image, expected, generated)."""
        count = self.options.eval_samples if count is None else count
        examples = (self.val_examples or self.train_examples)[:count]
        self.model.eval()
        out = []
        for ex in examples:
            try:
                if ex.question is not None:
                    text = self.pipeline.ask(ex.image, ex.question, num_beams=1)
                else:
                    text = self.pipeline.caption(ex.image, prompt=self.options.prompt, num_beams=1,
                                                 max_new_tokens=self.options.max_target_tokens)
            except (OSError, ValueError) as e:
                self.errors.append(f"{ex.where or ex.image}: {e}")
                continue
            out.append((ex.image, ex.target, text))
        return out

    # --- checkpoints -------------------------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        keys = TrainOptions.RESUME_KEYS
        options = {k: v for k, v in self.options.to_dict().items() if k in keys}
        return {"options": options, "data": examples_digest(self.train_examples),
                "total_steps": self.total_steps}

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.model, self.optimizer, self.output, self.step, self.adapter_config(),
                               self.trainer_state(), self.options.keep_checkpoints)

    def resume(self) -> int:
        """Continue from the newest checkpoint under ``output``; returns its step."""
        found = checkpoint_dirs(self.output)
        if not found:
            raise FileNotFoundError(f"{self.output}: no checkpoint to resume from (checkpoints/step-*)")
        path = found[-1]
        saved = json.loads((path / "trainer_state.json").read_text())
        ours = self.trainer_state()
        for key, value in ours["options"].items():
            if saved.get("options", {}).get(key) != json.loads(json.dumps(value)):
                raise ValueError(f"{path}: trained with {key}={saved['options'].get(key)!r}, this run has "
                                 f"{key}={value!r}; resume with the same settings")
        if saved.get("data") != ours["data"]:
            raise ValueError(f"{path}: trained on other data; resume with the same data and --val-fraction")
        self.step = load_checkpoint(self.model, self.optimizer, path)["step"]
        self.log(f"resumed from {path} (step {self.step} of {self.total_steps})")
        return self.step

    # --- the loop ----------------------------------------------------------------------------------------------

    def _on_sigint(self, signum, frame):
        if self._stop:
            raise KeyboardInterrupt
        self._stop = True
        self.log("interrupted: finishing this step, then saving a checkpoint (Ctrl-C again to quit now)")

    def fit(self, resume: bool = False) -> TrainResult:
        self.output.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        o = self.options
        result = TrainResult(self.output, self.step)
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        progress = Progress(self.total_steps, self.step, enabled=o.progress)
        try:
            while self.step < self.total_steps and not self._stop:
                start = time.perf_counter()
                loss, used = self.train_step()
                result.train_loss = loss if loss is not None else result.train_loss
                progress.update(loss, used, time.perf_counter() - start, self.optimizer.learning_rate.item())
                self._log_metrics({"step": self.step, "loss": loss, "lr": self.optimizer.learning_rate.item()})
                if o.eval_every and self.step % o.eval_every == 0 and self.step < self.total_steps:
                    self._evaluate(progress, result)
                if o.save_every and self.step % o.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            signal.signal(signal.SIGINT, previous)
            progress.close()
        result.steps, result.interrupted = self.step, self._stop
        self.save_checkpoint()
        save_adapter(self.model, self.output, self.adapter_config())
        if not self._stop:
            self._evaluate(progress, result)
        result.errors = self.errors
        return result

    def _evaluate(self, progress: Progress, result: TrainResult) -> None:
        result.val_loss = self.validation_loss()
        result.samples = self.sample_captions()
        lines = [] if result.val_loss is None else [f"step {self.step}: validation loss {result.val_loss:.4f}"]
        lines += [f"  {Path(image).name}: {generated!r} (expected {expected!r})"
                  for image, expected, generated in result.samples]
        for line in lines:
            progress.write(line)
        self._log_metrics({"step": self.step, "val_loss": result.val_loss})

    def _log_metrics(self, record: dict) -> None:
        with open(self.output / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
