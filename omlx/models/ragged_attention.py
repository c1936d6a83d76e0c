"""A llama-style attention layer's ragged pass in a handful of graph nodes.

mlx-lm's attention (llama, qwen2, qwen3, granite, phi3) builds ~33 MLX nodes per layer call on the
paged path: three projections (or one fused call and three slices), three reshapes and
three transposes, two RoPE rotations, the paged cache's two reshapes, two casts to the pool's
dtype and two scatters, the attention, a transpose and a reshape.  On the CPU every node
costs microseconds to build and dispatch whatever its size, and at one decode row on a small
model those nodes cost more than the matmuls (bench/README.md, "The per-token graph").

Here, in a ragged pass (every token a row of length one, attention routed to the paged pool:
omlx/scheduler/kv_cache.py) the layer runs as:

    qkv = fused q/k/v projection (one packed call)
    q = rope_store(qkv, pools)    three nodes: q rotated; k rotated, rounded to the pool's dtype
                                  and written into the key pool in place (as `pool[rows] = k`
                                  does); v likewise - each after qwen3's per-head RMSNorm where
                                  the layer has one
    out = paged attention(q)      one node, its output already (T, 1, Hq * Dv)
    o_proj(out)

Six nodes instead of ~33, **bit-identical** to the layer's own path: the same packed
projections (the fused call computes every column as the separate calls do), the same
rotation (`rope_split` reuses `rope_rotate`'s instruction sequence and the shared cos / sin
table of omlx/models/shared_rope.py), the same rounding to the pool's dtype (MLX's astype),
the same rows written and the same attention kernel with the same inputs.

Every other call - mlx-lm's own caches, the padded path, a quantized or second KV pool, a
sliding window, a portable (kernel-less) plan, a float16 / bfloat16 activation - goes to the
layer's own `__call__` unchanged.  The swap changes the layer's class to a subclass whose only
difference is this `__call__` (the way `nn.quantize` swaps layers at load; mlx-lm's model
code is unmodified, and parameter names and counts stay the same).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from omlx.kernels import fused_ops
from omlx.kernels.linear import PackedLinear
from omlx.kernels.quant_bf16 import QuantBf16Linear
from .kernel_norms import KernelRMSNorm
from .shared_rope import SharedRoPE

# (mlx-lm module, attention class, the attribute holding the fused q/k/v projection, whether
# q and k pass a per-head RMSNorm before RoPE): layers whose __call__ is mlx-lm's llama
# attention (projections, reshape + transpose, [q_norm / k_norm,] rope of q and k with the
# cache's offset, update_and_fetch, scaled_dot_product_attention, o_proj) and nothing else -
# no sinks, no softcapping, no gates.
_LAYERS = (
    ("mlx_lm.models.llama", "Attention", "fused_qkv", False),
    ("mlx_lm.models.qwen2", "Attention", "fused_qkv", False),
    ("mlx_lm.models.granite", "Attention", "fused_qkv", False),
    ("mlx_lm.models.phi3", "Attention", "qkv_proj", False),
    ("mlx_lm.models.qwen3", "Attention", "fused_qkv", True),
    ("mlx_lm.models.qwen3_moe", "Attention", "fused_qkv", True),
)

_FAST_KERNELS = (PackedLinear, QuantBf16Linear)


def _known_layers() -> dict[type, tuple[str, bool]]:
    import importlib

    known = {}
    for module_name, class_name, qkv_name, normed in _LAYERS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        known[cls] = (qkv_name, normed)
    return known


def _routed_call(qkv_name: str, normed: bool):
    def __call__(self, x: mx.array, mask: mx.array | None = None, cache=None) -> mx.array:
        if not _ragged_fast_path(self, x, cache):
            return super(type(self), self).__call__(x, mask=mask, cache=cache)
        tokens = x.shape[0]
        storage, layer, plan = cache.storage, cache.layer, cache.batch.ragged
        pool_k, pool_v = storage.keys[layer], storage.values[layer]
        rope: SharedRoPE = self.rope
        _, _, table = rope.table_for(tokens, 1, mx.float32, cache.offset)
        norms = {}
        if normed:
            norms = dict(q_norm=self.q_norm.weight, k_norm=self.k_norm.weight, q_eps=self.q_norm.eps,
                         k_eps=self.k_norm.eps)
        # k and v go straight into the pools, in place (as `pool[rows] = k` does): the pool
        # arrays become this node's outputs, reusing their buffers.
        q = fused_ops.kernel().rope_store(
            getattr(self, qkv_name)(x), table, cache.batch.write_rows, pool_k, pool_v, self.n_heads,
            self.n_kv_heads, self._omlx_head_dim, rope.dims, rope.traditional, **norms)
        out = plan.kernel.paged_attention(
            q, [pool_k], [pool_v], plan.tables, plan.seqs, plan.groups,
            kv_heads=plan.num_kv_heads, block_size=plan.block_size, scale=self.scale, bits=0, group_size=64,
            merge_heads=True)  # (T, 1, Hq * Dv): o_proj's input, no reshape node
        return self.o_proj(out)

    return __call__


def _ragged_fast_path(layer, x: mx.array, cache) -> bool:
    """Whether this call is one the routed path computes exactly as the layer's own would."""
    if type(cache) is not _paged_layer_cache() or cache.window or cache.chunk:
        return False
    batch = cache.batch
    plan = batch.ragged
    if plan is None or plan.kernel is None or cache.storage.kv_bits is not None:
        return False
    return (x.ndim == 3 and x.shape[1] == 1 and x.dtype == mx.float32
            and cache.storage.keys[cache.layer].dtype in (mx.float32, mx.bfloat16, mx.float16))


