"""Where captions go: the interface every output implements, and the plain one that prints them.

The run asks each output, per image, whether it still needs a caption (``status``, called from worker threads), then
hands it captions and errors (``write``) batch by batch (``end_batch``: the point where an output makes them durable).
"""

from __future__ import annotations

import os
import sys

from ..files import ImageFile, display_path

TODO, SKIP, FAIL = "todo", "skip", "fail"


class UsageError(ValueError):
    """A problem with the command line or its inputs (exit status 2)."""


def file_stat(path: str) -> tuple[int | None, float | None]:
    """(size, mtime), or (None, None) for a file that disappeared or can't be read."""
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime
    except OSError:
        return None, None


class Writer:
    """Where captions go. ``status`` decides (in worker threads) whether an image still needs a caption."""

    notes: list[str]

    def status(self, image: ImageFile, size, mtime, existing: str) -> tuple[str, str | None]:
        return TODO, None

    def write(self, image: ImageFile, size, mtime, caption: str | None = None, error: str | None = None) -> str | None:
        """Record a caption (or an error). Returns an error message if the caption could not be stored."""
        raise NotImplementedError

    def end_batch(self) -> None:
        pass

    def close(self) -> None:
        pass


class PlainWriter(Writer):
    """``path: caption`` lines on stdout (the bare caption when there is one image); errors go to the summary."""

    def __init__(self, stream=None, bare: bool = False):
        self.stream, self.bare, self.notes = stream, bare, []

    def write(self, image, size, mtime, caption=None, error=None):
        if caption is not None:
            stream = self.stream or sys.stdout
            print(caption if self.bare else f"{display_path(image.display)}: {caption}", file=stream, flush=True)
