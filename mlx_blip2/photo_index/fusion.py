"""Hybrid search: the image ranking (ITC) and the caption ranking (FTS5 BM25) fused by reciprocal rank fusion.

Each photo scores ``1 / (K + rank)`` summed over the rankings it appears in (rank 1 the best; K = 60, the value of
Cormack, Clarke and Büttcher, SIGIR 2009). Ranks, not scores, are added: ITC similarities and BM25 scores are on
scales that do not compare, and RRF needs no tuning per library. Every photo is in the image ranking, so a photo
whose caption matches climbs above the photos that only look alike; a photo whose caption holds the only word that
answers the query (a name: "Rex") comes first. With no caption match the fused order is the image order itself.

Only the image ranking's top k and the caption matches can make the fused top k: a photo in neither scores at most
``1 / (K + k + 1)``, below each of the image top k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RRF_K = 60


def image_ranks(scores: np.ndarray, rows: Sequence[int]) -> dict[int, int]:
    """1-based rank of the given matrix rows in the ITC order (score descending, ties by row), over the rows with
    a finite score."""
    out = {}
    for r in rows:
        s = scores[r]
        if not np.isfinite(s):
            continue
        out[int(r)] = int(np.count_nonzero(scores > s) + np.count_nonzero(scores[:r] == s)) + 1
    return out


def fuse(image_top: Sequence[int], image_rank: dict[int, int], text_top: Sequence[int],
         k: int = RRF_K) -> list[tuple[int, float]]:
    """(key, fused score) best first, for the keys of the image top list and the text list. ``image_rank`` gives
    the image rank of every key in either list that has one; text ranks are positions in ``text_top``. Ties keep
    the image order."""
    text_rank = {key: i + 1 for i, key in enumerate(text_top)}
    keys = list(dict.fromkeys([*image_top, *text_top]))
    fused = {}
    for key in keys:
        score = 0.0
        if key in image_rank:
            score += 1.0 / (k + image_rank[key])
        if key in text_rank:
            score += 1.0 / (k + text_rank[key])
        fused[key] = score
    big = len(keys) + max(image_rank.values(), default=0) + 1
    return sorted(fused.items(), key=lambda kv: (-kv[1], image_rank.get(kv[0], big), text_rank.get(kv[0], big)))
