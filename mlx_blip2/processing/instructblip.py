"""InstructBLIP's processor: BLIP-2's, plus the Q-Former's own (BERT) tokenizer for the instruction.

Matches transformers' ``InstructBlipProcessor``: the text is tokenized twice, by the language model's tokenizer
(``input_ids``, ``attention_mask``, with the ``<image>`` tokens in front when the checkpoint uses them) and by the
Q-Former's tokenizer (``qformer_input_ids``, ``qformer_attention_mask``) with the same ``padding``, ``truncation``
and ``max_length`` (``max_length`` is not reduced by the image tokens there). As in transformers'
``ProcessorMixin._merge_kwargs``, tokenizer call defaults stored in the language tokenizer's init kwargs (such as
``padding_side``) apply to the Q-Former tokenizer as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .blip2 import Blip2Processor, check_dir

QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
# Tokenizer call arguments transformers copies from the language tokenizer's init kwargs onto every text call.
_INHERITED_CALL_KWARGS = ("padding_side", "add_special_tokens", "pad_to_multiple_of")


class InstructBlipProcessor(Blip2Processor):
    """Image processor + language tokenizer + Q-Former tokenizer (``qformer_tokenizer/`` in a checkpoint)."""

    def __init__(self, image_processor, tokenizer, qformer_tokenizer, num_query_tokens: int | None = None):
        super().__init__(image_processor, tokenizer, num_query_tokens)
        self.qformer_tokenizer = qformer_tokenizer

    @classmethod
    def from_pretrained(cls, directory) -> InstructBlipProcessor:
        directory = Path(directory)
        check_dir(directory)
        qformer_dir = directory / QFORMER_TOKENIZER_DIR
        if not qformer_dir.is_dir():
            raise FileNotFoundError(
                f"checkpoint directory '{directory}' has no {QFORMER_TOKENIZER_DIR}/ folder: InstructBLIP needs the "
                "Q-Former's tokenizer there (as the Hub's Salesforce/instructblip-* repositories have it)")
        base = Blip2Processor.from_pretrained(directory)
        from transformers import AutoTokenizer

        return cls(base.image_processor, base.tokenizer, AutoTokenizer.from_pretrained(str(qformer_dir)),
                   base.num_query_tokens)

    def _qformer_call_kwargs(self) -> dict:
        init = getattr(self.tokenizer, "init_kwargs", {}) or {}
        return {k: getattr(self.tokenizer, k, init[k]) for k in _INHERITED_CALL_KWARGS if k in init}

    def encode_text(self, texts, padding=True, max_length=None, truncation=None, with_image_tokens: bool = True,
                    return_tensors="np") -> dict:
        """input_ids and attention_mask (see :meth:`Blip2Processor.encode_text`) plus the instruction's
        qformer_input_ids and qformer_attention_mask."""
        out = super().encode_text(texts, padding=padding, max_length=max_length, truncation=truncation,
                                  with_image_tokens=with_image_tokens, return_tensors=return_tensors)
        enc = self.qformer_tokenizer(list(texts), padding=padding, truncation=truncation, max_length=max_length,
                                     return_token_type_ids=False, return_attention_mask=True,
                                     **self._qformer_call_kwargs())
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if return_tensors == "np":
            if len({len(row) for row in ids}) > 1:
                raise ValueError("instructions tokenise to different lengths; pass padding=True to batch them")
            ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
        out["qformer_input_ids"], out["qformer_attention_mask"] = ids, mask
        return out
