"""Progress while a run goes (a tqdm bar, on a terminal only) and the summary line when it ends."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from tqdm import tqdm

BAR_FORMAT = "{n_fmt}/{total_fmt} |{bar}| {percentage:3.0f}% {rate_fmt} ETA {remaining}{postfix}"


class Progress:
    """A progress bar with images/s, ETA and the failures so far; silent unless enabled (by default: when the stream
    is a terminal). ``update`` takes the running totals."""

    def __init__(self, total: int, stream=None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = bool(self.stream.isatty()) if enabled is None else bool(enabled)
        self.total = total
        self.bar = tqdm(total=total, file=self.stream, disable=not self.enabled, unit=" images", leave=False,
                        dynamic_ncols=True, bar_format=BAR_FORMAT, mininterval=0.1)

    def update(self, done: int, failed: int = 0, force: bool = False) -> None:
        if not self.enabled:
            return
        if failed:
            self.bar.set_postfix_str(f"{failed} failed", refresh=False)
        self.bar.update(done - self.bar.n)
        if force:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def format_duration(seconds: float) -> str:
    seconds = round(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class Summary:
    total: int = 0
    captioned: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (display path, error)
    seconds: float = 0.0
    interrupted: bool = False
    rank: int = 0  # a distributed run: only rank 0's summary is the job's
    errors: list[str] = field(default_factory=list)  # a distributed run: ranks that stopped early, and why
    usage_error: bool = False  # ... because of a usage error (a checkpoint of the wrong kind)

    @property
    def exit_code(self) -> int:
        """0: every image captioned or skipped; 1: some failed; 2: usage error on a rank; 130: interrupted."""
        if self.interrupted:
            return 130
        if self.errors:
            return 2 if self.usage_error else 1
        return 1 if self.failed else 0

    def line(self) -> str:
        rate = f", {self.captioned / self.seconds:.2f} images/s" if self.captioned and self.seconds > 0 else ""
        head = "interrupted: " if self.interrupted else ""
        return (f"{head}captioned {self.captioned}, skipped {self.skipped}, failed {len(self.failed)} "
                f"of {self.total} image{'s' if self.total != 1 else ''} in {format_duration(self.seconds)}{rate}")
