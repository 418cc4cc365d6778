"""Retrieval recall as LAVIS's retrieval task reports it (``RetrievalTask._report_metrics``).

Image to text: an image's rank is the best position of any of its captions; text to image: the position of the
caption's image. R@K is the percent of queries ranked below K; the means follow LAVIS's keys.
"""

from __future__ import annotations

import numpy as np


def _recalls(ranks: np.ndarray) -> tuple[float, float, float]:
    return tuple(100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))


def recall_at_k(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt: list[list[int]],
                txt2img: list[int]) -> dict:
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        order = np.argsort(score)[::-1]  # as LAVIS sorts, so ties fall the same way
        ranks[index] = min(np.where(order == i)[0][0] for i in img2txt[index])
    tr1, tr5, tr10 = _recalls(ranks)
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        order = np.argsort(score)[::-1]
        ranks[index] = np.where(order == txt2img[index])[0][0]
    ir1, ir5, ir10 = _recalls(ranks)
    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    return {"txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean, "img_r1": ir1, "img_r5": ir5,
            "img_r10": ir10, "img_r_mean": ir_mean, "r_mean": (tr_mean + ir_mean) / 2,
            "agg_metrics": (tr1 + tr5 + tr10) / 3}
