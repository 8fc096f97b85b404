"""Models: the built-in ViT and the timm factory, the diffusion backbones (DiT, diffusers DiT) with SID."""
