"""``from modules.clip4clip import CLIP4Clip`` (the guide's import) -> ``stop_tome.model``."""

from stop_tome.model import CLIP4Clip, task_config

__all__ = ["CLIP4Clip", "task_config"]
