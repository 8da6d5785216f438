"""EfficientSAM3: distilling SAM3's image encoder into small students."""
