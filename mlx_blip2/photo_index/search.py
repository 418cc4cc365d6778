"""Search: ITC scores of every stored image for a text (the max over the image's query tokens), top k, ITM rerank;
caption matches (FTS5, :mod:`.captions`) and their fusion with the image ranking (:mod:`.fusion`).

Modes: ``image`` ranks by ITC alone; ``text`` ranks the photos whose caption matches by BM25 (no model needed);
``hybrid`` (the default) fuses the two by reciprocal rank fusion, and ranks as ``image`` on an index without
captions or when no caption matches.

The float16 matrix is scored in cache-sized chunks straight from the memory map, on two threads: each chunk is
widened to float32 (:func:`half_to_float`, exact) and multiplied by the text embedding, and the max over each
image's query tokens is kept. No float32 copy of the whole matrix is ever made, so a new process pays only for
mapping the file (in the page cache after the first search) and one pass over it.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..files import display_path, path_fields
from .store import PhotoIndex, PhotoIndexError, decode_path

_CHUNK_ROWS = 32  # images converted at a time: 32 x 32 x 256 float32 = 1 MiB, stays in the L2 cache
_THREADS = max(1, min(4, os.cpu_count() or 1))
_HALF_SCALE = np.float32(2.0 ** 112)  # 2 ** (float32 exponent bias - float16 exponent bias)
_SIGN_AND_MAGNITUDE = np.int32(-0x70000001)  # 0x8FFFFFFF: the sign bit and the 28 bits a shifted half fills


def half_to_float(halves: np.ndarray, out: np.ndarray) -> None:
    """float16 values (viewed as int16) -> float32 values written into ``out`` (viewed as int32), exactly.

    4-5x faster than numpy's float16 cast, which converts element by element: widened with sign extension and
    shifted left by 13, a half's exponent and mantissa bits sit where float32 keeps them (the copies of the sign
    bit above them are masked off, leaving one in float32's sign position), reading as a float32 2**112 times too
    small, subnormals included; one multiply fixes it. Not valid for inf/NaN, which normalised embeddings never hold.
    """
    np.copyto(out, halves)
    out <<= 13
    out &= _SIGN_AND_MAGNITUDE
    values = out.view(np.float32)
    values *= _HALF_SCALE


def _score_range(vectors: np.ndarray, text: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
    """:func:`half_to_float` without its last multiply: the chunk is left 2**112 times too small and the text is
    scaled up instead. Powers of two scale exactly and each product comes out as in float32 (the small inputs are
    float32 subnormals, which the FMA takes exactly), so the scores are bit for bit those of a float32 matrix."""
    q, d = vectors.shape[1:]
    halves = vectors.view(np.int16)
    scaled_text = text * _HALF_SCALE
    buf = np.empty((_CHUNK_ROWS, q, d), np.int32)
    token_scores = np.empty(_CHUNK_ROWS * q, np.float32)
    for lo in range(start, stop, _CHUNK_ROWS):
        n = min(_CHUNK_ROWS, stop - lo)
        b = buf[:n]
        np.copyto(b, halves[lo:lo + n])
        b <<= 13
        b &= _SIGN_AND_MAGNITUDE
        s = token_scores[:n * q]
        np.matmul(b.view(np.float32).reshape(n * q, d), scaled_text, out=s)
        np.max(s.reshape(n, q), axis=1, out=out[lo:lo + n])


def itc_scores(vectors: np.ndarray, text_embed: np.ndarray, threads: int = _THREADS) -> np.ndarray:
    """ITC score of every row of a (N, Q, D) float16 matrix for one normalised text embedding (D,): the max over
    the Q query tokens of the dot products, as float32 (the same numbers as a float32 copy of the matrix gives)."""
    n, _, d = vectors.shape
    t = np.ascontiguousarray(np.asarray(text_embed, np.float32).reshape(-1))
    if t.shape[0] != d:
        raise PhotoIndexError(f"text embedding has {t.shape[0]} dims; the index stores {d}")
    out = np.empty(n, np.float32)
    if n == 0:
        return out
    plain = vectors.view(type=np.ndarray)  # a memmap's slices would each be memmaps: slower
    parts = max(1, min(threads, n // (4 * _CHUNK_ROWS)))
    bounds = [n * i // parts for i in range(parts + 1)]
    if parts == 1:
        _score_range(plain, t, out, 0, n)
    else:
        with ThreadPoolExecutor(parts) as pool:  # numpy releases the GIL in the conversion and the product
            list(pool.map(lambda i: _score_range(plain, t, out, bounds[i], bounds[i + 1]), range(parts)))
    return out


MODES = ("image", "text", "hybrid")
TEXT_CANDIDATES = 1000  # caption matches fused at most (the fusion is exact for the top k when fewer match)


@dataclass
class SearchResult:
    path: str  # exact (surrogate escapes for names that are not UTF-8)
    score: float  # the ranking's: ITC (image), BM25 (text), fused (hybrid), ITM + ITC (re-ranked)
    itc: float | None  # None for text-only results
    itm: float | None = None  # ITM match probability, when re-ranked
    itm_logit: float | None = None
    text: float | None = None  # BM25 score of the caption match (higher is better), when it matched
    id: int | None = None  # the index's id of the photo

    def to_dict(self) -> dict:
        d = {**path_fields(self.path), "score": self.score}
        if self.itc is not None:
            d["itc"] = self.itc
        if self.text is not None:
            d["text_score"] = self.text
        if self.itm is not None:
            d.update(itm=self.itm, itm_logit=self.itm_logit)
        return d


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"search mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _scores(index: PhotoIndex, m, text_embed: np.ndarray, filters) -> np.ndarray:
    """ITC of every matrix row, -inf for dead rows and rows the filters leave out."""
    scores = itc_scores(m.vectors, text_embed)
    scores[~m.live] = -np.inf
    if filters is not None and filters.active():
        scores[~filters.row_mask(index.db, scores.shape[0])] = -np.inf
    return scores


def _best_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best rows by score, best first (ties in row order), finite scores only."""
    k_ = min(k, scores.shape[0])
    if k_ <= 0:
        return np.empty(0, np.int64)
    top = np.argpartition(-scores, k_ - 1)[:k_] if k_ < scores.shape[0] else np.arange(scores.shape[0])
    top = top[np.lexsort((top, -scores[top]))]
    return top[np.isfinite(scores[top])]


