"""BLEU-1..4 exactly as pycocoevalcap's ``Bleu(4)`` scores a caption set.

pycocoevalcap (David Chiang's bleu_scorer) sums clipped n-gram matches, n-gram counts, candidate lengths and the
"closest" reference length over the whole set, then takes one corpus BLEU; it also adds tiny/small constants so a
zero count gives 0 rather than a division error. Those constants and the per-caption scores it returns are kept.
"""

from __future__ import annotations

import math
from collections import Counter

TINY = 1e-15  # added to matches: a zero count yields a tiny score, not log(0)
SMALL = 1e-9  # added to denominators: no division by zero


def ngram_counts(words: list[str], n: int = 4) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _sentence_stats(candidate: str, references: list[str], n: int) -> dict:
    ref_lengths = []
    max_counts: dict = {}
    for ref in references:
        words = ref.split()
        ref_lengths.append(len(words))
        for ngram, count in ngram_counts(words, n).items():
            max_counts[ngram] = max(max_counts.get(ngram, 0), count)
    words = candidate.split()
    length = len(words)
    correct = [0] * n
    for ngram, count in ngram_counts(words, n).items():
        correct[len(ngram) - 1] += min(max_counts.get(ngram, 0), count)
    # ties between a shorter and a longer reference go to the shorter one, as min() over (distance, length) does
    closest = min((abs(r - length), r) for r in ref_lengths)[1]
    return {"testlen": length, "reflen": closest, "guess": [max(0, length - k + 1) for k in range(1, n + 1)],
            "correct": correct}


def _bleu(correct, guess, testlen, reflen, n: int) -> list[float]:
    scores = []
    product = 1.0
    for k in range(n):
        product *= float(correct[k] + TINY) / (guess[k] + SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + TINY) / (reflen + SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(gts: dict, res: dict, n: int = 4) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n and per-caption BLEU-k lists for tokenized ``{id: [refs]}`` and ``{id: [candidate]}``."""
    stats = [_sentence_stats(res[key][0], gts[key], n) for key in gts]
    per_item = [[] for _ in range(n)]
    for s in stats:
        for k, score in enumerate(_bleu(s["correct"], s["guess"], s["testlen"], s["reflen"], n)):
            per_item[k].append(score)
    correct = [sum(s["correct"][k] for s in stats) for k in range(n)]
    guess = [sum(s["guess"][k] for s in stats) for k in range(n)]
    corpus = _bleu(correct, guess, sum(s["testlen"] for s in stats), sum(s["reflen"] for s in stats), n)
    return corpus, per_item
