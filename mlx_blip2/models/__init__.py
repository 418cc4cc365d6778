"""The models, one file each with its config beside it, as in mlx-lm: ViT-g (vision), Q-Former (qformer), OPT (opt),
Flan-T5 (t5), BLIP-2 (blip2) and its retrieval heads (retrieval). Shared pieces live in base."""
