"""Ray Data adapters: caption or embed a dataset with ``Dataset.map_batches`` on a pool of actors.

    import ray
    from mlx_blip2.ray import Captioner
    ds = ray.data.read_images("s3://bucket/photos/", include_paths=True)      # or from_items([{"path": ...}])
    ds = ds.map_batches(Captioner, fn_constructor_kwargs={"model": "Salesforce/blip2-opt-2.7b"},
                        batch_size=16, compute=ray.data.ActorPoolStrategy(size=4))  # 4 actors, a model each
    ds.select_columns(["path", "caption", "error"]).write_parquet("captions/")
    pd.read_parquet("captions/")                                                # or pyarrow, DuckDB, Ray

Each actor loads the model once. A batch holds images (arrays, as ``read_images`` gives them; bytes, as
``read_binary_files`` gives them; PIL images) or file paths, in the column ``column`` ("image" by default, or
"path"); the other columns are passed through. Every row gets its result and an ``error`` column (None when all went
well): one bad image never fails the batch. Captions are those of ``Blip2Pipeline.caption`` with the same options.
The columns an adapter adds are pyarrow arrays of the types its ``schema`` declares, whether or not a row of the
batch failed, so that every Parquet file Ray writes from them has the same schema. This module imports without Ray
(``pip install 'mlx-blip2[ray]'`` to use Ray itself).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _column(batch, column: str) -> list:
    """The values of a column: file paths (str), image arrays, bytes or PIL images."""
    if column not in batch:
        raise KeyError(f"the batch has no column {column!r} (columns: {list(batch.keys())}); pass column=...")
    return list(batch[column])


class _Actor:
    """Shared by the adapters: the batch's images decoded in threads, then the model run on the good ones, each
    error caught per row."""

    def __init__(self, column: str, workers: int | None):
        self.column = column
        self.pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1))

    def _decode(self, preprocess, values: list) -> tuple[list, list]:
        def one(value):
            try:
                value = os.fspath(value) if isinstance(value, os.PathLike) else value
                return preprocess(value), None
            except Exception as e:  # noqa: BLE001 - one bad image never fails the batch
                return None, str(e) or type(e).__name__

        results = list(self.pool.map(one, values))
        return [r[0] for r in results], [r[1] for r in results]

    def _each(self, infer, pixels: list, what: str) -> list[tuple]:
        """(result, error) per image: ``infer`` on the batch, or, when that raises, on each image alone, so that
        only a bad one fails."""
        try:
            return [(r, None) for r in infer(pixels)]
        except Exception as e:  # noqa: BLE001 - one bad image never fails the batch
            if len(pixels) == 1:
                return [(None, f"{what} failed: {type(e).__name__}: {e}")]
            return [r for p in pixels for r in self._each(infer, [p], what)]

    def _results(self, batch, preprocess, infer, what: str) -> tuple[list, list]:
        """The results of ``infer`` and the errors (None where all went well), a row each of the batch."""
        pixels, errors = self._decode(preprocess, _column(batch, self.column))
        good = [i for i, e in enumerate(errors) if e is None]
        results: list = [None] * len(errors)
        for i, (result, error) in zip(good, self._each(infer, [pixels[i] for i in good], what) if good else []):
            results[i], errors[i] = result, error
        return results, errors

    def _out(self, batch, **columns) -> dict:
        """The batch's columns, and the new ones typed as ``schema`` declares (Ray keeps pyarrow arrays as they are,
        where it would type a column of Nones as null)."""
        import pyarrow as pa

        out = {k: np.asarray(batch[k]) for k in batch.keys()}  # noqa: SIM118 - a dict or a DataFrame
        schema = self.schema
        for name, values in columns.items():
            out[name] = values if isinstance(values, pa.Array) else pa.array(values, schema.field(name).type)
        return out


class Captioner(_Actor):
    """``Dataset.map_batches(Captioner, fn_constructor_kwargs={"model": ...})``: adds ``caption`` and ``error``.

    ``model``: a captioning checkpoint (path or Hub id); ``column``: the images or paths; ``prompt`` and generation
    options (``max_new_tokens``, ``num_beams``...) as ``Blip2Pipeline.caption`` takes them."""

    def __init__(self, model: str, column: str = "image", prompt: str | None = None, dtype: str | None = None,
                 workers: int | None = None, **generate_kwargs):
        from .library.run import BatchCaptioner
        from .pipelines import load

        super().__init__(column, workers)
        pipe = load(model, dtype=_dtype(dtype))
        self.captioner = BatchCaptioner(pipe, prompt, **generate_kwargs)

    @property
    def schema(self):
        """The columns added: ``caption`` and ``error``, both strings (null where not set)."""
        import pyarrow as pa

        return pa.schema([("caption", pa.string()), ("error", pa.string())])

    def __call__(self, batch) -> dict:
        captions, errors = self._results(batch, self.captioner.preprocess, self.captioner, "captioning")
        return self._out(batch, caption=captions, error=errors)


class ImageEmbedder(_Actor):
    """``Dataset.map_batches(ImageEmbedder, fn_constructor_kwargs={"model": ...})``: adds ``embedding`` and
    ``error``. ``model``: a retrieval checkpoint (only its vision half is loaded). ``embedding``: the normalised ITC
    query embeddings that ``mlx-blip2 index`` stores, a fixed-size list of Q fixed-size lists of D float32 (Q, D:
    the checkpoint's ``num_query_tokens``, ``image_text_hidden_size``), or, when ``pooled``, their mean, re-normalised,
    a fixed-size list of D float32; null for an image that failed."""

    def __init__(self, model: str, column: str = "image", pooled: bool = False, dtype: str | None = None,
                 workers: int | None = None):
        from .photo_index import load_embedder

        super().__init__(column, workers)
        self.pipe = load_embedder(model, dtype=_dtype(dtype))  # the retrieval pipeline's vision half
        self.pooled = pooled
        config = self.pipe.model.config
        self.shape = (config.image_text_hidden_size,) if pooled else \
            (config.num_query_tokens, config.image_text_hidden_size)

    @property
    def schema(self):
        """The columns added: ``embedding`` (float32 fixed-size lists of ``shape``) and ``error`` (string)."""
        import pyarrow as pa

        embedding = pa.float32()
        for size in reversed(self.shape):
            embedding = pa.list_(embedding, size)
        return pa.schema([("embedding", embedding), ("error", pa.string())])

    def _embedding_array(self, embeddings: list):
        """Rows of ``shape`` (None: null) as one fixed-size-list array, built on a single float32 buffer."""
        import pyarrow as pa

        flat = np.zeros((len(embeddings), *self.shape), np.float32)
        for i, e in enumerate(embeddings):
            if e is not None:
                flat[i] = e
        array = pa.array(flat.reshape(-1))
        for size in reversed(self.shape[1:]):
            array = pa.FixedSizeListArray.from_arrays(array, size)
        return pa.FixedSizeListArray.from_arrays(array, self.shape[0],
                                                 mask=pa.array([e is None for e in embeddings]))

    def _embed(self, pixels: list) -> np.ndarray:
        embeds = self.pipe.embed_images(pixels, preprocessed=True)
        if self.pooled:
            embeds = embeds.mean(axis=1)
            embeds = embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)
        return embeds

    def __call__(self, batch) -> dict:
        embeddings, errors = self._results(batch, self.pipe.preprocess, self._embed, "embedding")
        return self._out(batch, embedding=self._embedding_array(embeddings), error=errors)


def _dtype(name: str | None):
    if name is None:
        return None
    import mlx.core as mx

    return getattr(mx, name)
