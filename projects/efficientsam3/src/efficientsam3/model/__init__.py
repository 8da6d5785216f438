"""Models: the 9 students, the SAM3 ViT teacher (exact and merged), the tiny stand-in."""
