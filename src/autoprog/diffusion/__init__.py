"""Class-conditional diffusion fine-tuning and evaluation."""
