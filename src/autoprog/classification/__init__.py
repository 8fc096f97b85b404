"""Image classification (ViT pre-training with growth): trainer, runner, adaptive regularization, reports."""
