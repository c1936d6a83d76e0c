"""The prefix cache's disk tier (see `cache`): the block file format, the model identity's
directory, the read-ahead, and the cache that ties them to a KV pool."""

from .block_file import CorruptBlock
from .cache import DiskKVCache
from .identity_dir import IDENTITY_FILE, model_identity

__all__ = ["CorruptBlock", "DiskKVCache", "IDENTITY_FILE", "model_identity"]
