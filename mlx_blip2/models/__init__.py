"""The models, one file each with its config beside it, as in mlx-lm: ViT-g (vision), Q-Former (qformer), OPT (opt),
Flan-T5 (t5), Vicuna through mlx-lm's LLaMA (llama), BLIP-2 (blip2), InstructBLIP (instructblip) and the retrieval
heads (retrieval). Shared pieces live in base; loading reads and loads checkpoints, registry says what a checkpoint
holds. Nothing here imports a layer above: ``generate`` is added by :mod:`mlx_blip2.generation.conditional`."""
