"""Teacher-embedding stores: the reference's binary layout (exact fp16) and compact variants."""

from .codec import CODECS, Codec, get_codec
from .parallel import ParallelReader, split_fp16
from .reader import EmbeddingStore, MissingEmbeddingError
from .writer import StoreWriter, read_keys

__all__ = [
    "CODECS",
    "Codec",
    "EmbeddingStore",
    "MissingEmbeddingError",
    "ParallelReader",
    "StoreWriter",
    "get_codec",
    "read_keys",
    "split_fp16",
]
