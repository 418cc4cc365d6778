"""CIDEr-D as pycocoevalcap's ``Cider`` computes it.

TF-IDF n-gram vectors (n = 1..4) with document frequencies over the references of the evaluated images, cosine
similarity with the candidate's weights clipped at the reference's, a Gaussian length penalty (sigma 6), averaged
over n and references, times 10. The "length" in the penalty is the number of bigrams, as the official code counts
it; that is kept so the figures match.
"""

from __future__ import annotations

import math
from collections import defaultdict

from .bleu import ngram_counts

SIGMA = 6.0


def _vector(counts, document_frequency, log_images: float, n: int):
    vec = [dict() for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for ngram, tf in counts.items():
        df = math.log(max(1.0, document_frequency.get(ngram, 0.0)))
        k = len(ngram) - 1
        vec[k][ngram] = float(tf) * (log_images - df)
        norm[k] += vec[k][ngram] ** 2
        if k == 1:
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _similarity(hyp, ref, n: int, sigma: float) -> list[float]:
    vec_h, norm_h, len_h = hyp
    vec_r, norm_r, len_r = ref
    delta = float(len_h - len_r)
    values = []
    for k in range(n):
        value = 0.0
        for ngram, weight in vec_h[k].items():
            ref_weight = vec_r[k].get(ngram, 0.0)
            value += min(weight, ref_weight) * ref_weight
        if norm_h[k] != 0 and norm_r[k] != 0:
            value /= norm_h[k] * norm_r[k]
        values.append(value * math.e ** (-(delta ** 2) / (2 * sigma ** 2)))
    return values


def cider_d(gts: dict, res: dict, n: int = 4, sigma: float = SIGMA) -> tuple[float, list[float]]:
    """Corpus CIDEr-D and per-image scores for tokenized ``{id: [refs]}`` and ``{id: [candidate]}``."""
    keys = list(gts)
    ref_counts = [[ngram_counts(r.split(), n) for r in gts[key]] for key in keys]
    document_frequency: dict = defaultdict(float)
    for refs in ref_counts:
        for ngram in {g for counts in refs for g in counts}:
            document_frequency[ngram] += 1
    log_images = math.log(float(len(keys)))
    scores = []
    for key, refs in zip(keys, ref_counts):
        hyp = _vector(ngram_counts(res[key][0].split(), n), document_frequency, log_images, n)
        total = [0.0] * n
        for counts in refs:
            sim = _similarity(hyp, _vector(counts, document_frequency, log_images, n), n, sigma)
            total = [a + b for a, b in zip(total, sim)]
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores), scores
