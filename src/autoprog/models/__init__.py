"""Model definitions and the model factory."""
