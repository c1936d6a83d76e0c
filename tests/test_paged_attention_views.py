"""The fused paged-attention node reads its inputs as they come: one graph node per call.

The node used to wrap every input (queries, pools, tables, seqs, groups, sinks) in a
`contiguous` node: six nodes a layer, 180 a SmolLM2 decode step.  Now a row-contiguous input
is read in place, a view (a transposed or sliced array) is copied into rows inside the
kernel's task, and queries are read through their strides.  These tests pin that the
results are bit-identical to the kernel fed explicitly `mx.contiguous(...)` inputs, for
every pool form and limit the kernel supports, and that the call adds no node but its own.
"""

import re

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omlx.kernels import backend
from omlx.kernels.paged_attention import QuantizedRows, RaggedPlan, ragged_attention
from test_attention_windows import build_step  # the same random step: families sharing prefixes
from test_fused_attention import sequence

KERNEL = backend.attention_backend().module
FORMS = ["float32", "float16", "bfloat16", "q4", "q8"]
LIMITS = {
    "full": {},
    "window": dict(window=13),
    "chunk": dict(chunk=16),
    "window+sinks": dict(window=21, sinks=True),
}


def graph_nodes(out: mx.array, path) -> list[str]:
    """The primitives of `out`'s graph (its inputs already evaluated)."""
    mx.export_to_dot(str(path), out)
    return re.findall(r'label ="([^"]+)", shape=rectangle', path.read_text())


def column_view(a: mx.array) -> mx.array:
    """`a`'s values as a view that is not row-contiguous: columns of a wider array."""
    pad = mx.zeros((a.shape[0], 3), dtype=a.dtype)
    wide = mx.concatenate([pad, a, pad], axis=1)
    mx.eval(wide)
    return wide[:, 3 : 3 + a.shape[1]]


def row_view(a: mx.array) -> mx.array:
    """`a`'s values as a row-contiguous view at an offset into a larger buffer."""
    wide = mx.concatenate([mx.ones((5, *a.shape[1:]), dtype=a.dtype), a], axis=0)
    mx.eval(wide)
    return wide[5:]


def pool_parts(rng, rows: int, dim: int, form: str) -> tuple[list[mx.array], int]:
    data = mx.array(rng.standard_normal((rows, dim)).astype(np.float32))
    if form == "float32":
        return [data], 0
    if form in ("float16", "bfloat16"):
        return [data.astype(getattr(mx, form))], 0
    bits = 4 if form == "q4" else 8
    return list(mx.quantize(data, group_size=32, bits=bits)), bits


def ragged_step(rng, kv_heads: int = 2, ratio: int = 3, block_size: int = 8, dims=(64, 32), form="float32"):
    """A step with two sequences sharing a cached prefix (one decoding, one prefilling a
    chunk), a third decoding alone, and a fresh prefill: every kind of row at once."""
    shared = [1, 2]
    tables = [shared + [3, 4], shared + [5, 6, 7], [8, 9, 10], [11, 12]]
    q_lens = [1, 9, 1, 11]
    pos0 = [27, 20, 19, 0]
    num_blocks = 13
    k, bits = pool_parts(rng, num_blocks * kv_heads * block_size, dims[0], form)
    v, _ = pool_parts(rng, num_blocks * kv_heads * block_size, dims[1], form)
    _, plan = RaggedPlan.for_sequences(tables, q_lens, pos0, kv_heads, block_size, kernel=KERNEL)
    assert plan.groups.shape[0] == 1  # the shared prefix is attended as a group
    tokens, q_heads = sum(q_lens), kv_heads * ratio
    q = mx.array(rng.standard_normal((tokens, q_heads, dims[0])).astype(np.float32))
    sinks = mx.array(rng.standard_normal(q_heads).astype(np.float32))
    kw = dict(kv_heads=kv_heads, block_size=block_size, scale=dims[0] ** -0.5, bits=bits, group_size=32)
    return q, k, v, plan, sinks, kw


def call(q, k, v, plan, kw, limits, sinks, tables=None, seqs=None, groups=None, sink_values=None):
    extra = dict(limits)
    if extra.pop("sinks", False):
        extra["sinks"] = sinks if sink_values is None else sink_values
    return KERNEL.paged_attention(q, k, v, plan.tables if tables is None else tables,
                                  plan.seqs if seqs is None else seqs, plan.groups if groups is None else groups,
                                  **kw, **extra)


def bits_of(a: mx.array) -> np.ndarray:
    return np.array(a).view(np.uint32)


