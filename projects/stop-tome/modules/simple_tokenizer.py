"""``modules.simple_tokenizer`` as in STOP / CLIP4Clip (``SimpleTokenizer``: tokenize, convert_tokens_to_ids)."""

from stop_tome.tokenizer import ClipTokenizer as SimpleTokenizer

__all__ = ["SimpleTokenizer"]
