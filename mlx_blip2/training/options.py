"""Every fine-tuning setting, declared once: the Python API takes a :class:`TrainOptions`, the CLI builds one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .trainable import LoraOptions, parse_groups


@dataclass
class TrainOptions:
    train: tuple[str, ...] = ("qformer",)  # any of qformer, vit, lora
    lora: LoraOptions = field(default_factory=LoraOptions)
    learning_rate: float | None = None  # None: 1e-4 with LoRA, else 1e-5 (LAVIS's fine-tuning rate)
    min_learning_rate: float = 0.0  # where the cosine decay ends
    warmup_steps: int = 0
    steps: int | None = None  # optimizer steps; None: ``epochs`` over the training set
    epochs: float = 1.0
    batch_size: int = 4
    grad_accumulation: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.05  # LAVIS's
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    prompt: str | None = None  # the caption prompt ("a photo of"), as in inference
    max_target_tokens: int = 64
    train_on_prompt: bool = False  # score the prompt tokens too
    val_fraction: float = 0.0
    eval_every: int = 0  # validation loss and sample captions every N steps (0: at the end only)
    eval_samples: int = 3
    save_every: int = 0  # a resumable checkpoint every N steps (0: only at the end and on Ctrl-C)
    keep_checkpoints: int = 2
    grad_checkpoint: bool = True  # recompute activations of frozen stacks that gradients pass through
    quantize_bits: int | None = None  # QLoRA: quantize the frozen language model in memory (4 or 8)
    quantize_group_size: int = 64
    progress: bool = True

    def __post_init__(self):
        self.train = parse_groups(self.train)
        positive = {"batch_size": self.batch_size, "grad_accumulation": self.grad_accumulation,
                    "max_target_tokens": self.max_target_tokens}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.quantize_bits not in (None, 2, 3, 4, 5, 6, 8):
            raise ValueError(f"quantize_bits must be 2, 3, 4, 5, 6 or 8, got {self.quantize_bits}")
        if self.lora.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.lora.rank}")

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if "lora" in self.train else 1e-5

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainOptions":
        d = dict(d)
        d["lora"] = LoraOptions(**d.get("lora", {}))
        d["train"] = tuple(d.get("train", ("qformer",)))
        return cls(**d)

    # What must not change between a run and its resumption (the rest may: eval/save cadence, progress).
    RESUME_KEYS = ("train", "lora", "learning_rate", "min_learning_rate", "warmup_steps", "steps", "epochs",
                   "batch_size", "grad_accumulation", "weight_decay", "max_grad_norm", "seed", "prompt",
                   "max_target_tokens", "train_on_prompt", "val_fraction", "quantize_bits", "quantize_group_size")
