"""The training bar: steps done, loss, examples/s and MLX's peak memory, on a terminal (tqdm)."""

from __future__ import annotations

import sys

import mlx.core as mx
from tqdm import tqdm

from ..library.progress import BAR_FORMAT


class Progress:
    def __init__(self, total: int, done: int = 0, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = tqdm(total=total, initial=done, file=self.stream, disable=not self.enabled, unit=" steps",
                        dynamic_ncols=True, bar_format=BAR_FORMAT, leave=False)
        self.smoothed: float | None = None

    def update(self, loss: float | None, examples: int, seconds: float, lr: float) -> None:
        if loss is not None:
            self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        if self.enabled:
            loss_text = "-" if self.smoothed is None else f"{self.smoothed:.4f}"
            self.bar.set_postfix_str(f"loss {loss_text}, {examples / max(seconds, 1e-9):.2f} examples/s, "
                                     f"lr {lr:.2e}, peak {mx.get_peak_memory() / 1e9:.2f} GB", refresh=False)
            self.bar.update(1)

    def write(self, line: str) -> None:
        if self.enabled:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()
