"""How big a model's KV pools are: bytes of its weights and KV, the default cap, the initial and
largest sizes of each pool, and the KV quantization its head dims allow."""

from __future__ import annotations

import hashlib
import logging

import mlx.core as mx
import numpy as np

from omlx.models.facts import parameter_bytes

from .engine_config import INITIAL_KV_BYTES
from .kv_cache import KVLayout, PagedKVStorage

log = logging.getLogger("omlx.engine")


def pool_plans(config, model, layout: KVLayout, kv_bits: int | None, group_size: int, scope: bytes,
           quantized_kv_start: int):
    """(name, bits, (initial blocks, max blocks), prefix scope) of each pool to build."""
    block_size = config.block_size
    initial_bytes = config.initial_kv_bytes
    if quantized_kv_start <= 0:
        if config.num_blocks:
            sizes = (config.num_blocks, config.num_blocks)
        else:
            cap = config.kv_cache_bytes or default_kv_cache_bytes(parameter_bytes(model))
            sizes = _initial_and_max(layout, block_size, initial_bytes, cap, kv_bits, group_size)
        return [("main", kv_bits, sizes, scope)]
    # Two pools.  The float pool only ever holds sequences' first `quantized_kv_start`
    # tokens: at most that for every sequence slot (plus cached prefixes), and never more
    # than half the cap; the quantized pool may grow to the rest.  The two start at half
    # the usual initial size each.  The quantized pool's prefix hashes are scoped by the
    # threshold: its blocks past it were computed reading quantized KV, so they differ
    # from blocks of the same tokens in an engine that quantizes from another point.
    main_scope = scope + b"|quantized_kv_start=%d" % quantized_kv_start
    if config.num_blocks:
        main = (config.num_blocks, config.num_blocks)
        floats = (config.num_float_blocks or config.num_blocks,) * 2
    else:
        cap = config.kv_cache_bytes or default_kv_cache_bytes(parameter_bytes(model))
        float_bpb = PagedKVStorage.bytes_per_token(layout) * block_size
        slots = config.max_num_seqs * -(-quantized_kv_start // block_size) + 1
        float_cap = min(cap // 2, slots * float_bpb)
        main = _initial_and_max(layout, block_size, initial_bytes // 2, cap - float_cap, kv_bits, group_size)
        floats = _initial_and_max(layout, block_size, initial_bytes // 2, float_cap, None, group_size)
    return [("quantized", kv_bits, main, main_scope), ("float", None, floats, scope)]



def _initial_and_max(layout, block_size: int, initial_bytes: int, cap_bytes: int, kv_bits, group_size: int):
    """A growable pool's (initial, max) blocks: it starts at `initial_bytes` (or its cap)."""
    max_blocks = PagedKVStorage.blocks_for_budget(layout, block_size, cap_bytes, kv_bits, group_size)
    initial = PagedKVStorage.blocks_for_budget(layout, block_size, initial_bytes, kv_bits, group_size)
    return min(max_blocks, initial), max_blocks


def default_kv_cache_bytes(weights_bytes: int, memory_budget: int | None = None) -> int:
    """The KV cap when none is set: what the memory budget (by default 3/4 of physical
    memory) leaves after the weights, less a safety margin (a tenth of the budget, at
    least 1 GiB) for activations and the allocator's slack; never below the initial pool."""
    from omlx.settings import default_model_memory_bytes

    budget = memory_budget or default_model_memory_bytes()
    margin = max(budget // 10, 1 << 30)
    return max(INITIAL_KV_BYTES, budget - weights_bytes - margin)


def weights_fingerprint(model) -> bytes:
    """Identity of a model's weights for engines built without a scope (tests): parameter
    names, shapes, dtypes and a sample of each tensor's values."""
    from mlx.utils import tree_flatten

    digest = hashlib.blake2b(digest_size=16)
    for name, value in tree_flatten(model.parameters()):
        digest.update(f"{name}:{value.shape}:{value.dtype}".encode())
        sample = value.reshape(-1)[:64]
        if sample.dtype == mx.bfloat16:
            sample = sample.astype(mx.float32)
        digest.update(np.array(sample).tobytes())
    return b"weights:" + digest.digest()


def quantization_for(layout: KVLayout, kv_bits: int | None, group_size: int) -> tuple[int | None, int]:
    """The KV quantization a model can take: the asked group size, else a smaller one that
    divides its head dim; a model that takes none keeps a float pool, said in the log."""
    if kv_bits is None:
        return None, group_size
    if kv_bits not in (4, 8):
        raise ValueError(f"kv_bits must be 4 or 8, got {kv_bits}")
    for size in (group_size, 64, 32):
        if size <= group_size and layout.key_dim % size == 0 and layout.value_dim % size == 0:
            return kv_bits, size
    log.warning(
        "KV quantization needs a head dim divisible by 32; this model's is %d, so its KV "
        "cache stays in %s", layout.key_dim, layout.dtype,
    )
    return None, group_size
