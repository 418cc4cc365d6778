"""Benchmark metrics in pure Python, equal to the official implementations (pycocoevalcap, the VQA evaluation)."""

from .caption import score_captions
from .gqa import gqa_accuracy
from .ptb_tokenizer import tokenize, tokenize_captions
from .vqa import normalize_answer, vqa_accuracy

__all__ = ["score_captions", "gqa_accuracy", "tokenize", "tokenize_captions", "normalize_answer", "vqa_accuracy"]
