"""SharedRoPE (omlx/models/shared_rope.py): RoPE's cos / sin table computed once per pass and
reused by every layer's q and k, bit-identical to `mx.fast.rope` on the CPU."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load

from omlx.models import shared_rope
from omlx.models.shared_rope import SharedRoPE, share_rope_tables
from omlx.testing.tiny_models import TinyModelSpec, build_model

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims, head_dim", [(64, 64), (32, 64), (16, 18)])
@pytest.mark.parametrize("b, n, t", [(1, 9, 1), (32, 3, 1), (1, 4, 7), (3, 2, 5)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_bit_identical_to_fast_rope(traditional, dims, head_dim, b, n, t, dtype):
    reference = nn.RoPE(dims, traditional=traditional, base=100000.0, scale=0.5)
    shared = SharedRoPE.from_rope(reference)
    x = mx.array(RNG.standard_normal((b, n, t, head_dim)).astype(np.float32)).astype(dtype)
    offsets = [0, 37, mx.array(RNG.integers(0, 5000, size=b), dtype=mx.int32), mx.array([12], dtype=mx.int32)]
    for offset in offsets:
        expected = reference(x, offset=offset)
        for _ in range(2):  # the second call reads the cached table
            got = shared(x, offset=offset)
            assert got.shape == expected.shape and got.dtype == expected.dtype
            assert mx.array_equal(got, expected).item(), offset
        shared_rope.forget()


@pytest.mark.parametrize("traditional", [False, True])
def test_host_position_table_equals_the_graphs_table_everywhere(traditional):
    """Per-row offsets read their cos / sin rows from the host table of every position (grown
    by doubling); past MAX_HOST_POSITIONS the table is built in the graph.  Both are
    fast.rope's bits, at positions either side of every growth and of the cap."""
    reference = nn.RoPE(64, traditional=traditional, base=500000.0)
    shared = SharedRoPE.from_rope(reference)
    cap = shared_rope.MAX_HOST_POSITIONS
    edges = [0, 1, 1023, 1024, 1025, 2047, 2048, 4095, 4096, cap - 2, cap - 1, cap, cap + 5]
    for positions in (edges, RNG.integers(0, cap + 1000, size=300).tolist(), list(range(3000, 3100))):
        offset = mx.array(positions, dtype=mx.int32)
        x = mx.array(RNG.standard_normal((len(positions), 3, 1, 64)).astype(np.float32))
        assert mx.array_equal(shared(x, offset=offset), reference(x, offset=offset)).item()
        shared_rope.forget()
    # A chunk of several positions per row (the padded pass) reads the same rows.
    offset = mx.array([7, 2040], dtype=mx.int32)
    x = mx.array(RNG.standard_normal((2, 2, 12, 64)).astype(np.float32))
    assert mx.array_equal(shared(x, offset=offset), reference(x, offset=offset)).item()
    shared_rope.forget()


def test_one_table_per_offsets_array():
    rope = SharedRoPE(16, base=10000.0)
    offsets = mx.array([3, 70], dtype=mx.int32)
    q, k = mx.ones((2, 4, 1, 16)), mx.ones((2, 2, 1, 16))
    rope(q, offset=offsets)
    (first,) = shared_rope._tables.last[1].values()
    rope(k, offset=offsets)
    assert list(shared_rope._tables.last[1].values()) == [first]  # k reused q's table
    # Another configuration (Gemma 3's second base) keeps its own table beside it.
    other_base = SharedRoPE(16, base=1e6)
    assert mx.array_equal(other_base(k, offset=offsets), nn.RoPE(16, base=1e6)(k, offset=offsets)).item()
    assert len(shared_rope._tables.last[1]) == 2 and rope.table(k, offsets) is first
    # Equal values in another array (the next pass's): new tables, never a stale one.
    other = mx.array([4, 71], dtype=mx.int32)
    got = rope(k, offset=other)
    assert shared_rope._tables.last[0] is other and len(shared_rope._tables.last[1]) == 1
    assert mx.array_equal(got, nn.RoPE(16)(k, offset=other)).item()
    # A different length: a new table too.
    rope(mx.ones((2, 2, 3, 16)), offset=other)
    assert len(shared_rope._tables.last[1]) == 2


