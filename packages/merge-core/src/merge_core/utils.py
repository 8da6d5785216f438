"""ToMe's ``tome.utils`` names, so ``from merge_core.utils import parse_r`` works after switching imports."""

from .schedule import parse_r

__all__ = ["parse_r"]