def top_k(index: PhotoIndex, text_embed: np.ndarray, k: int, filters=None) -> list[SearchResult]:
    """The k best images by ITC, best first (ties in matrix row order: the order images were embedded)."""
    for _ in range(3):
        m = index.matrix()
        if min(k, m.count) <= 0:
            return []
        scores = _scores(index, m, text_embed, filters)
        top = _best_rows(scores, k)
        entries = index.entries_of_rows(top.tolist(), m.generation)
        if entries is not None:  # None: the index changed under the search; score the new one
            return [SearchResult(entries[r][1], float(scores[r]), float(scores[r]), id=entries[r][0])
                    for r in top.tolist() if r in entries]
    raise PhotoIndexError(f"'{index.path}' kept changing during the search")


def text_top_k(index: PhotoIndex, query: str, k: int, filters=None) -> list[SearchResult]:
    """The k photos whose captions best match ``query`` (BM25), best first."""
    from .captions import text_ranking

    hits = text_ranking(index, query, k, filters)
    paths = {i: p for i, p in index.db.execute(
        f"SELECT id, path FROM images WHERE id IN ({','.join('?' * len(hits))})", [h[0] for h in hits])}
    return [SearchResult(decode_path(paths[i]), s, None, text=s, id=i) for i, _, s in hits if i in paths]


