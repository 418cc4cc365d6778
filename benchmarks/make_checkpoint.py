"""Build (once) a checkpoint with the real blip2-opt-2.7b architecture and random weights, in the Hub layout.

No download: transformers builds it from `Blip2Config()` (its defaults are blip2-opt-2.7b's vision and Q-Former) and
the OPT-2.7b text config the Hub checkpoint uses. About 2 minutes and 7.7 GB (bfloat16). The tokenizer and processor
files come from the tiny test checkpoint: sizes and speed are what matter here, not the text.

    python benchmarks/make_checkpoint.py [--out benchmarks/cache/blip2-opt-2.7b-random]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "cache" / "blip2-opt-2.7b-random"
OPT_2_7B = dict(
    model_type="opt", vocab_size=50304, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
    num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560, eos_token_id=50118,
    bos_token_id=2, pad_token_id=1, do_layer_norm_before=True,
)


def build(out: Path = DEFAULT_OUT) -> Path:
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    tic = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build directly in bfloat16: half the memory of float32
    # The Hub checkpoint's <image> id is 50265; the borrowed tiny tokenizer's is 400 (any id < vocab_size works).
    # transformers initialises the ViT with std 1e-10 (its weights would round to 0 in float16); use 0.02.
    config = Blip2Config(vision_config={"initializer_range": 0.02}, text_config=OPT_2_7B, num_query_tokens=32,
                         image_token_index=400)
    with torch.no_grad():
        model = Blip2ForConditionalGeneration(config).eval()
    torch.set_default_dtype(torch.float32)
    return save_checkpoint(model, out, ROOT / "tests" / "fixtures" / "tiny-blip2-opt", tic)


def save_checkpoint(model, out: Path, tiny: Path, tic: float) -> Path:
    """Save ``model`` in the Hub layout with the tiny checkpoint's tokenizer and processor files (32 queries, 224 px),
    atomically: built in a temporary folder beside ``out``, renamed at the end."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".building-"))
    model.save_pretrained(tmp, max_shard_size="5GB")
    for f in tiny.iterdir():
        if f.suffix == ".json" and f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, tmp / f.name)
    if (tiny / "qformer_tokenizer").is_dir():  # InstructBLIP's second tokenizer
        shutil.copytree(tiny / "qformer_tokenizer", tmp / "qformer_tokenizer")
    proc = json.loads((tmp / "processor_config.json").read_text())
    proc["num_query_tokens"] = 32
    proc["image_processor"]["size"] = {"height": 224, "width": 224}
    (tmp / "processor_config.json").write_text(json.dumps(proc, indent=2))
    tmp.rename(out)
    print(f"built {out} in {time.perf_counter() - tic:.0f} s")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    build(parser.parse_args().out)