def test_fused_kernel_is_built():
    assert KERNEL is not None, backend.attention_backend().reason


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("limit", list(LIMITS))
def test_views_are_bit_identical_to_contiguous_inputs(form, limit):
    """Strided queries (a transpose, a slice of a fused projection's output, the layer's 4-D
    form), pools and plan arrays as column views or offset row views: the same bits as the
    kernel fed `mx.contiguous` copies of everything."""
    rng = np.random.default_rng(FORMS.index(form) * 10 + list(LIMITS).index(limit))
    q, k, v, plan, sinks, kw = ragged_step(rng, form=form)
    limits = LIMITS[limit]
    tokens, q_heads, dk = q.shape
    contiguous = lambda parts: [mx.contiguous(p) for p in parts]  # noqa: E731
    reference = call(mx.contiguous(q), contiguous(k), contiguous(v), plan, kw, limits, mx.contiguous(sinks),
                     tables=mx.contiguous(plan.tables), seqs=mx.contiguous(plan.seqs),
                     groups=mx.contiguous(plan.groups))
    mx.eval(reference)
    assert np.isfinite(np.array(reference)).all()

    heads_first = mx.contiguous(q.transpose(1, 0, 2))
    fused_output = mx.concatenate([mx.zeros((tokens, q_heads, 5)), q, mx.zeros((tokens, q_heads, 3))], axis=2)
    strided_dims = mx.contiguous(mx.stack([q, -q], axis=-1))  # (T, Hq, D, 2): q at dim stride 2
    mx.eval(heads_first, fused_output, strided_dims)
    queries = {
        "transposed view": heads_first.transpose(1, 0, 2),
        "slice of a fused projection": fused_output[:, :, 5 : 5 + dk],
        "dim stride 2": strided_dims[..., 0],
        "row view": row_view(q),
    }
    for name, view in queries.items():
        out = call(view, k, v, plan, kw, limits, sinks)
        assert np.array_equal(bits_of(out), bits_of(reference)), name
    four_d = call(q[:, :, None, :], k, v, plan, kw, limits, sinks)
    assert four_d.shape == (tokens, q_heads, 1, reference.shape[-1])
    assert np.array_equal(bits_of(four_d[:, :, 0, :]), bits_of(reference))

    sink_view = mx.stack([sinks, mx.zeros_like(sinks)], axis=1)[:, 0]  # stride 2
    for make in (column_view, row_view):
        out = call(q, [make(p) for p in k], [make(p) for p in v], plan, kw, limits, sinks,
                   tables=make(plan.tables), seqs=make(plan.seqs), groups=make(plan.groups), sink_values=sink_view)
        assert np.array_equal(bits_of(out), bits_of(reference)), make.__name__


