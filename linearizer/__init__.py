"""linearizer: distill a frozen ViT teacher into a linear-time Adventurer (Mamba-2) student."""
