"""Fine-tuning BLIP-2 and InstructBLIP in MLX: data, trainable groups, the training loop, checkpoints, adapters."""
