"""ROUGE-L (F-measure with beta 1.2 over the best precision and best recall) as pycocoevalcap's ``Rouge``."""

from __future__ import annotations

BETA = 1.2


def lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_sentence(candidate: str, references: list[str]) -> float:
    # split(" ") rather than split(): an empty caption is one empty token there, which the official score counts
    tokens = candidate.split(" ")
    precisions, recalls = [], []
    for ref in references:
        ref_tokens = ref.split(" ")
        common = lcs_length(ref_tokens, tokens)
        precisions.append(common / float(len(tokens)))
        recalls.append(common / float(len(ref_tokens)))
    p, r = max(precisions), max(recalls)
    if p == 0 or r == 0:
        return 0.0
    return ((1 + BETA ** 2) * p * r) / float(r + BETA ** 2 * p)


def rouge_l(gts: dict, res: dict) -> tuple[float, list[float]]:
    scores = [rouge_l_sentence(res[key][0], gts[key]) for key in gts]
    return sum(scores) / len(scores), scores