def _paged_layer_cache() -> type:
    # Imported on first use: the scheduler package imports the model forms at load.
    from omlx.scheduler.kv_cache import PagedLayerCache

    return PagedLayerCache


def _subclass(cls: type, qkv_name: str, normed: bool, made: dict) -> type:
    if cls not in made:
        made[cls] = type(cls.__name__, (cls,), {"__call__": _routed_call(qkv_name, normed),
                                                "__module__": __name__, "_omlx_routed": True})
    return made[cls]


def _eligible(layer: nn.Module, qkv_name: str, normed: bool) -> bool:
    fused = layer.get(qkv_name) if isinstance(layer, dict) else None
    if not isinstance(fused, _FAST_KERNELS) or not isinstance(layer.get("o_proj"), _FAST_KERNELS):
        return False
    if not isinstance(layer.get("rope"), SharedRoPE):
        return False
    heads, kv_heads = getattr(layer, "n_heads", None), getattr(layer, "n_kv_heads", None)
    if not heads or not kv_heads or fused.out_features % (heads + 2 * kv_heads):
        return False
    head_dim = fused.out_features // (heads + 2 * kv_heads)
    # q_proj's width, where mlx-lm keeps it as a layer (phi3 has only qkv_proj).
    q_proj = layer.get("q_proj")
    if q_proj is not None and getattr(q_proj, "out_features", heads * head_dim) != heads * head_dim:
        return False
    if normed and not all(isinstance(layer.get(name), KernelRMSNorm) and layer[name].weight.dtype == mx.float32
                          and layer[name].weight.shape == (head_dim,) for name in ("q_norm", "k_norm")):
        return False  # rope_split computes the per-head norm as the one-node kernel norm does
    return layer.rope.dims <= head_dim and head_dim <= 1024


_made: dict[type, type] = {}


def route_ragged_attention(model: nn.Module) -> int:
    """Swap the model's llama-style attention layers whose projections run packed (and whose
    RoPE shares its table) for the routed subclass.  Returns how many layers."""
    if fused_ops.kernel() is None or not hasattr(fused_ops.kernel(), "rope_split"):
        return 0
    known = _known_layers()
    swapped = 0
    for _, layer in model.named_modules():
        kind = known.get(type(layer))
        if kind is None or not _eligible(layer, *kind):
            continue
        fused = layer[kind[0]]
        object.__setattr__(layer, "_omlx_head_dim", fused.out_features // (layer.n_heads + 2 * layer.n_kv_heads))
        layer.__class__ = _subclass(type(layer), *kind, _made)
        swapped += 1
    return swapped


def is_routed(model: nn.Module) -> bool:
    return any(getattr(type(m), "_omlx_routed", False) for _, m in model.named_modules())
