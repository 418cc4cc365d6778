"""Sharding: split a library between machines, each captioning a deterministic 1/N of the files (``--shard I/N``)."""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Sequence

from ..files import ImageFile


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (1 <= I <= N) -> (I, N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, e.g. 1/4; got '{text}'")
    return int(m.group(1)), int(m.group(2))


def shard_index(key: str, n: int) -> int:
    """Which of n shards (1-based) an image belongs to: a hash of its path below the folder argument, so that every
    machine agrees whatever the mount point, and adding files never moves others."""
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % n + 1


def select_shard(files: Sequence[ImageFile], shard: tuple[int, int] | None) -> list[ImageFile]:
    if shard is None:
        return list(files)
    i, n = shard
    return [f for f in files if shard_index(f.key, n) == i]
