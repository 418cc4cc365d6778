"""Evaluation recipes: LAVIS's evaluation configs (``lavis/projects/blip2/eval/*.yaml``) per task, and the figures
published for them.

A recipe names the file it follows, the prompt, the decoding (beams, new-token bounds, length penalty) and the image
size LAVIS evaluates at. Generation options resolve through :func:`mlx_blip2.generation.recipes.resolve_recipe`, the one
place task recipes become options, so a command-line override works as it does for ``caption`` and ``ask``.

Published figures: the BLIP-2 paper (Li et al., 2023, arXiv:2301.12597) tables, and the scores LAVIS wrote at the
top of its eval configs; only figures checked against those sources are listed.
"""

from __future__ import annotations

from ..generation.options import OPTION_FLAGS
from ..generation.recipes import resolve_recipe

LAVIS_EVAL = "salesforce/LAVIS lavis/projects/blip2/eval/"
PAPER = "BLIP-2 paper (arXiv:2301.12597)"

CAPTION = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8}
VQA = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": 0.0}
# LAVIS's blip2_t5.predict_answers defaults to length_penalty=-1 (blip2_opt's to 0); the VQA configs leave it unset
VQA_T5 = {"length_penalty": -1.0}
VQA_PROMPT = "Question: {} Short answer:"

RECIPES = {
    "coco_caption": {
        "kind": "caption", "source": LAVIS_EVAL + "caption_coco_opt2.7b_eval.yaml",
        "prompt": "a photo of", "generation": CAPTION, "image_size": 364,
        "notes": "COCO Karpathy test (coco_karpathy_test.json) or captions_val2017.json; the prompt is the "
                 "caption_coco_opt models' (model config `prompt`), the caption continues it",
        "published": [
            {"model": "BLIP-2 ViT-g OPT-2.7B (COCO fine-tuned)", "metric": "Bleu_4", "value": 43.7,
             "source": PAPER + " Table 3"},
            {"model": "BLIP-2 ViT-g OPT-2.7B (COCO fine-tuned)", "metric": "CIDEr", "value": 145.8,
             "source": PAPER + " Table 3"},
            {"model": "BLIP-2 ViT-g OPT-6.7B (COCO fine-tuned)", "metric": "Bleu_4", "value": 43.5,
             "source": PAPER + " Table 3"},
            {"model": "BLIP-2 ViT-g OPT-6.7B (COCO fine-tuned)", "metric": "CIDEr", "value": 145.2,
             "source": PAPER + " Table 3"},
            {"model": "BLIP-2 ViT-g FlanT5-XL (COCO fine-tuned)", "metric": "Bleu_4", "value": 42.4,
             "source": PAPER + " Table 3"},
            {"model": "BLIP-2 ViT-g FlanT5-XL (COCO fine-tuned)", "metric": "CIDEr", "value": 144.5,
             "source": PAPER + " Table 3"},
        ] + [{"model": "LAVIS caption_coco_opt2.7b", "metric": m, "value": v,
              "source": LAVIS_EVAL + "caption_coco_opt2.7b_eval.yaml (header)"}
             for m, v in (("Bleu_1", 83.2), ("Bleu_4", 43.8), ("METEOR", 31.7), ("ROUGE_L", 62.0), ("CIDEr", 146.1),
                          ("SPICE", 25.2))],
    },
    "nocaps": {
        "kind": "caption", "source": LAVIS_EVAL + "caption_nocaps_out_domain_flant5xl_eval.yaml",
        "prompt": None, "generation": {"num_beams": 5, "max_new_tokens": 80, "min_new_tokens": 10,
                                       "length_penalty": 1.0},
        "image_size": 224, "notes": "NoCaps val (nocaps_val_4500_captions.json): overall and in-, near-, "
                                    "out-of-domain, each scored on its own images",
        "published": [],
    },
    "flickr30k_caption": {
        "kind": "caption", "source": LAVIS_EVAL + "caption_coco_opt2.7b_eval.yaml",
        "prompt": "a photo of", "generation": CAPTION, "image_size": 364,
        "notes": "Flickr30k Karpathy test (LAVIS flickr30k_test.json or dataset_flickr30k.json); LAVIS has no "
                 "BLIP-2 Flickr30k captioning config, so the COCO one is used", "published": [],
    },
    "vqav2": {
        "kind": "vqa", "source": LAVIS_EVAL + "vqav2_zeroshot_opt_eval.yaml", "prompt": VQA_PROMPT,
        "generation": VQA, "t5_generation": VQA_T5, "image_size": 224,
        "notes": "VQAv2 val: official questions and annotations files",
        "published": [
            {"model": "BLIP-2 ViT-g OPT-2.7B (zero-shot)", "metric": "overall", "value": 53.5,
             "source": PAPER + " Table 2 (val)"},
            {"model": "LAVIS pretrain_opt2.7b (zero-shot)", "metric": "overall", "value": 51.88,
             "source": LAVIS_EVAL + "vqav2_zeroshot_opt_eval.yaml (header)"},
        ],
    },
    "vqav2_test_dev": {
        "kind": "vqa", "source": LAVIS_EVAL + "vqav2_zeroshot_flant5xl_eval.yaml", "prompt": VQA_PROMPT,
        "generation": VQA, "t5_generation": VQA_T5, "image_size": 224,
        "notes": "VQAv2 test-dev: writes the submission file for the EvalAI server (no answers to score here)",
        "published": [],
    },
    "okvqa": {
        "kind": "vqa", "source": LAVIS_EVAL + "okvqa_zeroshot_flant5xl_eval.yaml", "prompt": VQA_PROMPT,
        "generation": VQA, "t5_generation": VQA_T5, "image_size": 224,
        "notes": "OK-VQA val (official VQA format); LAVIS also lemmatizes answers with spaCy (apply_lemmatizer), "
                 "which is not done here",
        "published": [{"model": "LAVIS pretrain_flant5xl (zero-shot)", "metric": "overall", "value": 41.22,
                       "source": LAVIS_EVAL + "okvqa_zeroshot_flant5xl_eval.yaml (header)"}],
    },
    "gqa": {
        "kind": "gqa", "source": LAVIS_EVAL + "gqa_zeroshot_flant5xl_eval.yaml", "prompt": VQA_PROMPT,
        "generation": VQA, "t5_generation": VQA_T5, "image_size": 224,
        "notes": "GQA balanced test-dev (testdev_balanced_questions.json)",
        "published": [
            {"model": "BLIP-2 ViT-g FlanT5-XXL (zero-shot)", "metric": "overall", "value": 44.7,
             "source": PAPER + " Table 2 (as LAVIS issue #99 quotes it)"},
            {"model": "LAVIS pretrain_flant5xl (zero-shot)", "metric": "overall", "value": 43.98,
             "source": LAVIS_EVAL + "gqa_zeroshot_flant5xl_eval.yaml (header)"},
        ],
    },
    "coco_retrieval": {
        "kind": "retrieval", "source": LAVIS_EVAL + "ret_coco_eval.yaml", "k_test": 128, "image_size": 364,
        "notes": "COCO Karpathy 5k test (coco_karpathy_test.json); ITC candidates re-scored by ITM + ITC",
        "published": [{"model": "BLIP-2 ViT-g (COCO fine-tuned)", "metric": "txt_r1", "value": 85.4,
                       "source": PAPER + " Table 5"}],
    },
    "flickr30k_retrieval": {
        "kind": "retrieval", "source": LAVIS_EVAL + "ret_flickr_eval.yaml", "k_test": 128, "image_size": 364,
        "notes": "Flickr30k 1k test (flickr30k_test.json), zero-shot from the COCO fine-tuned model",
        "published": [{"model": "BLIP-2 ViT-g (zero-shot)", "metric": m, "value": v, "source": PAPER + " Table 5"}
                      for m, v in (("txt_r1", 97.6), ("txt_r5", 100.0), ("txt_r10", 100.0), ("img_r1", 89.7),
                                   ("img_r5", 98.1), ("img_r10", 98.9))],
    },
}
TASKS = tuple(RECIPES)


