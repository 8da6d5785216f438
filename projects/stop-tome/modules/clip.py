"""``modules.clip`` as in STOP: the CLIP model and the local weight loader."""

from stop_tome.clip_model import CLIP, ClipSpec, spec_from_state_dict
from stop_tome.weights import clip_file, load_clip_state_dict

__all__ = ["CLIP", "ClipSpec", "clip_file", "load_clip_state_dict", "spec_from_state_dict"]
