"""Models: the built-in ViT and the timm factory, the diffusion backbones (DiT, diffusers DiT; UNet + CLIP text encoder) with SID."""
