"""STOP video-text retrieval on CLIP4Clip with per-frame token merging."""
