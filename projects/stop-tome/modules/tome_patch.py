"""``from modules.tome_patch import apply_tome_patch`` (the guide's import) -> ``stop_tome.merging``."""

from stop_tome.merging import apply_tome_patch, remove_tome_patch, save_merge_visualization

__all__ = ["apply_tome_patch", "remove_tome_patch", "save_merge_visualization"]