def test_a_float32_model_keeps_its_logits_bit_for_bit(tmp_path):
    path = build_model(tmp_path / "m", TinyModelSpec(model_type="llama", seed=2))
    model, _ = load(str(path))
    tokens = mx.array([[5, 9, 200, 31, 7, 8, 400]])
    before = np.array(model(tokens))
    assert share_rope_tables(model) == len(model.model.layers)
    assert all(type(layer.self_attn.rope) is SharedRoPE for layer in model.model.layers)
    assert np.array_equal(np.array(model(tokens)), before)


def test_only_plain_rope_is_swapped():
    class ScaledRoPE(nn.RoPE):  # a subclass may compute its own frequencies
        pass

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain = nn.RoPE(8)
            self.scaled = ScaledRoPE(8)

    holder = Holder()
    assert share_rope_tables(holder) == 1
    assert type(holder.plain) is SharedRoPE and type(holder.scaled) is ScaledRoPE


@pytest.mark.usefixtures("attention_kernel")
def test_float32_engine_stays_token_exact_with_mlx_lm(tmp_path):
    """The ragged engine on a float32 model with SharedRoPE (offsets per token, decodes and
    prefill chunks in one pass) gives mlx-lm's own greedy tokens on the unswapped model."""
    from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
    from omlx.testing.reference import greedy_reference

    path = build_model(tmp_path / "m", TinyModelSpec(model_type="qwen3", seed=8))
    reference_model, tokenizer = load(str(path))
    model, _ = load(str(path))
    assert share_rope_tables(model) == len(model.model.layers)
    eos = frozenset(tokenizer.eos_token_ids)
    prompts = [RNG.integers(5, 500, size=n).tolist() for n in (5, 23, 12)]
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=48, max_num_batched_tokens=16),
                       context_window=1024)
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(str(i), prompt, 10, stop_token_ids=eos))
    outputs = {i: [] for i in range(len(prompts))}
    while engine.has_work:
        for request_id, event in engine.step():
            if event.token_id is not None:
                outputs[int(request_id)].append(event.token_id)
    for i, prompt in enumerate(prompts):
        assert outputs[i] == greedy_reference(reference_model, prompt, 10, eos)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_llama3_scaled_rope_is_bit_identical_and_shared(traditional, dtype):
    from mlx_lm.models.rope_utils import Llama3RoPE

    config = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    references = [Llama3RoPE(32, 4096, traditional, 500000.0, config) for _ in range(2)]
    shared = [SharedRoPE.from_rope(r) for r in references]
    x = mx.array(RNG.standard_normal((5, 3, 1, 32)).astype(np.float32)).astype(dtype)
    offsets = mx.array(RNG.integers(0, 4000, size=5), dtype=mx.int32)
    for reference, rope in zip(references, shared):
        assert mx.array_equal(rope(x, offset=offsets), reference(x, offset=offsets)).item()
    assert len(shared_rope._tables.last[1]) == 1  # two layers' equal frequencies: one table
    shared_rope.forget()


def test_a_llama3_scaled_model_swaps_its_ropes(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    path = build_model(tmp_path / "m", TinyModelSpec(model_type="llama", seed=3, extra_config={"rope_scaling": scaling}))
    model, _ = load(str(path))
    tokens = mx.array([[5, 9, 200, 31, 7, 8, 400]])
    before = np.array(model(tokens))
    from mlx_lm.models.rope_utils import Llama3RoPE

    assert all(type(layer.self_attn.rope) is Llama3RoPE for layer in model.model.layers)
    assert share_rope_tables(model) == len(model.model.layers)
    assert np.array_equal(np.array(model(tokens)), before)
