"""Training batches shared by the gradient fixture maker and the gradient tests, and torch's side of them.

Each case is a padded batch of three (image, prompt, caption) rows with labels (-100 on padding, image tokens and
part of the prompt), LoRA (rank 4, alpha 8) on the language model's q/v projections with seeded non-zero A and B
(B starts at zero in training, which would make A's gradient vanish), and the loss and gradients transformers +
torch autograd (+ peft for LoRA) compute for every trainable group.
"""

import numpy as np
from reference_cases import PROMPTS, make_images

from conftest import FIXTURES

CASES = ["tiny-blip2-opt", "tiny-blip2-opt-legacy", "tiny-blip2-flan-t5", "tiny-instructblip-vicuna"]
CAPTIONS = ["a red and green square", "two dogs", "a cat on a sofa in the sun"]
LORA_RANK, LORA_ALPHA = 4, 8.0
LORA_TARGETS = {"t5": r".*language_model.*\.(SelfAttention|EncDecAttention)\.(q|v)$",
                "opt": r".*language_model.*\.(q_proj|v_proj)$", "llama": r".*language_model.*\.(q_proj|v_proj)$"}


def lora_values(name: str, shape: tuple, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    return (rng.standard_normal(shape) * 0.2).astype(np.float32)


def to_ours(name: str) -> str:
    """peft's parameter path -> ours (``lora_A.default.weight`` -> ``lora_a``, transposed)."""
    return name.replace(".lora_A.default.weight", ".lora_a").replace(".lora_B.default.weight", ".lora_b")


def make_inputs(name: str) -> dict:
    """The batch as numpy arrays, built with transformers' processor."""
    import transformers

    directory = FIXTURES / name
    images = make_images()
    if name.startswith("tiny-instructblip"):
        processor = transformers.InstructBlipProcessor.from_pretrained(directory)
    else:
        processor = transformers.Blip2Processor.from_pretrained(directory)
    tokenizer = processor.tokenizer
    if "t5" in name:
        enc = processor(images=images, text=PROMPTS, return_tensors="np", padding=True)
        target = tokenizer(CAPTIONS, return_tensors="np", padding=True)
        labels = np.where(target["attention_mask"] == 1, target["input_ids"], -100)
    else:
        texts = [f"{p} {c}" for p, c in zip(PROMPTS, CAPTIONS)]
        enc = processor(images=images, text=texts, return_tensors="np", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        image_token = getattr(processor, "image_token", None)
        image_id = tokenizer.convert_tokens_to_ids(image_token.content if hasattr(image_token, "content")
                                                   else image_token) if image_token else -1
        labels = np.where((mask == 1) & (ids != image_id), ids, -100)
        first = int(np.argmax(labels[0] != -100))
        labels[0, first:first + 3] = -100  # a masked prompt in one row
    inputs = {k: np.asarray(v) for k, v in enc.items()}
    inputs["labels"] = labels.astype(np.int64)
    return inputs


def torch_loss_and_grads(name: str, inputs: dict, seed: int = 0) -> tuple[float, dict[str, np.ndarray]]:
    """transformers' loss and torch's gradients of every trainable group, keyed by our parameter paths."""
    import peft
    import torch
    import transformers
    from transformers.loss.loss_utils import ForCausalLMLoss

    directory = FIXTURES / name
    cls = (transformers.InstructBlipForConditionalGeneration if name.startswith("tiny-instructblip")
           else transformers.Blip2ForConditionalGeneration)
    hf = cls.from_pretrained(directory, dtype=torch.float32).eval()
    text_type = hf.config.text_config.model_type
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                             target_modules=LORA_TARGETS[text_type])
    hf = peft.inject_adapter_in_model(config, hf)
    with torch.no_grad():
        for k, p in hf.named_parameters():
            if ".lora_" in k:
                p.copy_(torch.from_numpy(lora_values(to_ours(k), tuple(p.T.shape), seed).T.copy()))
    for p in hf.parameters():
        p.requires_grad_(True)
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    if name.endswith("legacy"):  # transformers 4.45's layout: projected queries before the prompt
        q = hf.get_image_features(t["pixel_values"]).pooler_output
        embeds = torch.cat([q, hf.language_model.get_input_embeddings()(t["input_ids"])], dim=1)
        mask = torch.cat([torch.ones(q.shape[:2], dtype=t["attention_mask"].dtype), t["attention_mask"]], dim=1)
        logits = hf.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        loss = ForCausalLMLoss(logits[:, -t["labels"].shape[1]:].contiguous(), t["labels"], hf.config.text_config.vocab_size)
    else:
        loss = hf(**t).loss
    loss.backward()
    grads = {}
    for k, p in hf.named_parameters():
        group = k.split(".", 1)[0]
        if ".lora_" in k:
            grads[to_ours(k)] = p.grad.numpy().T.copy()
        elif group in ("query_tokens", "qformer", "language_projection", "vision_model") and p.grad is not None:
            g = p.grad.numpy()
            grads[k] = g.transpose(0, 2, 3, 1).copy() if g.ndim == 4 else g.copy()  # conv: MLX is channels-last
    return float(loss.item()), grads


def ours_loss_and_grads(name: str, inputs: dict, seed: int = 0) -> tuple[float, dict[str, np.ndarray]]:
    """The same with mlx-blip2: every group trainable (qformer, vit, lora), LoRA set to the same values."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_blip2 import load
    from mlx_blip2.training.trainable import LoraOptions, set_trainable

    model = load(FIXTURES / name).model
    set_trainable(model, ("qformer", "vit", "lora"), LoraOptions(rank=LORA_RANK, alpha=LORA_ALPHA, dropout=0.0))
    lora = [(k, mx.array(lora_values(k, v.shape, seed))) for k, v in tree_flatten(model.trainable_parameters())
            if ".lora_" in k]
    model.update(tree_unflatten(lora))
    batch = {k: mx.array(v) for k, v in inputs.items()}
    loss, grads = nn.value_and_grad(model, lambda m: m(**batch).loss)(model)
    return loss.item(), {k: np.array(v) for k, v in tree_flatten(grads)}


def group_errors(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> dict[str, float]:
    """Per group (query_tokens, qformer, language_projection, vision_model, lora_a, lora_b): |ours - theirs| / |theirs|
    over the group's concatenated gradients."""
    from mlx_blip2.training.trainable import group_of

    assert sorted(ours) == sorted(theirs), sorted(set(ours) ^ set(theirs))
    diff, norm = {}, {}
    for k, t in theirs.items():
        g = group_of(k)
        diff[g] = diff.get(g, 0.0) + float(np.sum((ours[k].astype(np.float64) - t) ** 2))
        norm[g] = norm.get(g, 0.0) + float(np.sum(t.astype(np.float64) ** 2))
    return {g: (diff[g] / norm[g]) ** 0.5 for g in diff}
