"""A searchable photo index: BLIP-2 image embeddings beside an SQLite catalogue, text search by ITC with an
optional ITM rerank.

    mlx-blip2 index ~/Pictures --recursive --db library.sqlite [--model Salesforce/blip2-itm-vit-g]
    mlx-blip2 search "a dog on a beach" --db library.sqlite [-k 10] [--rerank] [--json]
    mlx-blip2 search --db library.sqlite        # queries from stdin, model and embeddings loaded once
    mlx-blip2 duplicates --db library.sqlite [--threshold 0.95] [--json]

- :mod:`.store`: the SQLite catalogue (exact paths, size, mtime, content hash, matrix row or error; WAL, one
  transaction per batch) and :mod:`.vectors`, the memory-mapped float16 embedding matrix beside it
  (``library.sqlite.vectors``); :mod:`.migrate`: schema upgrades and compaction of the matrix.
- :mod:`.indexer`: files (``files.find_images``) -> background decode (``Blip2RetrievalPipeline.preprocess``) ->
  ``Blip2RetrievalPipeline.embed_images`` -> store; unchanged files skipped, moved ones followed by content hash,
  changed ones re-embedded, deleted ones dropped, unreadable ones recorded.
- :mod:`.job`: the whole of ``mlx-blip2 index``: an :class:`~.job.IndexJob` run in one process, or under
  ``mlx.launch`` by :mod:`.distributed` (each rank embeds its share into a part index that rank 0 merges).
- :mod:`.search`: ITC (max over the query tokens) over the whole matrix in chunks, top k, ITM rerank.
- :mod:`.duplicates`: groups of near-duplicate images by embedding similarity.
"""

from .indexer import (
    IndexReport,
    check_retrieval_checkpoint,
    index_paths,
    load_embedder,
    model_id,
)
from .search import SearchResult, half_to_float, itc_scores, search, top_k
from .store import SCHEMA_VERSION, Entry, Matrix, Move, PhotoIndex, PhotoIndexError

__all__ = [
    "SCHEMA_VERSION", "Entry", "IndexReport", "Matrix", "Move", "PhotoIndex", "PhotoIndexError", "SearchResult",
    "check_retrieval_checkpoint", "half_to_float", "index_paths", "itc_scores", "load_embedder", "model_id", "search",
    "top_k",
]