def hybrid_top_k(index: PhotoIndex, text_embed: np.ndarray, query: str, k: int, filters=None) -> list[SearchResult]:
    """The k best photos by the fusion of the ITC ranking and the caption ranking (:mod:`.fusion`); exactly
    :func:`top_k` when no caption matches."""
    from .captions import text_ranking
    from .fusion import fuse, image_ranks

    for _ in range(3):
        m = index.matrix()
        hits = [h for h in text_ranking(index, query, TEXT_CANDIDATES, filters) if h[1] < m.vectors.shape[0]]
        if not hits:
            return top_k(index, text_embed, k, filters)
        if min(k, m.count) <= 0:
            return []
        scores = _scores(index, m, text_embed, filters)
        image_top = _best_rows(scores, k).tolist()
        text_rows = [r for _, r, _ in hits]
        ranks = image_ranks(scores, text_rows)
        ranks.update((r, i + 1) for i, r in enumerate(image_top))
        fused = fuse(image_top, ranks, text_rows)[:k]
        entries = index.entries_of_rows([r for r, _ in fused], m.generation)
        if entries is not None:
            bm25 = {r: s for _, r, s in hits}
            return [SearchResult(entries[r][1], score, float(scores[r]), text=bm25.get(r), id=entries[r][0])
                    for r, score in fused if r in entries]
    raise PhotoIndexError(f"'{index.path}' kept changing during the search")


def search(db: PhotoIndex, query: str, k: int = 10, model: str | None = None, rerank: bool = False,
           candidates: int | None = None, dtype=None, pipeline=None, mode: str | None = None,
           filters=None) -> list[SearchResult]:
    """The k best stored images for a text query, best first.

    ``mode`` (see the module): ``image``, ``text`` or ``hybrid`` (None: hybrid, or image when re-ranking);
    ``filters`` a :class:`.filters.Filters`. With
    ``rerank`` (image mode only) the best ``candidates`` (default k) whose files can still be read are re-scored
    with ITM (score = ITM match logit + ITC, as LAVIS ranks) — that re-runs the ViT on them. ``pipeline`` may be a
    loaded retrieval pipeline (the full model when re-ranking); otherwise it is loaded from ``model`` or the index's
    model (text half only without ``rerank``); the text mode needs none.
    """
    mode = check_mode(mode or ("image" if rerank else "hybrid"))
    if not isinstance(query, str) or not query.strip():
        raise ValueError("the search text is empty")
    if rerank and mode != "image":
        raise ValueError("re-ranking re-scores image matches: use it with --mode image")
    if db.count() == 0:
        return []
    if mode == "text":
        return text_top_k(db, query, k, filters)
    if pipeline is None:
        from ..pipelines.retrieval import Blip2RetrievalPipeline

        name = model or db.model
        if name is None:
            raise PhotoIndexError(f"'{db.path}' does not say which model built it; pass --model")
        pipeline = Blip2RetrievalPipeline.from_pretrained(name, dtype=dtype, part="full" if rerank else "text")
    if mode == "hybrid":
        return hybrid_top_k(db, pipeline.embed_texts(query), query, k, filters)
    results = top_k(db, pipeline.embed_texts(query), max(k, candidates or 0) if rerank else k, filters)
    if not rerank:
        return results
    return _rerank(pipeline, query, results, k)


def _rerank(pipeline, query: str, results: list[SearchResult], k: int) -> list[SearchResult]:
    from ..images import ImageLoadError, open_image

    images, kept = [], []
    for r in results:
        try:
            images.append(open_image(r.path, name=f"'{display_path(r.path)}'"))
            kept.append(r)
        except (OSError, ImageLoadError) as e:
            print(f"warning: {display_path(r.path)} left out of the re-ranking: {display_path(str(e))}",
                  file=sys.stderr)
    ranked = pipeline.rerank(query, images, [r.itc for r in kept])
    return [SearchResult(kept[x.index].path, x.score, x.itc, x.itm, x.itm_logit, id=kept[x.index].id)
            for x in ranked[:k]]