@pytest.mark.parametrize("form", ["float32", "bfloat16", "q4"])
def test_views_through_ragged_attention_match_portable_path(form):
    """The layer's call with a strided (T, Hq, 1, D) queries view, against the portable path
    within test_fused_attention's tolerances, and bitwise against contiguous queries."""
    rng = np.random.default_rng(7)
    q, k, v, plan, sinks, kw = ragged_step(rng, form=form)
    tokens, q_heads, dk = q.shape
    pool_k = k[0] if len(k) == 1 else QuantizedRows(*k, group_size=32, bits=kw["bits"])
    pool_v = v[0] if len(v) == 1 else QuantizedRows(*v, group_size=32, bits=kw["bits"])
    # As mlx-lm builds them: projection output (T, 1, Hq * D) reshaped and transposed.
    projected = q.reshape(tokens, 1, q_heads * dk)
    layer_queries = projected.reshape(tokens, 1, q_heads, dk).transpose(0, 2, 1, 3)
    seqs = [[1, 2, 3, 4], [1, 2, 5, 6, 7], [8, 9, 10], [11, 12]]
    _, portable_plan = RaggedPlan.for_sequences(seqs, [1, 9, 1, 11], [27, 20, 19, 0], 2, 8, kernel=None)
    scale = dk**-0.5
    for limits in ({}, dict(window=13), dict(chunk=16, sinks=sinks)):
        fused = ragged_attention(layer_queries, pool_k, pool_v, plan, scale, **limits)
        fused_contiguous = ragged_attention(mx.contiguous(q[:, :, None, :]), pool_k, pool_v, plan, scale, **limits)
        portable = ragged_attention(layer_queries, pool_k, pool_v, portable_plan, scale, **limits)
        assert fused.shape == portable.shape == (tokens, q_heads, 1, v[0].shape[1] * (32 // kw["bits"] if kw["bits"] else 1))
        assert np.array_equal(bits_of(fused), bits_of(fused_contiguous))
        tolerance = 1e-4 if form != "bfloat16" else 2e-2
        np.testing.assert_allclose(np.array(fused), np.array(portable.astype(mx.float32)), atol=tolerance,
                                   rtol=tolerance)


def test_one_node_per_call(tmp_path):
    """On evaluated inputs (the pools, the plan's host arrays, float32 queries) a call is the
    attention node alone: no contiguous, reshape or cast node around it, through the layer's
    entry point too."""
    rng = np.random.default_rng(3)
    q, k, v, plan, sinks, kw = ragged_step(rng, form="q8")
    mx.eval(q, k, v, sinks)
    out = call(q, k, v, plan, kw, LIMITS["window+sinks"], sinks)
    assert graph_nodes(out, tmp_path / "call.dot") == ["OmlxPagedAttention"]
    pool_k = QuantizedRows(*k, group_size=32, bits=8)
    pool_v = QuantizedRows(*v, group_size=32, bits=8)
    layer = ragged_attention(q[:, :, None, :], pool_k, pool_v, plan, kw["scale"])
    # the query view's own expand_dims node, then the attention: nothing in between
    assert sorted(graph_nodes(layer, tmp_path / "layer.dot")) == ["ExpandDims", "OmlxPagedAttention"]
    # a view of the pool is copied inside the kernel's task, not by a node of the graph
    out = call(q, [column_view(p) for p in k], [row_view(p) for p in v], plan, kw, {}, sinks)
    assert sorted(graph_nodes(out, tmp_path / "views.dot")).count("Contiguous") == 0


def test_queries_of_a_wrong_shape_are_refused():
    rng = np.random.default_rng(4)
    q, k, v, plan, sinks, kw = ragged_step(rng)
    with pytest.raises(ValueError, match="queries must be"):
        KERNEL.paged_attention(q[:, :, None, :] * mx.ones((1, 1, 2, 1)), k, v, plan.tables, plan.seqs, plan.groups,
                               **kw)
    with pytest.raises(ValueError, match="queries must be"):
        KERNEL.paged_attention(q[0], k, v, plan.tables, plan.seqs, plan.groups, **kw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seqs=st.lists(sequence, min_size=1, max_size=6),
    shared_blocks=st.integers(0, 3),
    block_size=st.sampled_from([4, 8, 16, 32]),
    kv_heads=st.sampled_from([1, 2, 4]),
    ratio=st.sampled_from([1, 2, 3, 4]),
    dims=st.sampled_from([(64, 64), (32, 32), (64, 32), (8, 8), (20, 20)]),
    form=st.sampled_from(FORMS),
    limit=st.sampled_from(list(LIMITS)),
    seed=st.integers(0, 2**16),
)
def test_random_plans_read_views_bit_identically(seqs, shared_blocks, block_size, kv_heads, ratio, dims, form,
                                                 limit, seed):
    """Random ragged plans (decode rows, prefill chunks at any offset, shared prefixes, GQA,
    head dims off the vector width): queries as a (T, Hq, 1, D) transposed view and every
    other input as a view give the bits of contiguous inputs."""
    key_dim, value_dim = dims
    if form in ("q4", "q8") and (key_dim % 32 or value_dim % 32):
        form = "float32"
    rng = np.random.default_rng(seed)
    tables, q_lens, pos0, next_block = build_step(seqs, shared_blocks, block_size)
    rows = next_block * kv_heads * block_size
    k, bits = pool_parts(rng, rows, key_dim, form)
    v, _ = pool_parts(rng, rows, value_dim, form)
    _, plan = RaggedPlan.for_sequences(tables, q_lens, pos0, kv_heads, block_size, kernel=KERNEL)
    tokens, q_heads = sum(q_lens), kv_heads * ratio
    q = mx.array(rng.standard_normal((tokens, q_heads, key_dim)).astype(np.float32))
    sinks = mx.array(rng.standard_normal(q_heads).astype(np.float32))
    kw = dict(kv_heads=kv_heads, block_size=block_size, scale=key_dim**-0.5, bits=bits, group_size=32)
    limits = LIMITS[limit]
    reference = call(q, k, v, plan, kw, limits, sinks)
    # (T, 1, Hq, D) as a projection's output is reshaped, transposed to the layer's form
    layer_view = mx.contiguous(q[:, None]).transpose(0, 2, 1, 3)
    groups = column_view(plan.groups) if plan.groups.shape[0] else plan.groups
    out = call(layer_view, [column_view(p) for p in k], [row_view(p) for p in v], plan, kw, limits, sinks,
               tables=column_view(plan.tables), seqs=row_view(plan.seqs), groups=groups,
               sink_values=mx.stack([mx.zeros_like(sinks), sinks], axis=1)[:, 1])
    assert out.shape == (tokens, q_heads, 1, reference.shape[-1])
    assert np.array_equal(bits_of(out[:, :, 0, :]), bits_of(reference))
