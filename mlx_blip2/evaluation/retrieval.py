"""Image-text retrieval as LAVIS evaluates BLIP-2 (``blip2_qformer.compute_sim_matrix``).

ITC similarities (the best cosine over the query tokens) pick each image's ``k_test`` best texts and each text's
``k_test`` best images; those pairs are re-scored as ITM match logit + ITC similarity, all other pairs score -100.
The work is organised by image, so each image's ViT features are computed once for both directions: one record per
image holds its pairs' ITM logits. Image embeddings are saved one file per image, so a killed run keeps them.
"""

from __future__ import annotations

import io
import os

import numpy as np

from ..library.atomic import atomic_write
from .metrics.retrieval import recall_at_k
from .runner import share
from .store import read_records, recording

EMBEDDINGS = "itc_embeddings"


def _save(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write(path, buf.getvalue())


def image_embeddings(pipe, images: list[str], out_dir: str, group=None, batch_size: int = 8) -> np.ndarray:
    """(N, Q, D) ITC embeddings, each image's kept in ``out_dir/itc_embeddings/<index>.npy`` once computed."""
    folder = os.path.join(out_dir, EMBEDDINGS)
    os.makedirs(folder, exist_ok=True)
    path = [os.path.join(folder, f"{i}.npy") for i in range(len(images))]
    todo = share([i for i in range(len(images)) if not os.path.exists(path[i])], group)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        for i, embeds in zip(chunk, pipe.embed_images([images[i] for i in chunk])):
            _save(path[i], embeds)
    if group is not None:
        group.barrier()
    return np.stack([np.load(p) for p in path])


def text_embeddings(pipe, texts: list[str], out_dir: str, group=None) -> np.ndarray:
    path = os.path.join(out_dir, EMBEDDINGS, "texts.npy")
    if not os.path.exists(path) and (group is None or group.rank == 0):
        _save(path, pipe.embed_texts(texts))
    if group is not None:
        group.barrier()
    return np.load(path)


def candidates(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's top-k text indices and each text's top-k image indices by ITC similarity."""
    k_t, k_i = min(k, sims.shape[1]), min(k, sims.shape[0])
    i2t = np.argsort(-sims, axis=1, kind="stable")[:, :k_t]
    t2i = np.argsort(-sims.T, axis=1, kind="stable")[:, :k_i]
    return i2t, t2i


def _pairs_by_image(i2t: np.ndarray, t2i: np.ndarray) -> list[list[int]]:
    """For each image, the texts it must be matched with: its own candidates and the texts that chose it."""
    pairs = [set(row.tolist()) for row in i2t]
    for t, row in enumerate(t2i):
        for i in row.tolist():
            pairs[i].add(t)
    return [sorted(p) for p in pairs]


def score_images(pipe, images: list[str], texts: list[str], pairs: list[list[int]], out_dir: str, group=None,
                 progress: bool | None = None) -> dict:
    """ITM match logits of each image with its texts, one record per image: ``{"key", "texts", "itm"}``."""
    done = read_records(out_dir)
    todo = share([i for i in range(len(images)) if "itm" not in done.get(str(i), {})], group)
    with recording(out_dir, group, len(todo), progress) as (appender, bar):
        for n, i in enumerate(todo, start=1):
            try:
                features = pipe.image_features([images[i]])
                logits, _ = pipe.itm_scores(features, [texts[t] for t in pairs[i]])
                record = {"key": str(i), "texts": pairs[i], "itm": [float(x) for x in logits]}
            except Exception as e:  # noqa: BLE001 - recorded and retried by the next run
                record = {"key": str(i), "error": f"{type(e).__name__}: {e}"}
            appender.write([record])
            bar.update(n)
    return read_records(out_dir)


def score_matrices(sims: np.ndarray, i2t: np.ndarray, t2i: np.ndarray, records: dict):
    """LAVIS's (images, texts) and (texts, images) score matrices: ITM + ITC on the candidates, -100 elsewhere."""
    n_images, n_texts = sims.shape
    itm = np.full((n_images, n_texts), np.nan)
    for i in range(n_images):
        record = records.get(str(i), {})
        if "itm" not in record:
            raise ValueError(f"image {i} has no ITM scores ({record.get('error', 'not run')})")
        itm[i, record["texts"]] = record["itm"]
    scores_i2t = np.full((n_images, n_texts), -100.0)
    rows = np.arange(n_images)[:, None]
    scores_i2t[rows, i2t] = itm[rows, i2t] + sims[rows, i2t]
    scores_t2i = np.full((n_texts, n_images), -100.0)
    cols = np.arange(n_texts)[:, None]
    scores_t2i[cols, t2i] = itm.T[cols, t2i] + sims.T[cols, t2i]
    return scores_i2t, scores_t2i


def run_retrieval(pipe, data, out_dir: str, k_test: int, group=None, batch_size: int = 8,
                  progress: bool | None = None) -> tuple[dict, dict]:
    """(metrics, rankings) of a retrieval test set: R@1/5/10 both ways, and each query's top-10."""
    images = [item.image for item in data.items]
    image_embeds = image_embeddings(pipe, images, out_dir, group, batch_size)
    text_embeds = text_embeddings(pipe, data.texts, out_dir, group)
    sims = (image_embeds @ text_embeds.T).max(axis=1)  # (N, M): best query token per pair
    i2t, t2i = candidates(sims, k_test)
    records = score_images(pipe, images, data.texts, _pairs_by_image(i2t, t2i), out_dir, group, progress)
    scores_i2t, scores_t2i = score_matrices(sims, i2t, t2i, records)
    metrics = recall_at_k(scores_i2t, scores_t2i, data.img2txt, data.txt2img)
    rankings = {"i2t": {str(data.ids[str(i)]): np.argsort(-row, kind="stable")[:10].tolist()
                        for i, row in enumerate(scores_i2t)},
                "t2i": {str(t): [data.ids[str(i)] for i in np.argsort(-row, kind="stable")[:10].tolist()]
                        for t, row in enumerate(scores_t2i)}}
    return metrics, rankings
