"""Model adapters: apply a sub-network ψ to a model (elastic ViT for growth, unfreezer for fine-tuning)."""
