"""Examples -> padded training batches whose labels say what the loss reads.

A row is the prompt exactly as inference builds it (the processor's ``encode_text``: image tokens in front when the
checkpoint has ``image_token_index``; InstructBLIP's instruction for the Q-Former too), then the target and an end
token: OPT ends with a newline (BLIP-2's OPT models were trained so, and captioning stops on it), LLaMA with its
EOS, T5 with the EOS its tokenizer appends. Decoder-only rows are ``prompt + target``; T5's encoder reads the
prompt and its labels are the target alone (the model feeds the decoder the labels shifted right).

Labels are -100 on the image tokens, on padding and, unless ``train_on_prompt``, on the prompt (BOS included), so
the loss is the mean over the target tokens only. Rows are padded on the right (transformers' training layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..images import ImageLoadError, open_image
from ..models.loss import IGNORE_INDEX
from .datasets import Example

@dataclass
class Collator:
    """Builds batches for ``model(**batch).loss``; prompts as the pipeline's (caption prompt or VQA template)."""

    pipeline: object  # a Blip2Pipeline / InstructBlipPipeline: model, processor, caption_prompt, vqa_template
    prompt: str | None = None  # the caption prompt ("a photo of"); None: the pipeline's default
    max_target_tokens: int = 64
    train_on_prompt: bool = False

    def __post_init__(self):
        self.model, self.processor = self.pipeline.model, self.pipeline.processor
        self.tokenizer = self.processor.tokenizer
        config = self.model.config
        self.decoder_only = config.use_decoder_only_language_model
        self.text_type = config.text_config.model_type
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else config.text_config.pad_token_id or 0
        self.end_ids = self._end_ids()

    def describe(self) -> str:
        """What the labels mask, in one line (the CLI prints it)."""
        masked = "image tokens, padding" + (", the prompt" if self.decoder_only and not self.train_on_prompt else "")
        return f"labels are -100 (not scored) on: {masked}; the loss is the mean over the rest"

    def _end_ids(self) -> list[int]:
        if not self.decoder_only:
            return []  # T5's tokenizer appends its EOS
        if self.text_type == "opt":
            newline = self.tokenizer.encode("\n", add_special_tokens=False)
            if len(newline) == 1:
                return newline
        return [self.tokenizer.eos_token_id]

    def prompt_of(self, example: Example) -> str | None:
        if example.question is not None:
            return self.pipeline.vqa_template.format(example.question)
        return self.pipeline.caption_prompt(self.prompt)

    def _prompt_ids(self, prompt: str | None) -> dict:
        if prompt is None:  # as generation without a prompt: (image tokens,) BOS
            return {"input_ids": np.array(self.model.default_input_ids(1)[0]).tolist()}
        enc = self.processor.encode_text([prompt], padding=False, return_tensors=None)
        return {k: list(v[0]) for k, v in enc.items() if k in ("input_ids", "qformer_input_ids")}

    def _target_ids(self, prompt: str | None, target: str) -> list[int]:
        if not self.decoder_only:
            ids = self.tokenizer(target, add_special_tokens=True)["input_ids"]
            return ids[:self.max_target_tokens - 1] + ids[-1:] if len(ids) > self.max_target_tokens else ids
        # Tokenised after the prompt, as generation would continue it; a prompt that does not end in a space is
        # followed by one (BPE tokenizers carry the space in the next word's token).
        sep = " " if prompt and not prompt.endswith(" ") else ""
        plain = self.tokenizer(prompt or "", add_special_tokens=True)["input_ids"]
        full = self.tokenizer((prompt or "") + sep + target, add_special_tokens=True)["input_ids"]
        ids = full[len(plain):] if full[:len(plain)] == plain else \
            self.tokenizer(sep + target, add_special_tokens=False)["input_ids"]
        return ids[:self.max_target_tokens - len(self.end_ids)] + self.end_ids

    def encode(self, example: Example) -> dict:
        """One example's token rows (no images): input_ids, labels and, for InstructBLIP, qformer_input_ids."""
        prompt = self.prompt_of(example)
        row = self._prompt_ids(prompt)
        target = self._target_ids(prompt, example.target)
        prompt_ids = row["input_ids"]
        if not self.decoder_only:
            row["labels"] = target
            return row
        image_id = self.model.config.image_token_index
        keep = [self.train_on_prompt and t != image_id for t in prompt_ids]
        row["input_ids"] = prompt_ids + target
        row["labels"] = [t if k else IGNORE_INDEX for t, k in zip(prompt_ids, keep)] + target
        return row

    def __call__(self, examples: list[Example], errors: list[str] | None = None) -> dict | None:
        """A batch of numpy arrays; examples whose image cannot be read become error lines (None if none left)."""
        pixels, rows = [], []
        for ex in examples:
            try:
                pixels.append(self.processor.image_processor.preprocess(open_image(ex.image)))
            except (OSError, ImageLoadError, ValueError) as e:
                if errors is not None:
                    errors.append(f"{ex.where or ex.image}: {e}")
                continue
            rows.append(self.encode(ex))
        if not rows:
            return None
        batch = {"pixel_values": np.stack(pixels).astype(np.float32)}
        batch.update(pad_rows(rows, "input_ids", self.pad_id, "attention_mask"))
        batch.update(pad_rows(rows, "labels", IGNORE_INDEX))
        if "qformer_input_ids" in rows[0]:
            qformer_pad = self.processor.qformer_tokenizer.pad_token_id or 0
            batch.update(pad_rows(rows, "qformer_input_ids", qformer_pad, "qformer_attention_mask"))
        return batch


def pad_rows(rows: list[dict], key: str, pad: int, mask_key: str | None = None) -> dict:
    """Right-pads ``rows[i][key]`` to one length (and their keep-mask under ``mask_key``)."""
    width = max(len(r[key]) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r[key])] = r[key]
        mask[i, :len(r[key])] = 1
    return {key: ids, mask_key: mask} if mask_key else {key: ids}