def recipe_for(task: str) -> dict:
    if task not in RECIPES:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    return RECIPES[task]


INSTRUCTBLIP_SOURCE = ("salesforce/LAVIS lavis/projects/instructblip/ (caption_coco_*_eval_test.yaml, "
                       "qa_okvqa_*_eval.yaml), as mlx_blip2.generation.recipes holds them")


def model_recipe(task: str, pipe) -> dict:
    """The task's recipe for this pipeline's model: LAVIS's BLIP-2 eval config, with the Flan-T5 VQA length penalty
    for T5 models; an InstructBLIP model takes InstructBLIP's own prompts and settings (the pipeline's)."""
    recipe = dict(recipe_for(task))
    if recipe["kind"] == "retrieval":
        return recipe
    if getattr(pipe, "caption_instruction", None) is not None:  # InstructBLIP
        caption = recipe["kind"] == "caption"
        recipe.update(source=INSTRUCTBLIP_SOURCE, prompt=None if caption else pipe.vqa_template,
                      generation=dict(pipe.caption_defaults if caption else pipe.vqa_defaults))
        recipe.pop("t5_generation", None)
        return recipe
    if pipe.model.config.text_config.model_type == "t5":
        recipe["generation"] = {**recipe["generation"], **recipe.get("t5_generation", {})}
    recipe.pop("t5_generation", None)
    return recipe


def resolve_options(recipe: dict, overrides: dict | None = None):
    """GenerationOptions of a :func:`model_recipe` with ``overrides`` (the command line's) applied; an error names
    the option by its flag."""
    return resolve_recipe(recipe["generation"], overrides, names=OPTION_FLAGS)
